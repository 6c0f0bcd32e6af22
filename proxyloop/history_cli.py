"""`proxyloop history`: the registry's promotion history, verified against its hash chain, and what
was serving at a given time.

Run: `proxyloop history --at 2025-03-01T12:00 --policy appendix-d`.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ground.moments import as_utc
from ground.settings import get_settings

console = Console(soft_wrap=True)


def _parse_time(text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text)
    except ValueError as exc:
        raise typer.BadParameter(f"{text!r} is not an ISO 8601 time; e.g. 2025-03-01T12:00 (UTC) or "
                                 "2025-03-01T12:00+02:00", param_hint="--at") from exc
    return as_utc(when)


def history(
    at: Annotated[str | None, typer.Option(help="ISO 8601 time (naive = UTC): print what was serving then.")] = None,
    policy: Annotated[str | None, typer.Option(
        help="Only this policy; with --at the default is PROXYLOOP_POLICY_NAME.")] = None,
    alias: Annotated[str | None, typer.Option(help="Only this alias; with --at the default is production.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table or a sentence.")] = False,
) -> None:
    """Verify the promotion history's hash chain, then list it or say what was serving at --at."""
    from policies.audit_log import AuditTampered, serving_at, verify  # imports torch: only when this command runs

    settings = get_settings()
    when = _parse_time(at) if at is not None else None
    try:
        if when is None:
            entries = [entry for entry in verify(settings.registry_dir)
                       if policy in (None, entry.policy) and alias in (None, entry.alias)]
        else:
            policy, alias = policy or settings.policy_name, alias or "production"
            serving = serving_at(settings.registry_dir, policy, alias, when)
    except AuditTampered as exc:
        console.print(f"[red]error: the promotion history was tampered with:[/red] {exc}")
        raise typer.Exit(1) from exc

    if when is None:
        if as_json:
            typer.echo(json.dumps([entry.model_dump(mode="json") for entry in entries], indent=2))
            return
        table = Table(title=f"promotion history, {settings.registry_dir} (chain verified)")
        for column in ("seq", "at (UTC)", "action", "policy", "version", "alias", "who", "why", "hash"):
            table.add_column(column, min_width=len(column), no_wrap=column in ("seq", "version", "hash"))
        for entry in entries:
            table.add_row(str(entry.seq), entry.at.strftime("%Y-%m-%d %H:%M"), entry.action, entry.policy,
                          f"v{entry.version}", entry.alias, entry.who, entry.why, entry.hash[:12])
        console.print(table)
    elif as_json:
        typer.echo(json.dumps(serving.model_dump(mode="json") if serving else None, indent=2))
    elif serving is None:
        console.print(f"nothing was released as {policy}@{alias} by {when.isoformat()}")
    else:
        console.print(f"{policy}@{alias} at {when.isoformat()}: v{serving.version} since {serving.at.isoformat()} "
                      f"({serving.action} by {serving.who}: {serving.why or 'no reason given'}; "
                      f"snapshot {serving.snapshot_id or 'unknown'}; entry seq {serving.seq})")

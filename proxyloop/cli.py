"""The `proxyloop` command: run the local stack and the end-to-end demo.

Run: `proxyloop --help`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ground.settings import get_settings
from ingest.cli import app as ingest_app
from ingest.dead_letters_cli import app as dead_letters_app
from ingest.labelstudio.cli import app as labelstudio_app
from proxyloop import stack
from proxyloop.history_cli import history
from workers.cli import models_app

app = typer.Typer(help="proxyloop: annotation streams in, safely released policies out.", no_args_is_help=True)
app.add_typer(labelstudio_app, name="labelstudio")
app.add_typer(ingest_app, name="ingest")
app.add_typer(dead_letters_app, name="deadletters")
app.add_typer(models_app, name="models")
app.command(name="history")(history)
console = Console(soft_wrap=True)  # no hard wraps in logs and pipes


def _say(message: str) -> None:
    console.print(f"[dim]›[/dim] {message}")


@app.command()
def contract(directory: Annotated[Path, typer.Argument(help="Where to write the JSON Schemas.")] = Path(
        "docs/contract")) -> None:
    """Export the event contract (one JSON Schema per topic payload) for non-Python producers."""
    from ingest.contract import export

    for path in export(directory):
        _say(f"wrote {path}")


@app.command()
def up() -> None:
    """Start the local stack (Kafka broker, Redis, Prefect, worker, HTTP app, consumer, flows)."""
    settings = get_settings()
    try:
        stack.up(settings, _say)
    except stack.StackError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc
    console.print(f"stack up; state in {settings.home_dir}")


@app.command()
def down() -> None:
    """Stop every component the local stack started."""
    stack.down(get_settings(), _say)


@app.command()
def status(as_json: Annotated[bool, typer.Option("--json", help="One JSON object instead of tables.")] = False) -> None:
    """Health of each component, lag per partition (growing? stalled?), dead letters by reason, Celery
    queues, data counts, runs and released versions. Exit code 1: a component is down or the consumer stalled."""
    from rich.markup import escape
    from rich.table import Column

    from proxyloop.operations import overview

    view = overview(get_settings())
    if as_json:
        typer.echo(json.dumps(view.as_json(), indent=2))
        raise typer.Exit(0 if view.healthy else 1)
    table = Table("component", "state", title="stack")
    for name, state in view.components.items():
        table.add_row(name, state if state.startswith("healthy") else f"[red]{state}[/red]")
    console.print(table)
    unknown = "[dim]unknown[/dim]"
    if view.partitions is None:
        console.print(f"consumer lag: {unknown} ({escape(view.lag_error or '')})")
    else:
        lag = Table(Column("partition", no_wrap=True), "end", "committed", "lag", "trend (UTC)",
                    title=f"consumer lag: {view.lag_total}")
        for p in view.partitions:
            trend = " ".join(f"[red]{flag} since {since:%H:%M:%S}[/red]" for flag, since in
                             (("stalled", p.stalled_since), ("growing", p.growing_since)) if since is not None)
            lag.add_row(f"{p.topic}[{p.partition}]", str(p.end_offset),
                        "none" if p.committed is None else str(p.committed), str(p.lag), trend)
        console.print(lag)
    letters = view.dead_letters_by_reason
    reasons = " (" + ", ".join(f"{code} {n}" for code, n in sorted(letters.items())) + ")" if letters else ""
    console.print(f"labels stored: expert {view.labels.get('expert', 0)}, proxy {view.labels.get('proxy', 0)}; "
                  f"dead-lettered: {unknown if letters is None else sum(letters.values())}{reasons}")
    queues = ", ".join(f"{q} {n}" for q, n in view.queue_depths.items()) if view.queue_depths is not None else unknown
    console.print(f"celery queued: {queues}; active: {view.active_tasks if view.active_tasks is not None else unknown}")
    console.print("production: " + (", ".join(f"{n} v{v}" for n, v in view.production.items()) or "nothing released"))
    queue = view.acquisition
    if queue is None:
        console.print("acquisition queue: no refresh yet (flows.acquisition)")
    else:
        spread = queue["scores"]
        scores = f"scores {spread['min']:.3f} / {spread['median']:.3f} / {spread['max']:.3f} (min/median/max)" \
            if spread else "no scores"
        console.print(f"acquisition queue: {queue['open_tasks']} open tasks, {scores}, {queue['method']}; "
                      f"refreshed {queue['refreshed_at']}, {queue['labels_since_refresh']} expert labels since")
    _print_runs(view.runs)
    if not view.healthy:
        raise typer.Exit(1)


def _print_runs(runs: list[dict[str, object]]) -> None:
    table = Table("run", "status", "plan", "gate", "version", "updated", title="retrain runs")
    for run in runs:
        table.add_row(*(str(run[k] if run[k] is not None else "") for k in
                        ("run_id", "status", "plan", "gate", "version", "updated")))
    console.print(table)


@app.command()
def runs() -> None:
    """The latest retrain runs with their plan, gate decision and released version."""
    from proxyloop.operations import recent_runs

    _print_runs(recent_runs(get_settings()))


def _release_run(run_id: str, reason: str | None) -> None:
    import os

    settings = get_settings()
    os.environ.setdefault("PREFECT_API_URL", settings.prefect_api_url)
    from flows.retrain import RunNotFound, release_flow

    try:
        release = release_flow(run_id, override_reason=reason, operator=os.environ.get("USER", "operator"))
    except (RunNotFound, PermissionError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc
    console.print(f"released {release.policy} v{release.version} as {release.alias}")


@app.command()
def approve(run_id: str) -> None:
    """Release a run whose gate passed (e.g. after its release step failed)."""
    _release_run(run_id, None)


@app.command()
def override(run_id: str, reason: Annotated[str, typer.Option(help="Why the gate is overridden (audited).")]) -> None:
    """Release a run the gate blocked; the reason is recorded in the version's lineage."""
    _release_run(run_id, reason)


@app.command()
def rollback(
    version: Annotated[int, typer.Argument(help="Version to point `production` at.")],
    policy: Annotated[str | None, typer.Option(help="Policy name; default PROXYLOOP_POLICY_NAME.")] = None,
    reason: Annotated[str, typer.Option(help="Why (kept in the promotion history with your OS user).")] = "",
) -> None:
    """Point the `production` alias back at an earlier version; serving follows at once."""
    from policies.promotion import move_alias
    from policies.registry import AuditTampered, RegistryError

    settings = get_settings()
    try:
        moved = move_alias(settings, version, policy=policy, reason=reason)
    except (RegistryError, AuditTampered) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc
    console.print(f"{moved.policy}@production → v{moved.version}")


@app.command()
def demo(
    report: Annotated[Path | None, typer.Option(help="Write the run's report as JSON here.")] = None,
    keep_up: Annotated[bool, typer.Option(help="Leave the stack running afterwards.")] = False,
    n_proxy: Annotated[int | None, typer.Option(help="Proxy preferences to publish (default: 3000 "
                                                     "features, 600 chat).")] = None,
    n_expert: Annotated[int, typer.Option(help="Expert labels to post through the webhook.")] = 60,
    task: Annotated[str, typer.Option(help="'features' (paper 1, Appendix D) or 'chat' (DPO of a language "
                                           "model, gated on paper 2's indicators).")] = "features",
) -> None:
    """Drive one full cycle: events → store → conditions → training → gate → release → serving."""
    from proxyloop.demo import DemoFailed, run_demo

    if task not in ("features", "chat"):
        console.print(f"[red]error:[/red] unknown task {task!r}; use --task features or --task chat")
        raise typer.Exit(2)
    settings = get_settings()
    try:
        result = run_demo(settings, _say, n_proxy=n_proxy, n_expert=n_expert, keep_up=keep_up,
                          task="chat" if task == "chat" else "features")
    except (DemoFailed, stack.StackError) as exc:
        console.print(f"[red]demo failed:[/red] {exc}")
        raise typer.Exit(1) from exc
    if report:
        report.write_text(json.dumps(result, indent=2, default=str))
        _say(f"report written to {report}")
    console.print_json(json.dumps({k: result[k] for k in ("events", "conditions", "indicators", "gate", "release",
                                                          "serving", "timings_s")}, default=str))
    ok = (result["events"]["stored"] == result["events"]["proxy_published"] + result["events"]["expert_published"]
          and result["serving"].get("status") == 200)
    if not ok:
        console.print("[red]demo finished but did not reach a served release[/red]")
        raise typer.Exit(1)


if __name__ == "__main__":
    app()

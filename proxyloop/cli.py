"""The `proxyloop` command: run the local stack and the end-to-end demo.

Run: `proxyloop --help`. An operator's error (a malformed setting, a service down, an unusable home or file) is
one `error: …` line on stderr and exit code 1; `proxyloop --debug …` or PROXYLOOP_DEBUG=1 shows its traceback.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup
from typer.exceptions import TyperException

from ground.settings import OperatorError, Settings, env_name, get_settings, unknown_variables
from ingest.cli import app as ingest_app
from ingest.dead_letters_cli import app as dead_letters_app
from ingest.labelstudio.cli import app as labelstudio_app
from proxyloop import stack
from proxyloop.history_cli import history
from workers.cli import models_app

if TYPE_CHECKING:
    from typer._click import Context  # typer vendors click: its Context, not click's


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _settings_message(exc: Exception) -> str | None:
    """pydantic names the field, pydantic-settings only the source: name the variable the operator set."""
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    if isinstance(exc, ValidationError) and exc.title == Settings.__name__:
        problems = []
        for error in exc.errors():
            message = error["msg"].removeprefix("Value error, ")
            given = f" (got {error['input']!r})" if message == error["msg"] and isinstance(error["input"], str) else ""
            # A check across fields (no loc) names its variables itself.
            problems.append(f"{env_name(str(error['loc'][0]))}: {message}{given}" if error["loc"] else message)
        return "; ".join(problems)
    if isinstance(exc, SettingsError):  # a JSON-valued field (chat_recipe) whose value does not parse
        field = re.search(r'field "(\w+)"', str(exc))
        return f"{env_name(field[1]) if field else 'a PROXYLOOP_ variable'}: expected JSON ({exc.__cause__ or exc})"
    return None


def _service_message(exc: Exception) -> str | None:
    """A store, broker or HTTP service that does not answer, named with the setting that points at it."""
    import httpx
    from kafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import OperationalError

    if isinstance(exc, OperationalError):
        url = get_settings().store_url
        where = f"store at {make_url(url).render_as_string(hide_password=True)} (PROXYLOOP_STORE_URL)" if url \
            else f"store {get_settings().resolved_store_url} (PROXYLOOP_HOME)"
        return f"{where} unusable: {_one_line(exc.orig or exc)}"
    if isinstance(exc, KafkaError):
        down = isinstance(exc, KafkaTimeoutError | KafkaConnectionError)
        return f"Kafka at {get_settings().kafka_bootstrap} {'unreachable' if down else 'refused'} " \
               f"(PROXYLOOP_KAFKA_BOOTSTRAP): {_one_line(exc)}"
    if isinstance(exc, httpx.HTTPError):
        try:
            url = str(exc.request.url)
        except RuntimeError:  # raised without its request
            url = ""
        s = get_settings()
        for field, service, base in (("prefect_api_url", "Prefect", s.prefect_api_url),
                                     ("labelstudio_url", "Label Studio", s.labelstudio_url),
                                     ("object_store_url", "the object store", s.object_store_url),
                                     ("http_port", "the HTTP app", s.http_url)):
            if url.startswith(base):
                return f"{service} at {base} unreachable ({env_name(field)}): {_one_line(exc)}"
        return f"{url or 'an HTTP service'}: {_one_line(exc)}"
    return None


def operator_message(exc: Exception) -> str | None:
    """The `error:` line for an error an operator fixes outside the code; None for a bug (keeps its traceback)."""
    if isinstance(exc, OperatorError):  # StackError, SettingsInvalid, BrokerUnreachable …: written for operators
        return str(exc)
    if isinstance(exc, OSError) and exc.filename is not None:  # a path given or configured: unusable
        return f"{exc.filename}: {exc.strerror or exc}"
    from policies.audit_log import AuditTampered
    from policies.registry import RegistryError

    if isinstance(exc, RegistryError | AuditTampered):  # a damaged registry file: its message names it and the fix
        return str(exc)
    try:
        return _settings_message(exc) or _service_message(exc)
    except Exception:  # noqa: BLE001 - a translation that fails must not hide the error it was translating
        return None


class _OperatorErrors(TyperGroup):
    """The error boundary of every command, sub-apps' included (they run inside this group's invoke): an error
    an operator fixes outside the code becomes one `error: …` line on stderr and exit code 1, where it used to be
    a traceback of 50-580 lines. Anything else is a bug and keeps its traceback; so does everything with --debug."""

    def invoke(self, ctx: Context) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, TyperException):
            raise  # the CLI's own ends (typer.Exit is a RuntimeError): exit codes and usage errors as they are
        except Exception as exc:
            message = None if ctx.params.get("debug") else operator_message(exc)
            if message is None:
                raise
            typer.echo(f"error: {message}", err=True)
            raise typer.Exit(1) from exc


app = typer.Typer(help="proxyloop: annotation streams in, safely released policies out.", no_args_is_help=True,
                  cls=_OperatorErrors)
app.add_typer(labelstudio_app, name="labelstudio")
app.add_typer(ingest_app, name="ingest")
app.add_typer(dead_letters_app, name="deadletters")
app.add_typer(models_app, name="models")
app.command(name="history")(history)
console = Console(soft_wrap=True)  # no hard wraps in logs and pipes


@app.callback()
def _options(debug: Annotated[bool, typer.Option(
        "--debug", envvar="PROXYLOOP_DEBUG",
        help="Show the full traceback of an error instead of its one-line `error:` message.")] = False) -> None:
    """Options of every command (_OperatorErrors.invoke reads --debug from the context), and a warning for each
    PROXYLOOP_ variable that names no setting: a misspelt one is otherwise ignored in silence."""
    for name in unknown_variables(os.environ):
        typer.echo(f"warning: {name} names no setting and is ignored (the settings: ground/settings.py, "
                   "docs/deploy.md)", err=True)


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
    """Start the local stack: the object store and Kafka broker, Redis, Prefect, the workers, the HTTP app, the
    consumer, the flows, and Label Studio when PROXYLOOP_EMBEDDED_LABELSTUDIO is on; each embedded part only when its
    PROXYLOOP_EMBEDDED_* switch is on."""
    settings = get_settings()
    stack.up(settings, _say)  # StackError: one `error:` line (the boundary above)
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
    """The run is looked up in the store before Prefect is asked, so a mistyped id is named as such whatever
    Prefect's state; then Prefect must answer, where the release flow would end in a traceback of its client."""
    settings = get_settings()
    if not settings.store_exists():
        raise OperatorError(f"no retrain run {run_id!r}: no store yet under PROXYLOOP_HOME {settings.home_dir}")
    os.environ.setdefault("PREFECT_API_URL", settings.prefect_api_url)
    from flows.retrain import RunNotFound, load_run, release_flow
    from policies.audit_log import current_user
    from policies.registry import aliases

    try:
        load_run(run_id)
        _require_prefect(settings, os.environ["PREFECT_API_URL"])
        release = release_flow(run_id, override_reason=reason, operator=current_user())
    except (RunNotFound, PermissionError, ValueError) as exc:
        raise OperatorError(str(exc)) from exc
    now = aliases(settings.registry_dir, release.policy).get(release.alias)
    if now == release.version:
        console.print(f"released {release.policy} v{release.version} as {release.alias}")
    else:  # released before, and the alias moved since (a rollback): say so, not "as production"
        console.print(f"run {run_id} was released as {release.policy} v{release.version}; {release.alias} points at "
                      f"v{now} now (`proxyloop history` says who moved it)")


def _require_prefect(settings: Settings, url: str) -> None:
    import httpx

    setting = "PROXYLOOP_PREFECT_API_URL" if url == settings.prefect_api_url else "PREFECT_API_URL"
    try:
        answer = httpx.get(f"{url.rstrip('/')}/health", timeout=5)
    except httpx.HTTPError as exc:
        raise OperatorError(f"Prefect at {url} unreachable ({setting}): {exc}") from exc
    if answer.status_code != 200:
        raise OperatorError(f"Prefect at {url} answered {answer.status_code} to /health ({setting})")


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
    from policies.audit_log import AuditTampered
    from policies.promotion import move_alias
    from policies.registry import RegistryError

    settings = get_settings()
    try:
        moved = move_alias(settings, version, policy=policy, reason=reason)
    except (RegistryError, AuditTampered) as exc:
        raise OperatorError(str(exc)) from exc
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

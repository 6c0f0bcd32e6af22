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
from sqlalchemy.orm import Session

from proxyloop import stack
from proxyloop.settings import get_settings

app = typer.Typer(help="proxyloop: annotation streams in, safely released policies out.", no_args_is_help=True)
console = Console()


def _say(message: str) -> None:
    console.print(f"[dim]›[/dim] {message}")


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
def status() -> None:
    """Health of each component and the data counts."""
    from ingest.store import count_labels, latest_runs, make_engine

    settings = get_settings()
    table = Table("component", "state")
    states = stack.health(settings)
    for name, state in states.items():
        table.add_row(name, state)
    console.print(table)
    if settings.home_dir.exists():
        with Session(make_engine(settings.resolved_store_url)) as session:
            console.print(f"labels stored: {count_labels(session)}")
            for run in latest_runs(session):
                console.print(f"retrain {run.run_id}: {run.status} ({run.updated_at:%Y-%m-%d %H:%M:%S})")
    if not all(s.startswith("healthy") for s in states.values()):
        raise typer.Exit(1)


@app.command()
def demo(
    report: Annotated[Path | None, typer.Option(help="Write the run's report as JSON here.")] = None,
    keep_up: Annotated[bool, typer.Option(help="Leave the stack running afterwards.")] = False,
    n_proxy: Annotated[int, typer.Option(help="Proxy preferences to publish.")] = 3000,
    n_expert: Annotated[int, typer.Option(help="Expert labels to post through the webhook.")] = 60,
) -> None:
    """Drive one full cycle: events → store → conditions → training → gate → release → serving."""
    from proxyloop.demo import DemoFailed, run_demo

    settings = get_settings()
    try:
        result = run_demo(settings, _say, n_proxy=n_proxy, n_expert=n_expert, keep_up=keep_up)
    except (DemoFailed, stack.StackError) as exc:
        console.print(f"[red]demo failed:[/red] {exc}")
        raise typer.Exit(1) from exc
    if report:
        report.write_text(json.dumps(result, indent=2, default=str))
        _say(f"report written to {report}")
    console.print_json(json.dumps({k: result[k] for k in ("events", "conditions", "gate", "release", "serving",
                                                          "timings_s")}, default=str))
    ok = (result["events"]["stored"] == result["events"]["proxy_published"] + result["events"]["expert_published"]
          and result["serving"].get("status") == 200)
    if not ok:
        console.print("[red]demo finished but did not reach a served release[/red]")
        raise typer.Exit(1)


if __name__ == "__main__":
    app()

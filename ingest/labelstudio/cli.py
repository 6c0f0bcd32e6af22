"""`proxyloop labelstudio …`: provision the annotators' project and reconcile missed webhooks.

Run: `proxyloop labelstudio --help`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from ground.settings import get_settings

app = typer.Typer(help="Label Studio: provision the pairwise project, reconcile annotations.", no_args_is_help=True)
console = Console()


@app.command()
def setup(
    tasks: Annotated[Path | None, typer.Option(help="JSONL of tasks (prompt, answer_a, answer_b) to import.")] = None,
) -> None:
    """Create or reuse the pairwise project, import tasks, register the webhook with the shared secret."""
    from ingest.labelstudio.provision import LabelStudioSetupError, read_tasks, setup_project

    settings = get_settings()
    try:
        result = setup_project(settings, read_tasks(tasks) if tasks else None)
    except LabelStudioSetupError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc
    verb = "created" if result.created else "reused"
    console.print(f"project {result.project_id} ({verb}) at {settings.labelstudio_url}; "
                  f"{result.tasks_imported} tasks imported; webhook {result.webhook_id} → "
                  f"{settings.resolved_labelstudio_webhook_url}")
    if result.ml_backend_id is None:
        console.print(f"[yellow]ML backend not connected:[/yellow] {result.ml_backend_problem}. Start the HTTP app "
                      "(`proxyloop up`); a Label Studio reaching a private address needs ML_BLOCK_LOCAL_IP=false. "
                      "Then run setup again; until then tasks carry no pre-annotations or acquisition scores.")
    else:
        console.print(f"ML backend {result.ml_backend_id} → {settings.resolved_labelstudio_ml_backend_url}")


@app.command()
def reconcile(
    project: Annotated[int | None, typer.Option(help="Project id; default: the project titled as in settings.")] = None,
) -> None:
    """Publish annotations changed since the last run (and retract deleted ones) so none is missed."""
    from ingest.labelstudio.provision import LabelStudioSetupError
    from ingest.labelstudio.reconcile import reconcile as run_reconcile

    try:
        report = run_reconcile(get_settings(), project_id=project)
    except LabelStudioSetupError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc
    console.print(f"project {report.project_id}: {report.seen} annotations seen, {report.published} published, "
                  f"{report.retracted} retracted; watermark {report.watermark}")
    for reason in report.skipped:
        console.print(f"[yellow]skipped[/yellow] {reason}")

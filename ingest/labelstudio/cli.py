"""`proxyloop labelstudio …`: provision the annotators' project, reconcile missed webhooks, retract a deleted project.

Run: `proxyloop labelstudio --help`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from ground.settings import OperatorError, Settings, get_settings

app = typer.Typer(help="Label Studio: provision the pairwise project, reconcile annotations.", no_args_is_help=True)
console = Console()


@contextmanager
def _talking_to_labelstudio(settings: Settings) -> Iterator[None]:
    """Every command fails the same ways: Label Studio down or misaddressed (httpx), refusing the token or the
    request (the SDK's ApiError), or set up wrongly (LabelStudioSetupError). Each becomes one OperatorError line
    naming the setting to check, where the SDK would end in a few hundred lines of httpx traceback."""
    import httpx
    from label_studio_sdk.core.api_error import ApiError

    from ingest.labelstudio.provision import LabelStudioSetupError

    where = f"Label Studio at {settings.labelstudio_url}"
    try:
        yield
    except LabelStudioSetupError as exc:
        raise OperatorError(str(exc)) from exc
    except httpx.HTTPError as exc:
        raise OperatorError(f"{where} unreachable (PROXYLOOP_LABELSTUDIO_URL): {exc}") from exc
    except ApiError as exc:
        check = "PROXYLOOP_LABELSTUDIO_TOKEN" if exc.status_code in (401, 403) else "PROXYLOOP_LABELSTUDIO_URL"
        body = " ".join(str(exc.body).split())[:300]
        raise OperatorError(f"{where} answered {exc.status_code} ({check}): {body}") from exc


@app.command()
def setup(
    tasks: Annotated[Path | None, typer.Option(help="JSONL of tasks (prompt, answer_a, answer_b) to import.")] = None,
) -> None:
    """Create or reuse the pairwise project, import tasks, register the webhook with the shared secret."""
    from ingest.labelstudio.provision import read_tasks, setup_project

    settings = get_settings()
    with _talking_to_labelstudio(settings):
        result = setup_project(settings, read_tasks(tasks) if tasks else None)
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
    """Publish annotations changed since the last run (and retract the project's deleted ones) so none is missed."""
    from ingest.labelstudio.reconcile import reconcile as run_reconcile

    settings = get_settings()
    if not settings.store_url:
        settings.ensure_home()  # the watermark is kept in the default store: a fresh home made, an unusable one named
    with _talking_to_labelstudio(settings):
        report = run_reconcile(settings, project_id=project)
    console.print(f"project {report.project_id}: {report.seen} annotations seen, {report.published} published, "
                  f"{report.retracted} retracted; watermark {report.watermark}")
    for reason in report.skipped:
        console.print(f"[yellow]skipped[/yellow] {reason}")
    if report.unknown_note:
        console.print(f"[yellow]left alone[/yellow] {report.unknown_note}")


@app.command("retract-project")
def retract_project(
    project: Annotated[int, typer.Option(help="Id of the project deleted in Label Studio (required: named on purpose).",
                                         show_default=False)],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Count what would be retracted; publish nothing.")] = False,
) -> None:
    """Retract the labels of a project deleted in Label Studio, which reconcile leaves live on purpose. Refused while
    Label Studio has the project or cannot be reached; run with --dry-run first."""
    from ingest.labelstudio.reconcile import retract_project as run_retract

    settings = get_settings()
    if not settings.store_url:
        settings.ensure_home()  # the labels are read from the default store: a fresh home made, an unusable one named
    console.print(f"project {project}: asking Label Studio at {settings.labelstudio_url} whether it is gone …")
    with _talking_to_labelstudio(settings):
        report = run_retract(settings, project, dry_run=dry_run)
    found = (f"project {report.project_id} is gone; {report.retracted} of {report.live} live Label Studio labels "
             f"have no annotation there ({report.recorded} recorded as its; {report.retracted - report.recorded} of "
             f"{report.live - report.recorded} recording no project answered 404)")
    if report.dry_run:
        console.print(f"{found}: dry run, would retract {report.retracted}, published nothing")
    else:
        console.print(f"{found}: retracted {report.retracted} (published to {settings.topic_expert}; the consumer "
                      "stores them)")

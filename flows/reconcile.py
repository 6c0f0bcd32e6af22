"""The `reconcile-labelstudio` flow: pull Label Studio annotations a lost webhook would have missed.

Run: `python -m flows.reconcile` (one run); schedule it with a deployment (e.g. every 10 minutes).
Orchestration only: the work is `ingest.labelstudio.reconcile.reconcile`.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task

from ground.settings import get_settings
from ingest.labelstudio.reconcile import ReconcileReport, reconcile


@task(name="reconcile-project", retries=3, retry_delay_seconds=10)
def reconcile_project(project_id: int | None = None) -> ReconcileReport:
    return reconcile(get_settings(), project_id=project_id)


@flow(name="reconcile-labelstudio")
def reconcile_flow(project_id: int | None = None) -> dict[str, object]:
    """Publish annotations changed since the watermark, retract deleted ones; safe to repeat."""
    logger = get_run_logger()
    report = reconcile_project(project_id)
    logger.info("project %d: %d seen, %d published, %d retracted, %d skipped; watermark %s", report.project_id,
                report.seen, report.published, report.retracted, len(report.skipped), report.watermark)
    for reason in report.skipped:
        logger.warning("project %d: skipped %s", report.project_id, reason)
    if report.unknown_note:  # the run's own log line goes to proxyloop's logger, not the flow run's
        logger.warning("project %d: %s", report.project_id, report.unknown_note)
    return {"project_id": report.project_id, "seen": report.seen, "published": report.published,
            "retracted": report.retracted, "skipped": report.skipped, "unknown_project": report.unknown_project,
            "watermark": report.watermark.isoformat() if report.watermark else None}


if __name__ == "__main__":
    reconcile_flow()

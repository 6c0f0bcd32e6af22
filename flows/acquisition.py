"""The `refresh-acquisition` flow: re-score Label Studio's open tasks as expert labels arrive (issue 17).

Triggered by `proxyloop.acquisition.requested` (Label Studio's ML-backend webhook, policies/ml_backend.py)
and runnable by hand: `python -m flows.acquisition`. Each refresh leaves the open-task queue on its run
page (artifact `acquisition-queue`: count, score distribution, labels since the last refresh, the top
tasks; flows.artifacts). Orchestration only: the scores are `policies.acquisition.feature_scores`, the
cache /predict reads is `policies.ml_backend`.

After writing the cache the flow writes each task's prediction into Label Studio through its API
(`ingest.labelstudio.predictions`; the body is `policies.ml_backend.prediction`, as /predict's) and
selects the predictions' model version for the project: Label Studio never asks the ML backend again
about a task that holds a prediction, so without this the task list would keep the first scores.

Rate limit without losing a label: the deployment has concurrency_limit=1 with the ENQUEUE strategy (a
burst queues, refreshes never run side by side). A run requested before the last refresh started is
covered by it (that refresh read the labels stored by then) and returns at once ("skipped"); one
requested later waits until `min_interval_s` after the last refresh, then refreshes. A burst of labels
thus costs at most two refreshes, and the last label of it is always in one.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from time import sleep
from typing import Any

import numpy as np
from prefect import flow, get_run_logger, task
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.events import DeploymentEventTrigger
from sqlalchemy import select
from sqlalchemy.orm import Session

from flows.artifacts import publish_acquisition_queue
from ground.schemas import ACQUISITION_REQUESTED_EVENT, FeatureTriple, utcnow
from ground.settings import Settings, get_settings
from ingest.labelstudio.predictions import PushSummary, push_predictions, task_states
from ingest.labelstudio.provision import LabelStudioSetupError, client_for, find_project
from ingest.store import LabelRow, make_engine
from policies.acquisition import EnsembleConfig, feature_scores
from policies.features.model import TwoStagePolicy
from policies.loader import load
from policies.ml_backend import ScoreCache, is_our_version, prediction, read_cache, write_cache
from policies.registry import aliases

REFRESH_DEPLOYMENT = "refresh-acquisition/refresh-acquisition"
MIN_INTERVAL_S = 20.0  # refreshes start at least this many seconds after the last one ended
PUSH_TIMEOUT_S = 120.0  # writing the predictions into Label Studio


def project_id_for(settings: Settings, project_id: int | None = None) -> int:
    """The given Label Studio project, or the one with the settings' title."""
    pid = project_id or find_project(client_for(settings), settings.labelstudio_project_title)
    if pid is None:
        raise LabelStudioSetupError(f"no Label Studio project titled {settings.labelstudio_project_title!r}")
    return pid


def open_feature_tasks(settings: Settings, project_id: int | None = None) -> tuple[list[int], list[dict[str, Any]]]:
    """Ids and data of the project's tasks with no annotation yet that carry feature data (x, y_a, y_b)."""
    ids, data = [], []
    item: Any
    for item in client_for(settings).tasks.list(project=project_id_for(settings, project_id), fields="all",
                                                page_size=200):
        if item.annotations or not isinstance(item.data, dict) or "x" not in item.data:
            continue
        ids.append(int(item.id))
        data.append(item.data)
    return ids, data


def expert_triples(settings: Settings) -> list[FeatureTriple]:
    """The live expert feature triples in the store, in event-id order."""
    with Session(make_engine(settings.resolved_store_url)) as session:
        rows = session.scalars(select(LabelRow).where(LabelRow.kind == "expert", LabelRow.deleted.is_(False))
                               .order_by(LabelRow.event_id))
        items = [row.item for row in rows]
    return [FeatureTriple.model_validate(i) for i in items if isinstance(i, dict) and i.get("type") == "features"]


def production_released(settings: Settings) -> bool:
    """Whether the policy the scores come from has a production version (as `policies.loader.load` resolves it).
    Before it has, every annotation's refresh would fail, one queued run after another."""
    return "production" in aliases(settings.registry_dir, settings.policy_name)


@task(name="score-open-tasks")
def score_open_tasks(project_id: int | None, seed: int) -> ScoreCache:
    settings = get_settings()
    ids, data = open_feature_tasks(settings, project_id)
    policy = load(f"{settings.policy_name}@production")
    if not isinstance(policy.model, TwoStagePolicy):
        raise TypeError(f"{policy.version} is not a two-stage policy; acquisition scores need its adapter")
    x = np.array([d["x"] for d in data], dtype=np.float64).reshape(len(data), policy.config.input_dim)
    y_a = np.array([int(d["y_a"]) for d in data], dtype=np.int64)
    y_b = np.array([int(d["y_b"]) for d in data], dtype=np.int64)
    scores = feature_scores(policy.model, expert_triples(settings), x, y_a, y_b, EnsembleConfig(seed=seed))
    return ScoreCache.from_scores(ids, scores, f"{policy.version.policy}@{policy.version.version}")


@task(name="push-predictions")
def push_to_labelstudio(project_id: int | None, cache: ScoreCache) -> PushSummary:
    """Each task's prediction as /predict would answer it, written into Label Studio (labelled tasks: score 0)."""
    settings = get_settings()
    client = client_for(settings)
    pid = project_id_for(settings, project_id)
    bodies = {t: prediction(t, cache, labelled=labelled) for t, labelled in task_states(client, pid).items()}
    return push_predictions(client, pid, bodies, lambda v: is_our_version(v, settings.policy_name),
                            cache.model_version, timeout_s=PUSH_TIMEOUT_S)


def requested_at() -> datetime:
    """When this run was asked for: its scheduled start, which for a run an event started is its creation
    (Prefect keeps the first one while the run waits for the concurrency slot); now outside a flow run."""
    from prefect.runtime import flow_run

    return datetime.fromtimestamp(flow_run.scheduled_start_time.timestamp(), tz=UTC)


@flow(name="refresh-acquisition")
def refresh_acquisition_flow(min_interval_s: float = MIN_INTERVAL_S, project_id: int | None = None) -> dict[str, Any]:
    """Re-score the open tasks, store the scores /predict serves and write them into Label Studio. Skipped
    when a refresh that started after this run was requested covers it; otherwise it first waits until
    `min_interval_s` after the last refresh."""
    logger = get_run_logger()
    settings = get_settings()
    requested = requested_at()
    last = read_cache(settings)
    if last is not None and last.started_at is not None and last.started_at >= requested:
        logger.info("skipped: the refresh that started at %s, after this run was requested (%s), covered it",
                    last.started_at, requested)
        return {"status": "skipped", "refreshed_at": last.refreshed_at.isoformat()}
    if not production_released(settings):  # before the first release: nothing to score with, quickly
        logger.info("skipped: no %s@production released yet; open tasks are scored after the first release",
                    settings.policy_name)
        return {"status": "no-policy"}
    if last is not None:
        wait_s = (last.refreshed_at + timedelta(seconds=min_interval_s) - utcnow()).total_seconds()
        if wait_s > 0:
            logger.info("rate limit: the last refresh ended at %s; refreshing in %.1f s", last.refreshed_at, wait_s)
            sleep(wait_s)
    started = utcnow()
    project_id = project_id_for(settings, project_id)  # looked up once: scoring and the push use this project
    cache = score_open_tasks(project_id, seed=last.n_labels if last else 0)
    cache = cache.model_copy(update={"started_at": started, "refreshed_at": utcnow()})
    write_cache(settings, cache)
    publish_acquisition_queue(cache, last)  # the run page: the queue, its scores, labels since the last refresh
    values = np.array([t.score for t in cache.tasks.values()]) if cache.tasks else np.zeros(0)
    quantiles = np.quantile(values, [0.1, 0.5, 0.9]).round(4).tolist() if values.size else []
    logger.info("%d open tasks scored by %s (%s, %d expert labels); score quantiles 10/50/90%%: %s",
                len(cache.tasks), cache.model_version, cache.method, cache.n_labels, quantiles)
    try:
        pushed = push_to_labelstudio(project_id, cache)
    except Exception as exc:  # PredictionPushError, LabelStudioSetupError, or Label Studio unreachable
        raise RuntimeError(f"the new scores are in the cache (/predict serves them) but not in Label Studio's "
                           f"task list: {exc}") from exc
    logger.info("%d tasks updated in Label Studio in %.1f s (%d created, %d updated, %d duplicates deleted, "
                "%d unchanged); project model version %s", pushed.tasks_updated, pushed.seconds, pushed.created,
                pushed.updated, pushed.deleted, pushed.unchanged, cache.model_version)
    return {"status": "refreshed", "open_tasks": len(cache.tasks), "method": cache.method,
            "n_labels": cache.n_labels, "score_quantiles": quantiles, "model_version": cache.model_version,
            "labelstudio_tasks_updated": pushed.tasks_updated, "labelstudio_push_s": round(pushed.seconds, 3)}


def acquisition_deployment_options() -> dict[str, Any]:
    """`refresh-acquisition`: started by the ML backend's webhook event; one run at a time, a burst queued.

    The keywords of `Runner.add_flow` / `Flow.to_deployment` (flows.deployments serves it).
    """
    return {"name": "refresh-acquisition", "triggers": [DeploymentEventTrigger(expect={ACQUISITION_REQUESTED_EVENT})],
            "concurrency_limit": ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)}


if __name__ == "__main__":
    refresh_acquisition_flow()

"""The `refresh-acquisition` flow: re-score Label Studio's open tasks as expert labels arrive (issue 17).

Triggered by `proxyloop.acquisition.requested` (Label Studio's ML-backend webhook, policies/ml_backend.py)
and runnable by hand: `python -m flows.acquisition`. Each refresh leaves the open-task queue on its run
page (artifact `acquisition-queue`: count, score distribution, labels since the last refresh, the top
tasks; flows.artifacts). Orchestration only: the scores are `policies.acquisition.feature_scores`, the
cache /predict reads is `policies.ml_backend`.

Rate limit, two layers of Prefect's and one row of ours: the deployment has concurrency_limit=1 with
the ENQUEUE strategy (a burst queues, it never runs refreshes side by side), and a run that finds the
cache refreshed less than `min_interval_s` ago returns at once ("skipped"), so a burst of labels
costs one refresh plus cheap no-ops.
"""

from __future__ import annotations

from datetime import timedelta
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
from ingest.labelstudio.provision import LabelStudioSetupError, client_for, find_project
from ingest.store import LabelRow, make_engine
from policies.acquisition import EnsembleConfig, feature_scores
from policies.features.model import TwoStagePolicy
from policies.loader import load
from policies.ml_backend import ScoreCache, read_cache, write_cache
from policies.registry import aliases

REFRESH_DEPLOYMENT = "refresh-acquisition/refresh-acquisition"
MIN_INTERVAL_S = 20.0  # a burst within this many seconds of a refresh is one refresh


def open_feature_tasks(settings: Settings, project_id: int | None = None) -> tuple[list[int], list[dict[str, Any]]]:
    """Ids and data of the project's tasks with no annotation yet that carry feature data (x, y_a, y_b)."""
    client = client_for(settings)
    pid = project_id or find_project(client, settings.labelstudio_project_title)
    if pid is None:
        raise LabelStudioSetupError(f"no Label Studio project titled {settings.labelstudio_project_title!r}")
    ids, data = [], []
    item: Any
    for item in client.tasks.list(project=pid, fields="all", page_size=200):
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


@flow(name="refresh-acquisition")
def refresh_acquisition_flow(min_interval_s: float = MIN_INTERVAL_S, project_id: int | None = None) -> dict[str, Any]:
    """Re-score the open tasks and store the scores /predict serves; skipped when the last refresh
    is younger than `min_interval_s`."""
    logger = get_run_logger()
    settings = get_settings()
    last = read_cache(settings)
    if last is not None and utcnow() - last.refreshed_at < timedelta(seconds=min_interval_s):
        logger.info("skipped: scores refreshed at %s, less than %.0f s ago", last.refreshed_at, min_interval_s)
        return {"status": "skipped", "refreshed_at": last.refreshed_at.isoformat()}
    if not production_released(settings):  # before the first release: nothing to score with, quickly
        logger.info("skipped: no %s@production released yet; open tasks are scored after the first release",
                    settings.policy_name)
        return {"status": "no-policy"}
    cache = score_open_tasks(project_id, seed=last.n_labels if last else 0)
    write_cache(settings, cache)
    publish_acquisition_queue(cache, last)  # the run page: the queue, its scores, labels since the last refresh
    values = np.array([t.score for t in cache.tasks.values()]) if cache.tasks else np.zeros(0)
    quantiles = np.quantile(values, [0.1, 0.5, 0.9]).round(4).tolist() if values.size else []
    logger.info("%d open tasks scored by %s (%s, %d expert labels); score quantiles 10/50/90%%: %s",
                len(cache.tasks), cache.model_version, cache.method, cache.n_labels, quantiles)
    return {"status": "refreshed", "open_tasks": len(cache.tasks), "method": cache.method,
            "n_labels": cache.n_labels, "score_quantiles": quantiles, "model_version": cache.model_version}


def acquisition_deployment_options() -> dict[str, Any]:
    """`refresh-acquisition`: started by the ML backend's webhook event; one run at a time, a burst queued.

    The keywords of `Runner.add_flow` / `Flow.to_deployment` (flows.deployments serves it).
    """
    return {"name": "refresh-acquisition", "triggers": [DeploymentEventTrigger(expect={ACQUISITION_REQUESTED_EVENT})],
            "concurrency_limit": ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)}


if __name__ == "__main__":
    refresh_acquisition_flow()

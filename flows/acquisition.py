"""The `refresh-acquisition` flow: re-score Label Studio's open tasks as expert labels arrive (issue 17).

Triggered by `proxyloop.acquisition.requested` (Label Studio's ML-backend webhook, policies/ml_backend.py)
and runnable by hand: `python -m flows.acquisition`. Each refresh leaves the open-task queue on its run
page (artifact `acquisition-queue`: count, score distribution, labels since the last refresh, the top
tasks; flows.artifacts). Orchestration only: feature tasks are scored by `policies.features.acquisition.feature_scores`
under the production policy, chat tasks (text pairs) by `mixture_scores` under the chat release's stage-1 mixture
(flows.acquisition_chat); one project may hold both, and both go into the one cache /predict reads
(`policies.ml_backend`). A family with nothing released yet is skipped with the reason in the log.

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

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from time import sleep
from typing import Any

import numpy as np
from prefect import flow, get_run_logger, task
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.events import DeploymentEventTrigger
from prefect.exceptions import MissingContextError
from sqlalchemy.orm import Session

from flows.acquisition_chat import NoChatStage1, find_chat_stage1, open_text_pair, score_chat_tasks
from flows.artifacts import publish_acquisition_queue
from ground.moments import utcnow
from ground.schemas import ACQUISITION_REQUESTED_EVENT, FeatureTriple, PairwiseText
from ground.settings import Settings, get_settings
from ingest.labelstudio.predictions import PushSummary, push_predictions, task_states
from ingest.labelstudio.provision import LabelStudioSetupError, client_for, find_project
from ingest.store import live_expert_items, make_engine
from policies.features.acquisition import EnsembleConfig, feature_scores
from policies.features.model import TwoStagePolicy
from policies.loader import load
from policies.ml_backend import ScoreCache, is_our_version, prediction, read_cache, write_cache
from policies.registry import aliases

REFRESH_DEPLOYMENT = "refresh-acquisition/refresh-acquisition"
MIN_INTERVAL_S = 20.0  # refreshes start at least this many seconds after the last one ended
PUSH_TIMEOUT_S = 120.0  # writing the predictions into Label Studio
MALFORMED_LINES = 10  # malformed feature tasks named one per log line; the rest only counted


def project_id_for(settings: Settings, project_id: int | None = None) -> int:
    """The given Label Studio project, or the one with the settings' title."""
    pid = project_id or find_project(client_for(settings), settings.labelstudio_project_title)
    if pid is None:
        raise LabelStudioSetupError(f"no Label Studio project titled {settings.labelstudio_project_title!r}")
    return pid


@dataclass
class OpenTasks:
    """A project's tasks with no annotation yet, by kind (ids and data in Label Studio's order)."""

    feature_ids: list[int] = field(default_factory=list)
    feature_data: list[dict[str, Any]] = field(default_factory=list)  # x, y_a, y_b
    text_ids: list[int] = field(default_factory=list)
    text_pairs: list[PairwiseText] = field(default_factory=list)  # prompt, answer_a, answer_b; read a vs b
    other: int = 0  # open tasks of neither kind: never scored


def open_tasks(settings: Settings, project_id: int | None = None) -> OpenTasks:
    """The project's open tasks: feature tasks carry x (and y_a, y_b), text pairs a prompt and two answers."""
    tasks = OpenTasks()
    item: Any
    for item in client_for(settings).tasks.list(project=project_id_for(settings, project_id), fields="all",
                                                page_size=200):
        if item.annotations:
            continue
        if isinstance(item.data, dict) and "x" in item.data:
            tasks.feature_ids.append(int(item.id))
            tasks.feature_data.append(item.data)
        elif (pair := open_text_pair(item.data)) is not None:
            tasks.text_ids.append(int(item.id))
            tasks.text_pairs.append(pair)
        else:
            tasks.other += 1
    return tasks


def expert_triples(settings: Settings) -> list[FeatureTriple]:
    """The live expert feature triples in the store, in event-id order."""
    with Session(make_engine(settings.resolved_store_url)) as session:
        return live_expert_items(session, FeatureTriple)


def production_released(settings: Settings) -> bool:
    """Whether the policy the scores come from has a production version (as `policies.loader.load` resolves it).
    Before it has, every annotation's refresh would fail, one queued run after another."""
    return "production" in aliases(settings.registry_dir, settings.policy_name)


def nothing_to_score_with(settings: Settings) -> str | None:
    """Why no open task can be scored yet (no feature policy released and no chat stage 1), or None."""
    if production_released(settings):
        return None
    try:
        find_chat_stage1(settings)
    except NoChatStage1 as reason:
        return f"no {settings.policy_name}@production released yet, and {reason}"
    return None


@dataclass
class FeatureRows:
    """Open feature tasks as the scorer reads them: the well-formed ones as arrays, the rest with the reason."""

    ids: list[int]
    x: np.ndarray  # [tasks, input_dim]
    y_a: np.ndarray  # [tasks] output ids
    y_b: np.ndarray
    malformed: dict[int, str] = field(default_factory=dict)  # task id -> why it is not scored


def _output_id(value: Any) -> int | None:
    """An output id as Label Studio's JSON may carry it (7, 7.0 or "7"); None for anything else (True, 7.5, "a")."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


def _feature_row(data: Any, input_dim: int, n_outputs: int) -> tuple[np.ndarray, int, int] | str:
    """One task's (x, y_a, y_b) for a policy with this input dimension and these outputs, or why it cannot be scored."""
    if not isinstance(data, dict):
        return "data is not an object"
    missing = [key for key in ("x", "y_a", "y_b") if key not in data]
    if missing:
        return f"no {', '.join(missing)}"
    if isinstance(data["x"], str):  # numpy would read "0.5" as a number and "0.1,0.2" not at all
        return "x is a string, not a list of numbers"
    try:
        x = np.asarray(data["x"], dtype=np.float64)
    except (TypeError, ValueError):
        return "x is not a list of numbers"
    if x.shape != (input_dim,):
        return f"x has shape {x.shape}, the policy reads {input_dim} numbers"
    if not np.isfinite(x).all():
        return "x has NaN or infinite values"
    y: list[int] = []
    for name in ("y_a", "y_b"):
        value = _output_id(data[name])
        if value is None:
            return f"{name} {data[name]!r:.40} is not an output id"
        if not 0 <= value < n_outputs:
            return f"{name} {value} is outside the policy's outputs 0..{n_outputs - 1}"
        y.append(value)
    if y[0] == y[1]:
        return f"y_a and y_b are both {y[0]}: nothing to compare"
    return x, y[0], y[1]


def feature_rows(ids: list[int], data: list[dict[str, Any]], input_dim: int, n_outputs: int) -> FeatureRows:
    """The open feature tasks split into those a policy of this shape can score and the malformed rest. Checked task
    by task, not left to `feature_scores` (which refuses the whole batch): tasks are imported into Label Studio by
    hand, and one with a missing field or a stale output id must not keep every open task's score stale."""
    good: list[int] = []
    rows: list[tuple[np.ndarray, int, int]] = []
    malformed: dict[int, str] = {}
    for task_id, task_data in zip(ids, data, strict=True):
        row = _feature_row(task_data, input_dim, n_outputs)
        if isinstance(row, str):
            malformed[task_id] = row
        else:
            good.append(task_id)
            rows.append(row)
    x = np.array([r[0] for r in rows], dtype=np.float64).reshape(len(rows), input_dim)
    y_a = np.array([r[1] for r in rows], dtype=np.int64)
    y_b = np.array([r[2] for r in rows], dtype=np.int64)
    return FeatureRows(good, x, y_a, y_b, malformed)


def _logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    # The run logger exists only inside a flow run; `.fn()` in tests and scripts has none.
    try:
        return get_run_logger()  # type: ignore[return-value]
    except MissingContextError:
        return logging.getLogger("proxyloop.flows.acquisition")


def log_malformed(malformed: dict[int, str], scored: int, limit: int = MALFORMED_LINES) -> None:
    """Name the malformed feature tasks (id and reason), at most `limit` lines: enough to find and fix a bad import,
    bounded so a whole bad batch does not flood the run log."""
    if not malformed:
        return
    logger = _logger()
    logger.warning("%d open feature tasks are malformed and not scored (the other %d are)", len(malformed), scored)
    for task_id, reason in list(malformed.items())[:limit]:
        logger.warning("feature task %d not scored: %s", task_id, reason)
    if len(malformed) > limit:
        logger.warning("... and %d more malformed feature tasks", len(malformed) - limit)


def score_feature_tasks(settings: Settings, ids: list[int], data: list[dict[str, Any]], seed: int) -> ScoreCache:
    """Open feature tasks scored under the production policy and the store's expert triples; malformed ones are
    logged and left out (/predict answers them as unscored)."""
    policy = load(f"{settings.policy_name}@production")
    if not isinstance(policy.model, TwoStagePolicy):
        raise TypeError(f"{policy.version} is not a two-stage policy; acquisition scores need its adapter")
    rows = feature_rows(ids, data, policy.model.config.input_dim, policy.model.config.n_outputs)
    log_malformed(rows.malformed, len(rows.ids))
    scores = feature_scores(policy.model, expert_triples(settings), rows.x, rows.y_a, rows.y_b,
                            EnsembleConfig(seed=seed))
    return ScoreCache.from_scores(rows.ids, scores, f"{policy.version.policy}@{policy.version.version}")


@task(name="score-open-tasks")
def score_open_tasks(project_id: int | None, seed: int) -> ScoreCache:
    """Every open task scored by its kind's scorer, into one cache: feature tasks under the production policy, text
    pairs under the chat release's stage-1 mixture (flows.acquisition_chat). A kind with nothing to score it yet is
    left out with the reason logged; /predict answers its tasks as unscored. The cache names the versions of the
    kinds whose tasks it scored (the project selects one version string for all its predictions)."""
    settings, logger = get_settings(), get_run_logger()
    tasks = open_tasks(settings, project_id)
    parts: list[ScoreCache] = []
    if production_released(settings):
        parts.append(score_feature_tasks(settings, tasks.feature_ids, tasks.feature_data, seed))
    elif tasks.feature_ids:
        logger.info("%d open feature tasks not scored: no %s@production released yet", len(tasks.feature_ids),
                    settings.policy_name)
    try:
        stage1 = find_chat_stage1(settings)
    except NoChatStage1 as reason:
        if tasks.text_ids:
            logger.info("%d open chat tasks not scored: %s", len(tasks.text_ids), reason)
    else:
        chat = score_chat_tasks(settings, stage1, tasks.text_ids, tasks.text_pairs, seed)
        parts.append(chat)
        logger.info("%d open chat tasks scored under the stage-1 mixture of run %s (%s, %d expert text pairs)",
                    len(chat.tasks), stage1.run_id, stage1.model_version, chat.n_labels)
    if tasks.other:
        logger.info("%d open tasks are neither feature tasks (x, y_a, y_b) nor text pairs (prompt, answer_a, "
                    "answer_b): not scored", tasks.other)
    return ScoreCache.combined([part for part in parts if part.tasks] or parts[:1])


@task(name="push-predictions")
def push_to_labelstudio(project_id: int | None, cache: ScoreCache) -> PushSummary:
    """Each task's prediction as /predict would answer it, written into Label Studio (labelled tasks: score 0)."""
    settings = get_settings()
    client = client_for(settings)
    pid = project_id_for(settings, project_id)
    bodies = {t: prediction(t, cache, labelled=labelled) for t, labelled in task_states(client, pid).items()}
    names = (settings.policy_name, settings.chat_policy_name)
    return push_predictions(client, pid, bodies, lambda v: is_our_version(v, *names), cache.model_version,
                            timeout_s=PUSH_TIMEOUT_S)


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
    missing = nothing_to_score_with(settings)
    if missing:  # before the first release of either family: nothing to score with, quickly
        logger.info("skipped: %s", missing)
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

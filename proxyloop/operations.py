"""What `proxyloop status` reports: component health, lag per partition and its trend, dead letters
by reason, queues, counts, runs, versions.

Each probe answers None when its service is unreachable, so status works on a half-up stack.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from ground.moments import utcnow
from ground.settings import Settings
from ingest.dead_letters import count_by_reason
from ingest.lag import LagUnavailable, PartitionTrend, current_trend, measure_lag, sample_lag
from ingest.store import RetrainRun, count_labels, latest_runs, make_engine, run_record
from policies.registry import aliases, list_policies
from proxyloop import stack

if TYPE_CHECKING:
    from policies.ml_backend import ScoreCache


@dataclass
class Overview:
    components: dict[str, str] = field(default_factory=dict)
    partitions: list[PartitionTrend] | None = None  # None: the broker did not answer (see lag_error)
    lag_error: str | None = None
    dead_letters_by_reason: dict[str, int] | None = None  # None: no store yet
    queue_depths: dict[str, int] | None = None  # per queue, and "unacked": taken by a worker, not acknowledged
    active_tasks: list[str] | None = None
    labels: dict[str, int] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)
    production: dict[str, int] = field(default_factory=dict)
    acquisition: dict[str, Any] | None = None  # the open-task queue; None before the first refresh

    @property
    def lag_total(self) -> int | None:
        return None if self.partitions is None else sum(p.lag for p in self.partitions)

    @property
    def consumer_stalled(self) -> bool:
        return any(p.stalled for p in self.partitions or [])

    @property
    def healthy(self) -> bool:
        """What status's exit code says: every component healthy and the consumer not stalled."""
        return all(s.startswith("healthy") for s in self.components.values()) and not self.consumer_stalled

    def as_json(self) -> dict[str, Any]:
        """The `proxyloop status --json` object; its key names are a contract for scripts and monitors."""
        return {
            "components": self.components,
            "partitions": None if self.partitions is None else [_partition_json(p) for p in self.partitions],
            "lag_total": self.lag_total,
            "lag_error": self.lag_error,
            "consumer_stalled": self.consumer_stalled,
            "dead_letters_by_reason": self.dead_letters_by_reason,
            "labels": self.labels,
            "queues": {"depths": self.queue_depths, "active_tasks": self.active_tasks},
            "runs": self.runs,
            "production": self.production,
            "acquisition": self.acquisition,
        }


def _partition_json(trend: PartitionTrend) -> dict[str, Any]:
    values = asdict(trend)
    for key in ("at", "growing_since", "stalled_since"):
        values[key] = values[key].isoformat() if values[key] is not None else None
    return values


def celery_figures(settings: Settings) -> tuple[dict[str, int] | None, list[str] | None]:
    """(queued messages per queue, tasks running on workers) via the broker and worker control. A Redis broker's
    figures end with "unacked": messages taken by a worker and not acknowledged (kombu's `unacked` hash). One that
    no active task accounts for is a task whose worker died: Redis redelivers it only after the visibility timeout."""
    import redis

    from workers.app import CPU_QUEUE, GPU_QUEUE, app

    try:
        client = redis.Redis.from_url(settings.celery_broker, socket_timeout=2)
        queued = {queue: int(client.llen(queue)) for queue in (GPU_QUEUE, CPU_QUEUE)}
        depths: dict[str, int] | None = {**queued, "unacked": int(client.hlen("unacked"))}
    except (redis.ConnectionError, redis.TimeoutError):
        return None, None  # worker control goes through the same broker: asking would only wait out its retries
    except Exception:  # noqa: BLE001 - not Redis (RabbitMQ): no queue depths, workers can still answer
        depths = None
    try:
        active = app.control.inspect(timeout=1.0).active() or {}
        tasks = [f"{t['name']} {t['id']} on {worker}" for worker, running in active.items() for t in running]
    except Exception:  # noqa: BLE001
        tasks = None
    return depths, tasks


def _run_row(run: RetrainRun) -> dict[str, Any]:
    record = run_record(run)
    return {"run_id": run.run_id, "status": run.status, "updated": f"{run.updated_at:%Y-%m-%d %H:%M:%S}",
            "plan": record.conditions.plan if record.conditions else None,
            "gate": record.gate.decision if record.gate else None,
            "version": record.release.version if record.release else None}


def recent_runs(settings: Settings, limit: int = 10) -> list[dict[str, Any]]:
    """The latest retrain runs with plan, gate decision and released version (empty without a store)."""
    if not settings.store_exists():
        return []
    with Session(make_engine(settings.resolved_store_url)) as session:
        return [_run_row(r) for r in latest_runs(session, limit=limit)]


def overview(settings: Settings) -> Overview:
    """Everything status shows. Records a lag sample each call, so two calls seconds apart show a trend."""
    keeps_samples = settings.store_exists()  # first: an unusable home is an error, not "no store", so no probing
    view = Overview(components=stack.health(settings))
    now = utcnow()
    try:
        lags = sample_lag(settings, now) if keeps_samples else measure_lag(settings)
    except LagUnavailable as exc:
        lags, view.lag_error = None, str(exc)
    view.queue_depths, view.active_tasks = celery_figures(settings)
    if keeps_samples:
        with Session(make_engine(settings.resolved_store_url)) as session:
            if lags is not None:
                view.partitions = current_trend(session, settings, now)
            view.dead_letters_by_reason = count_by_reason(session)
            view.labels = count_labels(session)
        view.runs = recent_runs(settings)
    elif lags is not None:  # nowhere to keep samples: the current figures, no trend
        view.partitions = [PartitionTrend(lag.topic, lag.partition, lag.end_offset, lag.committed, lag.lag, now,
                                          False, None, False, None) for lag in lags]
    view.production = {name: aliases(settings.registry_dir, name).get("production", 0)
                       for name in list_policies(settings.registry_dir)}
    from policies.ml_backend import read_cache  # imports the scorer (torch): only when status is asked

    view.acquisition = acquisition_queue(read_cache(settings), view.labels.get("expert", 0))
    return view


def acquisition_queue(cache: ScoreCache | None, expert_labels: int) -> dict[str, Any] | None:
    """The open-task queue as the last acquisition refresh left it: how many tasks, how their scores spread,
    and how many expert labels the store holds beyond those the scores were computed from."""
    if cache is None:
        return None
    scores = sorted(t.score for t in cache.tasks.values())
    spread = {"min": scores[0], "median": statistics.median(scores), "max": scores[-1]} if scores else None
    return {"open_tasks": len(scores), "scores": spread, "method": cache.method, "model_version": cache.model_version,
            "refreshed_at": cache.refreshed_at.isoformat(),
            "labels_since_refresh": max(0, expert_labels - cache.n_labels)}

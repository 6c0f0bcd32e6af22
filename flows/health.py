"""The `ingest-health` flow: sample consumer lag and raise Prefect events when ingest is in trouble.

Run: `python -m flows.health` (one run); `python -m flows.deployments` runs it every
PROXYLOOP_HEALTH_INTERVAL_S seconds. Orchestration only: measuring and judging lag is `ingest.lag`.
Attach a Prefect automation (a notification, say) to the two events; docs/operators.md shows how.
"""

# No `from __future__ import annotations`: the runner pickles this flow by value (flows.deployments)
# and validates its `now` parameter there, where a string annotation could not be resolved.
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from prefect import flow, get_run_logger
from prefect.events import emit_event
from prefect.exceptions import MissingContextError
from sqlalchemy.orm import Session

from ground.moments import utcnow
from ground.settings import Settings, get_settings
from ingest.lag import PartitionTrend, current_trend, sample_lag
from ingest.store import make_engine

LAG_GROWING_EVENT = "proxyloop.ingest.lag-growing"
CONSUMER_STALLED_EVENT = "proxyloop.ingest.consumer-stalled"


@dataclass(frozen=True)
class IngestHealth:
    """One run's verdict: every partition's trend, the ones alerted on, and the events emitted."""

    at: datetime
    partitions: list[PartitionTrend]
    lag_growing: list[PartitionTrend]
    stalled: list[PartitionTrend]
    events: list[str]


@flow(name="ingest-health")
def ingest_health_flow(now: datetime | None = None) -> IngestHealth:
    """Record a lag sample; emit `lag-growing` for partitions whose lag rose over a whole
    PROXYLOOP_LAG_ALERT_AFTER_S window, `consumer-stalled` for those the consumer has not committed
    on for PROXYLOOP_CONSUMER_STALL_AFTER_S while lag waited. Emitted on every run while it holds.

    `now` is for tests, which lay samples minutes apart without waiting. A broker that does not
    answer raises `ingest.lag.LagUnavailable`, so the run fails visibly in the Prefect UI.
    """
    logger = _logger()
    settings = get_settings()
    now = now or utcnow()
    sample_lag(settings, now)
    with Session(make_engine(settings.resolved_store_url)) as session:
        trends = current_trend(session, settings, now)
    window = timedelta(seconds=settings.lag_alert_after_s)
    growing = [t for t in trends if t.growing_since is not None and now - t.growing_since >= window]
    stalled = [t for t in trends if t.stalled]
    events = []
    for name, partitions, since in ((LAG_GROWING_EVENT, growing, "growing_since"),
                                    (CONSUMER_STALLED_EVENT, stalled, "stalled_since")):
        if partitions:
            _emit(name, settings, partitions, since)
            events.append(name)
            logger.warning("group %s: %s on %s", settings.consumer_group, name,
                           ", ".join(f"{t.topic}[{t.partition}] lag {t.lag}" for t in partitions))
    logger.info("group %s: lag %d over %d partitions", settings.consumer_group, sum(t.lag for t in trends),
                len(trends))
    return IngestHealth(now, trends, growing, stalled, events)


def _emit(name: str, settings: Settings, partitions: list[PartitionTrend], since_field: str) -> None:
    """One event per kind and run, on the consumer group as resource; payload: partitions, lag, since when."""
    rows = [{"topic": t.topic, "partition": t.partition, "lag": t.lag, "end_offset": t.end_offset,
             "committed": t.committed, "since": getattr(t, since_field).isoformat()} for t in partitions]
    emit_event(
        event=name,
        resource={"prefect.resource.id": f"proxyloop.ingest.consumer-group.{settings.consumer_group}",
                  "prefect.resource.name": settings.consumer_group},
        payload={"consumer_group": settings.consumer_group, "lag": sum(t.lag for t in partitions),
                 "since": min(row["since"] for row in rows), "partitions": rows},
    )


def _logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    # The run logger exists only inside a flow run; `.fn()` in tests and scripts has none.
    try:
        return get_run_logger()  # type: ignore[return-value]
    except MissingContextError:
        return logging.getLogger("proxyloop.flows.health")


if __name__ == "__main__":
    ingest_health_flow()

"""Consumer lag per label-topic partition, sampled into the store so its trend can be judged.

A total lag of 40 says nothing about whether ingest is healthy; 40 that was 10 five minutes ago,
with the same committed offset all along, says the consumer is stuck (a poison record once made it
rewind one batch 149 times while `proxyloop status` showed nothing wrong). Both `proxyloop status`
and the `ingest-health` flow call `sample_lag` and then `lag_trend`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError
from sqlalchemy import DateTime, Index, Integer, String, and_, delete, func, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from ground.moments import as_utc, utcnow
from ground.settings import Settings
from ingest.store import Base, make_engine


class LagUnavailable(RuntimeError):
    """The broker did not answer the offset queries; the message names the broker and the cause."""


class LagSample(Base):
    """One measurement of one partition; rows older than Settings.lag_history_s are deleted."""

    __tablename__ = "lag_samples"
    # Serves the trend's "newest sample before the window" per partition without scanning a day of rows.
    __table_args__ = (Index("ix_lag_samples_partition_at", "consumer_group", "topic", "partition", "at"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    consumer_group: Mapped[str] = mapped_column(String(256))
    topic: Mapped[str] = mapped_column(String(256))
    partition: Mapped[int] = mapped_column(Integer)
    end_offset: Mapped[int] = mapped_column(Integer)
    committed: Mapped[int | None] = mapped_column(Integer, nullable=True)
    lag: Mapped[int] = mapped_column(Integer)


@dataclass(frozen=True)
class PartitionLag:
    """Where one partition stands for the consumer group; `committed` is None before its first commit."""

    topic: str
    partition: int
    end_offset: int
    committed: int | None
    lag: int


@dataclass(frozen=True)
class PartitionTrend:
    """The newest sample of a partition and what the samples before it say (see `lag_trend`)."""

    topic: str
    partition: int
    end_offset: int
    committed: int | None
    lag: int
    at: datetime
    growing: bool
    growing_since: datetime | None
    stalled: bool
    stalled_since: datetime | None


def label_partitions(consumer: KafkaConsumer, settings: Settings) -> list[TopicPartition]:
    """Every partition of the two label topics the ingest consumer group reads, in a stable order."""
    return [TopicPartition(topic, p) for topic in (settings.topic_expert, settings.topic_proxy)
            for p in sorted(consumer.partitions_for_topic(topic) or [])]


def measure_lag(settings: Settings) -> list[PartitionLag]:
    """End offset, committed offset of `settings.consumer_group` and their difference per partition.

    A partition the group never committed on counts from its first offset (what the consumer, which
    starts at the earliest record, has left to read). On the embedded Tansu broker end offsets count
    produced batches rather than records, so lag reads low there (still above 0 while behind).
    Raises LagUnavailable when the broker cannot be reached or does not answer.
    """
    try:
        # A group id without subscribe(): reads the group's committed offsets without joining it.
        consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=settings.consumer_group,
                                 enable_auto_commit=False, request_timeout_ms=3000, bootstrap_timeout_ms=3000,
                                 isolation_level=settings.kafka_isolation_level)  # ends as the consumer reads them
    except KafkaError as exc:
        raise LagUnavailable(f"Kafka at {settings.kafka_bootstrap} unreachable: {exc!r}") from exc
    try:
        partitions = label_partitions(consumer, settings)
        ends = consumer.end_offsets(partitions)
        starts = consumer.beginning_offsets(partitions)
        lags = []
        for tp in partitions:
            committed = consumer.committed(tp)
            start = committed if committed is not None else starts[tp]
            # Clamped: on Tansu a committed record offset can pass the batch-counted end offset.
            lags.append(PartitionLag(tp.topic, tp.partition, ends[tp], committed, max(0, ends[tp] - start)))
        return lags
    except KafkaError as exc:
        raise LagUnavailable(f"Kafka at {settings.kafka_bootstrap} did not answer the offset queries: {exc!r}") \
            from exc
    finally:
        consumer.close()


def record_lag(session: Session, group: str, lags: Iterable[PartitionLag], at: datetime, keep_s: float) -> None:
    """Store one sample per partition of `group` taken at `at`; delete samples older than `keep_s` before it.

    The caller commits. Deleting here keeps the table bounded without a separate clean-up job.
    """
    at = at.astimezone(UTC)
    session.add_all(LagSample(at=at, consumer_group=group, topic=lag.topic, partition=lag.partition,
                              end_offset=lag.end_offset, committed=lag.committed, lag=lag.lag) for lag in lags)
    session.execute(delete(LagSample).where(LagSample.at < at - timedelta(seconds=keep_s)))


def sample_lag(settings: Settings, now: datetime | None = None) -> list[PartitionLag]:
    """Measure lag now (`measure_lag`) and record it in the store as of `now` (default: the clock).

    `now` is injectable so that tests can lay samples minutes apart without waiting minutes.
    """
    lags = measure_lag(settings)
    with Session(make_engine(settings.resolved_store_url)) as session:
        record_lag(session, settings.consumer_group, lags, now or utcnow(), settings.lag_history_s)
        session.commit()
    return lags


def current_trend(session: Session, settings: Settings, now: datetime | None = None) -> list[PartitionTrend]:
    """`lag_trend` for the configured group and label topics, over the alert window and stall time."""
    return lag_trend(session, settings.consumer_group, (settings.topic_expert, settings.topic_proxy),
                     settings.lag_alert_after_s, settings.consumer_stall_after_s, now)


def lag_trend(session: Session, group: str, topics: Collection[str], window_s: float, stall_after_s: float,
              now: datetime | None = None) -> list[PartitionTrend]:
    """Per partition of `topics` sampled for `group` in the last `window_s` seconds: its newest
    sample, whether its lag is growing, whether the consumer is stalled on it.

    Read per partition: the samples of the last max(window_s, stall_after_s) seconds, and the newest
    one before them (however old), so both judgements have their starting sample.

    Growing: the baseline is the newest sample taken at or before `now - window_s` (or, with no
    sample that old, the oldest one); the lag is growing when it is higher in the newest sample than
    in the baseline and above 0 in every sample from the baseline on. Between samples it may have
    touched 0 unseen; sampling every minute makes that a short blip at most. `growing_since` is the
    baseline's time: `now - growing_since >= window_s` means the lag has been rising over a whole
    window (what the `lag-growing` event requires); less means the history is shorter than the
    window (a fresh store: two `proxyloop status` calls seconds apart).

    Stalled: the lag is above 0 and the committed offset equal to the newest one in every sample
    from one taken at or before `now - stall_after_s` to the newest; `stalled_since` is the oldest
    such sample read. The consumer then had work waiting all that time and committed nothing: it
    is down, or stuck rewinding a batch. Requiring lag above 0 throughout keeps an idle consumer
    (nothing to read, nothing committed) from reading as stalled the moment a record arrives.
    """
    now = (now or utcnow()).astimezone(UTC)
    window, stall = timedelta(seconds=window_s), timedelta(seconds=stall_after_s)
    horizon = now - max(window, stall)
    ours = (LagSample.consumer_group == group, LagSample.topic.in_(topics))
    newest_before = (select(LagSample.topic, LagSample.partition, func.max(LagSample.at).label("at"))
                     .where(*ours, LagSample.at <= horizon).group_by(LagSample.topic, LagSample.partition)
                     .subquery())
    anchors = select(LagSample).join(newest_before, and_(
        LagSample.topic == newest_before.c.topic, LagSample.partition == newest_before.c.partition,
        LagSample.at == newest_before.c.at)).where(*ours)
    recent = select(LagSample).where(*ours, LagSample.at > horizon, LagSample.at <= now)
    samples: dict[tuple[str, int], list[LagSample]] = defaultdict(list)
    for query in (anchors, recent):
        for sample in session.scalars(query.order_by(LagSample.at, LagSample.id)):
            samples[(sample.topic, sample.partition)].append(sample)
    trends = []
    for (topic, partition), series in sorted(samples.items()):
        newest = series[-1]
        if as_utc(newest.at) <= now - window:
            continue  # no recent sample: the broker was unreachable, nothing current to judge
        since_growing = _growing_since(series, now - window)
        since_stalled = _stalled_since(series, now - stall)
        trends.append(PartitionTrend(topic, partition, newest.end_offset, newest.committed, newest.lag,
                                     as_utc(newest.at), since_growing is not None, since_growing,
                                     since_stalled is not None, since_stalled))
    return trends


def _growing_since(series: Sequence[LagSample], window_start: datetime) -> datetime | None:
    before = [i for i, s in enumerate(series) if as_utc(s.at) <= window_start]
    considered = series[before[-1] if before else 0:]
    if len(considered) < 2 or considered[-1].lag <= considered[0].lag or min(s.lag for s in considered) <= 0:
        return None
    return as_utc(considered[0].at)


def _stalled_since(series: Sequence[LagSample], stall_start: datetime) -> datetime | None:
    newest = series[-1]
    start = len(series) - 1
    while start > 0 and series[start - 1].lag > 0 and series[start - 1].committed == newest.committed:
        start -= 1
    if newest.lag <= 0 or as_utc(series[start].at) > stall_start:
        return None
    return as_utc(series[start].at)

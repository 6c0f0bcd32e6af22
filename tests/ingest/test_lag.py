"""Lag per partition, its trend, and the ingest-health flow's events.

Real broker (the session's Tansu) for measuring; samples with injected timestamps for the window
logic, so no test waits minutes. On Tansu an end offset counts produced batches: each record here
is sent and acknowledged alone (one record, one batch), which makes the offsets exact.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, TopicPartition
from kafka.structs import OffsetAndMetadata
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from flows import health
from ground.schemas import FeatureTriple, ProxyPreference
from ground.settings import Settings
from ingest.bus import encode_event, make_producer
from ingest.lag import LagSample, PartitionLag, current_trend, lag_trend, measure_lag, record_lag, sample_lag
from ingest.store import make_engine
from tests.conftest import consumer_in_thread, export, own_topics, wait_until

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def settings(service_settings: Settings, kafka: str, tmp_path: Path) -> Settings:
    return own_topics(service_settings, tmp_path, kafka_session_timeout_ms=1000, kafka_heartbeat_interval_ms=300)


def publish_one_by_one(settings: Settings, topic: str, partition: int, count: int, start: int = 0) -> None:
    """`count` valid proxy preferences to one partition, each acknowledged before the next (one batch each)."""
    producer = make_producer(settings)
    try:
        for i in range(start, start + count):
            event = ProxyPreference(event_id=f"{topic}-{partition}-{i}", proxy_name="judge",
                                    item=FeatureTriple(x=[float(i)], y_w=0, y_l=1))
            producer.send(topic, key=event.event_id.encode(), value=encode_event(event), partition=partition).get(30)
    finally:
        producer.close()


def consume_and_commit(settings: Settings, tp: TopicPartition, count: int) -> None:
    """Read the first `count` records of one partition as the group would, and commit past them."""
    reader = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=settings.consumer_group,
                           enable_auto_commit=False)
    try:
        reader.assign([tp])
        reader.seek_to_beginning(tp)
        records: list[Any] = []
        wait_until(lambda: records.extend(reader.poll(timeout_ms=200).get(tp, [])) or len(records) >= count, 30,
                   f"{count} records on {tp}")
        reader.commit({tp: OffsetAndMetadata(records[count - 1].offset + 1, "", -1)})
    finally:
        reader.close()


def test_lag_per_partition_is_published_minus_committed_for_the_group(settings: Settings) -> None:
    publish_one_by_one(settings, settings.topic_proxy, 0, 3)
    publish_one_by_one(settings, settings.topic_proxy, 1, 5)
    publish_one_by_one(settings, settings.topic_expert, 2, 2)
    consume_and_commit(settings, TopicPartition(settings.topic_proxy, 0), 2)

    lags = sample_lag(settings, T0)

    assert lags == [
        PartitionLag(settings.topic_expert, 0, 0, None, 0),
        PartitionLag(settings.topic_expert, 1, 0, None, 0),
        PartitionLag(settings.topic_expert, 2, 2, None, 2),
        PartitionLag(settings.topic_proxy, 0, 3, 2, 1),
        PartitionLag(settings.topic_proxy, 1, 5, None, 5),
        PartitionLag(settings.topic_proxy, 2, 0, None, 0),
    ]
    with Session(make_engine(settings.resolved_store_url)) as session:
        stored = session.scalars(select(LagSample).order_by(LagSample.id)).all()
    assert [(s.topic, s.partition, s.end_offset, s.committed, s.lag, s.consumer_group) for s in stored] == [
        (lag.topic, lag.partition, lag.end_offset, lag.committed, lag.lag, settings.consumer_group) for lag in lags]


def test_lag_grows_when_records_arrive_between_samples_and_nobody_consumes(settings: Settings) -> None:
    publish_one_by_one(settings, settings.topic_proxy, 1, 1)
    sample_lag(settings, T0)
    publish_one_by_one(settings, settings.topic_proxy, 1, 2, start=1)
    sample_lag(settings, T0 + timedelta(seconds=10))

    with Session(make_engine(settings.resolved_store_url)) as session:
        trends = current_trend(session, settings, T0 + timedelta(seconds=10))

    growing = [(t.topic, t.partition, t.lag, t.growing_since) for t in trends if t.growing]
    assert growing == [(settings.topic_proxy, 1, 3, T0)]
    assert [t.stalled for t in trends] == [False] * 6  # 10 s of samples: short of the 120 s stall time


def test_lag_with_no_commit_for_the_stall_time_is_stalled_until_a_consumer_commits(settings: Settings) -> None:
    publish_one_by_one(settings, settings.topic_proxy, 2, 2)
    sample_lag(settings, T0)
    sample_lag(settings, T0 + timedelta(seconds=settings.consumer_stall_after_s))
    with Session(make_engine(settings.resolved_store_url)) as session:
        trends = current_trend(session, settings, T0 + timedelta(seconds=settings.consumer_stall_after_s))
    assert [(t.topic, t.partition, t.committed, t.lag, t.stalled_since) for t in trends if t.stalled] == [
        (settings.topic_proxy, 2, None, 2, T0)]

    with consumer_in_thread(settings):
        wait_until(lambda: measure_lag(settings)[-1].lag == 0, 60, "the consumer to commit partition 2")
    later = T0 + timedelta(seconds=settings.consumer_stall_after_s + 10)
    sample_lag(settings, later)
    with Session(make_engine(settings.resolved_store_url)) as session:
        after = {(t.topic, t.partition): t for t in current_trend(session, settings, later)}
    assert (after[(settings.topic_proxy, 2)].committed, after[(settings.topic_proxy, 2)].lag) == (2, 0)
    assert not any(t.stalled for t in after.values())


def test_the_health_flow_emits_lag_growing_and_consumer_stalled_for_a_group_that_never_consumes(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    export(settings, monkeypatch)
    emitted: list[dict[str, Any]] = []
    monkeypatch.setattr(health, "emit_event", lambda **kwargs: emitted.append(kwargs))
    publish_one_by_one(settings, settings.topic_expert, 0, 1)

    first = health.ingest_health_flow.fn(now=T0)
    publish_one_by_one(settings, settings.topic_expert, 0, 2, start=1)
    halfway = health.ingest_health_flow.fn(now=T0 + timedelta(seconds=settings.lag_alert_after_s - 1))
    publish_one_by_one(settings, settings.topic_expert, 0, 1, start=3)
    alerted = health.ingest_health_flow.fn(now=T0 + timedelta(seconds=settings.lag_alert_after_s))

    assert (first.events, halfway.events) == ([], [health.CONSUMER_STALLED_EVENT])
    assert alerted.events == [health.LAG_GROWING_EVENT, health.CONSUMER_STALLED_EVENT]
    assert [e["event"] for e in emitted] == [health.CONSUMER_STALLED_EVENT, health.LAG_GROWING_EVENT,
                                             health.CONSUMER_STALLED_EVENT]
    partition = {"topic": settings.topic_expert, "partition": 0, "lag": 4, "end_offset": 4, "committed": None,
                 "since": T0.isoformat()}
    assert emitted[1]["payload"] == {"consumer_group": settings.consumer_group, "lag": 4, "since": T0.isoformat(),
                                     "partitions": [partition]}
    assert emitted[1]["resource"]["prefect.resource.id"] == f"proxyloop.ingest.consumer-group.{settings.consumer_group}"
    assert emitted[2]["payload"]["partitions"] == [partition]


# The window logic on samples laid out by hand (no broker).

GROUP, TOPIC = "g", "t"


@pytest.fixture
def session(store_url: str) -> Any:
    """On SQLite (which hands times back naive) and PostgreSQL (timezone-aware)."""
    with Session(make_engine(store_url)) as session:
        yield session


def lay(session: Session, *samples: tuple[float, int | None, int]) -> None:
    """(seconds after T0, committed, lag) samples of partition 0 of TOPIC; end offset = committed + lag."""
    for at_s, committed, lag in samples:
        record_lag(session, GROUP, [PartitionLag(TOPIC, 0, (committed or 0) + lag, committed, lag)],
                   T0 + timedelta(seconds=at_s), keep_s=86400)
    session.commit()


def trend_at(session: Session, at_s: float, window_s: float = 300, stall_after_s: float = 120) -> Any:
    [trend] = lag_trend(session, GROUP, [TOPIC], window_s, stall_after_s, T0 + timedelta(seconds=at_s))
    return trend


def test_lag_that_touched_zero_in_the_window_is_not_growing(session: Session) -> None:
    lay(session, (0, 0, 5), (100, 5, 0), (200, 5, 7))
    assert not trend_at(session, 200).growing


def test_the_baseline_is_the_newest_sample_at_or_before_the_window_start(session: Session) -> None:
    lay(session, (0, 0, 1), (100, 0, 2), (300, 0, 9), (400, 0, 9))
    assert trend_at(session, 400).growing_since == T0 + timedelta(seconds=100)  # lag 2 → 9
    assert not trend_at(session, 400, window_s=100).growing  # baseline at 300: 9 → 9


def test_the_baseline_and_the_stall_start_may_be_older_than_the_window(session: Session) -> None:
    lay(session, (0, 4, 1), (1000, 4, 5))  # sampling was off in between
    trend = trend_at(session, 1000)
    assert (trend.growing_since, trend.stalled_since) == (T0, T0)


def test_a_store_younger_than_the_window_compares_with_its_oldest_sample(session: Session) -> None:
    lay(session, (0, 0, 1), (3, 0, 2))
    assert trend_at(session, 3).growing_since == T0


def test_falling_lag_is_not_growing_and_one_sample_says_nothing(session: Session) -> None:
    lay(session, (0, 0, 8))
    assert (trend_at(session, 0).growing, trend_at(session, 0).stalled) == (False, False)
    lay(session, (10, 3, 5))
    assert not trend_at(session, 10).growing


def test_stalled_needs_the_committed_offset_unchanged_with_lag_waiting_for_the_stall_time(session: Session) -> None:
    lay(session, (0, 7, 3), (60, 7, 4), (119, 7, 4))
    assert not trend_at(session, 119).stalled
    lay(session, (120, 7, 5))
    assert trend_at(session, 120).stalled_since == T0
    lay(session, (130, 9, 3))
    assert not trend_at(session, 130).stalled


def test_an_idle_consumer_is_not_stalled_when_a_record_just_arrived(session: Session) -> None:
    lay(session, (0, 7, 0), (200, 7, 0), (260, 7, 1))
    assert not trend_at(session, 260).stalled


def test_samples_older_than_the_history_are_deleted_when_one_is_recorded(session: Session) -> None:
    lay(session, (0, 0, 1), (10, 0, 1))
    record_lag(session, GROUP, [PartitionLag(TOPIC, 0, 1, 0, 1)], T0 + timedelta(seconds=3605), keep_s=3600)
    session.commit()
    assert session.scalar(select(func.count()).select_from(LagSample)) == 2  # the one at 0 s is gone


def test_the_trend_reads_only_the_given_group_and_topics(session: Session) -> None:
    lay(session, (0, 0, 1), (10, 0, 2))
    record_lag(session, "other-group", [PartitionLag(TOPIC, 1, 4, None, 4)], T0 + timedelta(seconds=10), 86400)
    record_lag(session, GROUP, [PartitionLag("other-topic", 0, 4, None, 4)], T0 + timedelta(seconds=10), 86400)
    session.commit()
    assert [(t.topic, t.partition) for t in lag_trend(session, GROUP, [TOPIC], 300, 120,
                                                      T0 + timedelta(seconds=10))] == [(TOPIC, 0)]

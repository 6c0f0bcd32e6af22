"""The consumer's `dataset.updated` Prefect event (what triggers `retrain`) while the Prefect server is down.

Before, `emit_event` only queued the event, its worker dropped it when no server answered, and the consumer
reset the new-label counts all the same: retrain was never triggered and nothing said so. Now the event must
reach the server (ingest/prefect_events.py) or the counts are kept, a warning says so, and the check after the
next batch sends it again; ingest itself goes on (records stored, offsets committed)."""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx
import pytest
from kafka import KafkaConsumer, TopicPartition
from sqlalchemy.orm import Session

from ground.schemas import DATASET_UPDATED_EVENT, ExpertLabel, FeatureTriple
from ground.settings import Settings
from ingest import consumer as ingest_consumer
from ingest.bus import make_producer, publish
from ingest.prefect_events import PrefectUnreachable
from ingest.store import NewLabelCursor, count_labels, make_engine
from ingest.upsert import upsert_events
from proxyloop.testing import free_port
from tests.conftest import own_topics, wait_until

pytestmark = pytest.mark.integration
NOT_TRIGGERED = "retrain NOT triggered"


@pytest.fixture
def settings(service_settings: Settings, kafka: str, tmp_path: Path) -> Settings:
    return own_topics(service_settings, tmp_path, retrain_min_expert=3)


@pytest.fixture(scope="module")
def prefect_server() -> Iterator[None]:
    """Prefect's own test server, as tests/flows/conftest.py starts it; here for this module only, so no other
    ingest test runs with a Prefect server it did not ask for."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def _prefect_down() -> AbstractContextManager[Any]:
    """Prefect's settings pointing at a loopback port where nothing listens."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    return temporary_settings(updates={PREFECT_API_URL: f"http://127.0.0.1:{free_port()}/api"})


def _labels(prefix: str, n: int) -> list[ExpertLabel]:
    return [ExpertLabel(event_id=f"{prefix}-{i}", annotator_id="a", item=FeatureTriple(x=[1.0, 2.0], y_w=0, y_l=1))
            for i in range(n)]


def _expert_new(settings: Settings) -> int:
    with Session(make_engine(settings.store_url)) as session:
        cursor = session.get(NewLabelCursor, 1)
        return cursor.expert_new if cursor else 0


def _committed(settings: Settings) -> int:
    probe = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=settings.consumer_group,
                          enable_auto_commit=False)
    try:
        return sum(probe.committed(TopicPartition(settings.topic_expert, p)) or 0
                   for p in range(settings.topic_partitions))
    finally:
        probe.close()


def test_ingest_goes_on_and_the_counts_are_kept_while_prefect_is_down(
    settings: Settings, caplog: pytest.LogCaptureFixture,
) -> None:
    stop = threading.Event()
    with _prefect_down():  # the consumer's thread runs in a copy of this context, so it sees these settings
        thread = threading.Thread(target=contextvars.copy_context().run, args=(ingest_consumer.run, settings, stop),
                                  daemon=True)
    thread.start()
    producer = make_producer(settings)
    try:
        for batch in range(2):  # each batch past the threshold sends the event again, and fails again
            for label in _labels(f"b{batch}", 3):
                publish(producer, settings.topic_expert, label, wait=True)
            wait_until(lambda n=3 * (batch + 1), b=batch: _committed(settings) == n and sum(
                NOT_TRIGGERED in r.getMessage() for r in caplog.records) > b, 60,
                f"batch {batch} stored, its offsets committed and the failed trigger reported")
    finally:
        producer.close()
        stop.set()
        thread.join(timeout=30)
    with Session(make_engine(settings.store_url)) as session:
        assert count_labels(session)["expert"] == 6
    assert _expert_new(settings) == 6  # never reset: no server has the event
    warning = next(r.getMessage() for r in caplog.records if NOT_TRIGGERED in r.getMessage())
    assert DATASET_UPDATED_EVENT in warning and "counts are kept" in warning


@pytest.mark.usefixtures("prefect_server")
def test_the_check_after_prefect_is_back_triggers_retrain_and_resets_the_counts(settings: Settings) -> None:
    from prefect.settings import PREFECT_API_URL

    engine = make_engine(settings.store_url)
    with Session(engine) as session:
        upsert_events(session, _labels("e", 3))
        session.commit()
    producer = make_producer(settings)
    try:
        with _prefect_down(), pytest.raises(PrefectUnreachable, match=DATASET_UPDATED_EVENT):
            ingest_consumer.check_thresholds(engine, producer, settings)
        assert _expert_new(settings) == 3
        update = ingest_consumer.check_thresholds(engine, producer, settings)  # the server is back
    finally:
        producer.close()
    assert update is not None and update.expert_new == 3
    assert _expert_new(settings) == 0

    def on_the_server() -> bool:
        found = httpx.post(f"{PREFECT_API_URL.value()}/events/filter", json={
            "filter": {"event": {"name": [DATASET_UPDATED_EVENT]}}, "limit": 50}).json()["events"]
        return any(event["payload"].get("event_id") == update.event_id for event in found)

    wait_until(on_the_server, 60, f"{DATASET_UPDATED_EVENT} {update.event_id} on the Prefect server")

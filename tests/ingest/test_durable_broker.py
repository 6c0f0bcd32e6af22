"""The embedded broker is durable: Tansu keeps topics and group offsets in the SeaweedFS object
store, so restarting both mid-stream loses nothing (with memory storage the topic would be empty)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ground.schemas import FeatureTriple, ProxyPreference
from ground.settings import Settings
from ingest.bus import decode_label_event, ensure_topics, make_producer, publish, read_topic
from ingest.store import LabelHistoryRow, LabelRow, make_engine
from proxyloop import stack
from proxyloop.testing import isolated_settings
from tests.conftest import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(tmp_path: Path) -> Iterator[Settings]:
    settings = isolated_settings(tmp_path, store_url=f"sqlite:///{tmp_path}/store.db", retrain_min_expert=10**6,
                                 retrain_min_proxy=10**6, kafka_session_timeout_ms=2000,
                                 kafka_heartbeat_interval_ms=600)
    try:
        yield settings
    finally:
        for name in ("consumer", "kafka", "objectstore"):
            stack.stop_component(settings, name)


def _start(settings: Settings, *names: str) -> None:
    for name in names:
        stack.start_component(settings, stack.component(name), lambda _: None)


def _stored(settings: Settings) -> list[str]:
    with Session(make_engine(settings.resolved_store_url)) as session:
        return list(session.scalars(select(LabelRow.event_id)))


def test_broker_and_object_store_restarted_mid_stream_lose_nothing(settings: Settings) -> None:
    assert settings.broker_storage == "s3"  # the durable storage is the default
    _start(settings, "objectstore", "kafka")
    ensure_topics(settings)
    acked: list[str] = []
    stop = threading.Event()

    def produce() -> None:
        """Publish until stopped; an event counts once the broker acknowledged it, and one whose
        send failed while the broker was down is sent again."""
        producer = make_producer(settings)
        event = None
        while not stop.is_set():
            if event is None:
                item = FeatureTriple(x=[float(len(acked))], y_w=0, y_l=1)
                event = ProxyPreference(event_id=f"d-{len(acked)}", proxy_name="judge", item=item)
            try:
                publish(producer, settings.topic_proxy, event, wait=False).get(timeout=10)
            except Exception:  # noqa: BLE001 - the broker is restarting: retry the same event
                time.sleep(0.2)
                continue
            acked.append(event.event_id)
            event = None
            time.sleep(0.02)
        producer.close()

    producer_thread = threading.Thread(target=produce, daemon=True)
    producer_thread.start()
    try:
        _start(settings, "consumer")
        wait_until(lambda: len(_stored(settings)) >= 30, 120, "the consumer to store the first events")
        for name in ("kafka", "objectstore"):  # mid-stream: the producer and the consumer keep going
            stack.stop_component(settings, name)
        before_restart = len(acked)
        _start(settings, "objectstore", "kafka")
        wait_until(lambda: len(acked) >= before_restart + 30, 120, "events acknowledged after the restart")
    finally:
        stop.set()
        producer_thread.join(timeout=60)

    wait_until(lambda: set(_stored(settings)) >= set(acked), 120, "every acknowledged event to be stored")
    stored = _stored(settings)
    assert len(stored) == len(set(stored)) and set(stored) == set(acked)  # 0 lost, 0 duplicated rows
    with Session(make_engine(settings.resolved_store_url)) as session:
        assert session.scalar(select(func.count()).select_from(LabelHistoryRow)) == len(acked)
    # The records from before the restart are still in the topic, none overwritten by later ones.
    in_topic = {decode_label_event(v).event_id for v in read_topic(settings, settings.topic_proxy)}
    assert set(acked) <= in_topic
    assert before_restart >= 30 and len(acked) > before_restart

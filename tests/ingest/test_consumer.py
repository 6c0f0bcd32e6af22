"""The ingest consumer against a real Kafka-protocol broker (Tansu, started by the fixture)."""

import base64
import json
import time

import pytest
from kafka import KafkaConsumer, TopicPartition
from sqlalchemy.orm import Session

from ground.schemas import FeatureTriple, ProxyPreference
from ingest import consumer as ingest_consumer
from ingest.bus import make_producer, publish, read_topic
from ingest.positions import rewind
from ingest.store import count_labels, make_engine
from tests.conftest import consumer_in_thread, own_topics

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(service_settings, kafka, tmp_path):
    return own_topics(service_settings, tmp_path)


def probe_partitions(settings):
    reader = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap)
    try:
        return reader.partitions_for_topic(settings.topic_proxy) or set()
    finally:
        reader.close()


def _run_until_stored(settings, expected, timeout=60):
    engine = make_engine(settings.store_url)
    deadline = time.monotonic() + timeout
    with consumer_in_thread(settings):
        while time.monotonic() < deadline:
            with Session(engine) as session:
                if count_labels(session)["proxy"] >= expected:
                    break
            time.sleep(0.3)
        time.sleep(1.5)  # let the offset commit after the last batch land
    with Session(engine) as session:
        return count_labels(session)["proxy"]


def test_valid_events_are_stored_and_poison_goes_to_dead_letters(settings):
    producer = make_producer(settings)
    for i in range(30):
        publish(producer, settings.topic_proxy, ProxyPreference(
            event_id=f"ok-{i}", proxy_name="judge", item=FeatureTriple(x=[float(i)], y_w=0, y_l=1)), wait=False)
    poison = b'{"schema_version": 2, "event_id": "bad", "kind": "proxy_preference", "occurred_at": "2026-01-01T00:00Z"}'
    unstamped = (b'{"event_id": "unstamped", "proxy_name": "j", '
                 b'"item": {"type": "features", "x": [1], "y_w": 0, "y_l": 1}}')
    producer.send(settings.topic_proxy, key=b"bad", value=poison)
    producer.send(settings.topic_proxy, key=b"bad2", value=b"\xff not json")
    producer.send(settings.topic_proxy, key=b"bad3", value=unstamped)
    producer.flush()

    assert _run_until_stored(settings, 30) == 30

    letters = [json.loads(v) for v in read_topic(settings, settings.topic_dead_letter)
               if json.loads(v)["topic"] == settings.topic_proxy]
    codes = {base64.b64decode(letter["original_b64"]): letter["reason_code"] for letter in letters}
    assert codes == {poison: "contract", b"\xff not json": "not_json", unstamped: "missing_occurred_at"}
    reasons = " ".join(letter["reason"] for letter in letters)
    assert "does not match the event contract" in reasons and "not JSON" in reasons
    assert "occurred_at is required" in reasons
    assert all(letter["offset"] >= 0 and not letter["truncated"] for letter in letters)


def test_offsets_are_committed_so_a_restart_rereads_nothing(settings):
    producer = make_producer(settings)
    for i in range(10):
        publish(producer, settings.topic_proxy, ProxyPreference(
            event_id=f"first-{i}", proxy_name="judge", item=FeatureTriple(x=[1.0], y_w=0, y_l=1)), wait=False)
    producer.flush()
    assert _run_until_stored(settings, 10) == 10

    probe = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=settings.consumer_group,
                          enable_auto_commit=False)
    partitions = [TopicPartition(settings.topic_proxy, p) for p in range(settings.topic_partitions)]
    committed = sum(probe.committed(tp) or 0 for tp in partitions)
    probe.close()
    assert len(probe_partitions(settings)) == settings.topic_partitions
    assert committed == 10  # every stored record's offset is committed


def test_threshold_crossing_emits_dataset_updated_once(settings, monkeypatch):
    emitted = []
    monkeypatch.setattr(ingest_consumer, "emit_prefect_event", lambda update, s: emitted.append(update))
    settings = settings.model_copy(update={"retrain_min_proxy": 5})
    producer = make_producer(settings)
    for i in range(6):
        publish(producer, settings.topic_proxy, ProxyPreference(
            event_id=f"t-{i}", proxy_name="judge", item=FeatureTriple(x=[1.0], y_w=0, y_l=1)), wait=True)
    assert _run_until_stored(settings, 6) == 6
    assert len(emitted) == 1 and emitted[0].proxy_total == 6
    engine = make_engine(settings.store_url)
    assert ingest_consumer.check_thresholds(engine, producer, settings) is None  # no new crossing


def test_rewind_seeks_each_partition_to_its_first_record_and_skips_partitions_lost_to_a_rebalance():
    """An unconnected real KafkaConsumer: seek only moves local positions, and raises ValueError
    ("Unassigned partition") for a partition this member no longer owns."""
    from types import SimpleNamespace

    ours = TopicPartition("t", 0)  # partition 1 of the records was lost to a rebalance
    reader = KafkaConsumer(bootstrap_servers="127.0.0.1:1", api_version=(2, 0), enable_auto_commit=False)
    try:
        reader.assign([ours])
        records = [SimpleNamespace(topic="t", partition=p, offset=o) for p, o in ((0, 7), (1, 3), (0, 5), (0, 9))]
        rewind(reader, records)  # must not raise for the lost partition
        assert reader._subscription.assignment[ours].position.offset == 5
    finally:
        reader.close()

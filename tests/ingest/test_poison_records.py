"""No record stalls a partition: oversized records from another client, batches read twice, the v2 clock rule,
integers Python will not parse, events on the other kind's topic or taking over its ids.

Real broker (the session's Tansu), real clients (confluent-kafka's librdkafka and kafka-python).
"""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from ground.moments import utcnow
from ground.schemas import ExpertLabel, FeatureTriple, ProxyPreference
from ground.settings import Settings
from ingest import consumer as ingest_consumer
from ingest import dead_letters
from ingest.bus import MalformedEvent, decode_label_event, make_consumer, make_producer, publish, read_topic
from ingest.store import count_labels, make_engine
from tests.conftest import consumer_in_thread, own_topics, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(service_settings: Settings, kafka: str, tmp_path: Path) -> Settings:
    return own_topics(service_settings, tmp_path, consumer_max_poll_records=7)


def _event(i: int) -> bytes:
    return ProxyPreference(event_id=f"ok-{i}", proxy_name="judge",
                           item=FeatureTriple(x=[float(i)], y_w=0, y_l=1)).model_dump_json().encode()


def _stored(settings: Settings) -> int:
    with Session(make_engine(settings.resolved_store_url)) as session:
        return count_labels(session)["proxy"]


def test_a_3mb_record_from_librdkafka_is_dead_lettered_once_and_ingest_goes_on(settings: Settings) -> None:
    from confluent_kafka import Producer

    # A producer that is not ours, allowed to send far more than our limits; the broker accepts it.
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "acks": "all", "message.max.bytes": 5_000_000})
    huge = b'{"event_id": "' + b"x" * 3_000_000 + b'"}'
    for value in [*(_event(i) for i in range(10)), huge, *(_event(i) for i in range(10, 20))]:
        producer.produce(settings.topic_proxy, value=value, key=b"k", partition=0)
    assert producer.flush(30) == 0

    with consumer_in_thread(settings):
        wait_until(lambda: _stored(settings) == 20, 90, "the 20 events around the huge one to be stored")
        letters = read_topic(settings, settings.topic_dead_letter, stop_when=lambda v: len(v) >= 1)

    assert len(letters) == 1  # dead-lettered once, not once per re-read
    assert len(letters[0]) <= settings.kafka_max_message_bytes
    letter = json.loads(letters[0])
    assert (letter["reason_code"], letter["size"], letter["truncated"]) == ("too_large", len(huge), True)
    assert letter["sha256"] == hashlib.sha256(huge).hexdigest()
    assert dead_letters.load_payload(letter["payload_uri"], letter["sha256"]) == huge
    with Session(make_engine(settings.resolved_store_url)) as session:
        assert dead_letters.count_by_reason(session) == {"too_large": 1}
        (row,) = dead_letters.find(session)
        assert (row.partition, row.payload, dead_letters.original_bytes(row)) == (0, None, huge)


def test_a_batch_read_again_sends_no_dead_letter_twice(settings: Settings) -> None:
    producer = make_producer(settings)
    for value in (b"not json", _event(1), b"[1]", _event(2)):
        producer.send(settings.topic_proxy, value=value, partition=0)
    producer.flush()
    consumer = make_consumer(settings, [settings.topic_proxy], settings.consumer_group)
    engine = make_engine(settings.resolved_store_url)
    try:
        records: list[object] = []
        wait_until(lambda: records.extend(r for batch in consumer.poll(500).values() for r in batch)
                   or len(records) >= 4, 60, "the batch")
        first = ingest_consumer.store_batch(engine, producer, settings, records)
        again = ingest_consumer.store_batch(engine, producer, settings, records)  # as after a failed commit
    finally:
        consumer.close()
        producer.close()
    assert (first.stored, first.dead_lettered) == (2, 2)
    assert (again.stored, again.dead_lettered) == (0, 0)
    assert len(read_topic(settings, settings.topic_dead_letter)) == 2


def test_an_event_without_occurred_at_is_refused_and_a_v1_event_with_it_is_read() -> None:
    body = {"event_id": "e", "proxy_name": "j", "item": {"type": "features", "x": [1.0], "y_w": 0, "y_l": 1}}
    with pytest.raises(MalformedEvent, match="occurred_at is required") as refused:
        decode_label_event(json.dumps(body).encode())
    assert refused.value.code == "missing_occurred_at"
    v1 = decode_label_event(json.dumps({**body, "schema_version": 1, "occurred_at": "2026-01-02T03:04:05Z"}).encode())
    assert (v1.schema_version, v1.occurred_at.isoformat()) == (1, "2026-01-02T03:04:05+00:00")
    with pytest.raises(MalformedEvent) as unknown:
        decode_label_event(json.dumps({**body, "schema_version": 3, "occurred_at": "2026-01-02T03:04:05Z"}).encode())
    assert unknown.value.code == "unknown_schema_version"


def test_size_limits_that_do_not_fit_together_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="PROXYLOOP_MAX_EVENT_BYTES"):
        Settings(home=tmp_path, max_event_bytes=2_000_000)
    with pytest.raises(ValueError, match="PROXYLOOP_DEAD_LETTER_INLINE_BYTES"):
        Settings(home=tmp_path, dead_letter_inline_bytes=1_000_000)


class _FlakyProducer:
    """A producer whose first `failures` sends fail as a broker outage would (retriable), then succeed."""

    def __init__(self, failures: int) -> None:
        self.failures, self.sent = failures, []

    def send(self, topic: str, value: bytes, key: bytes) -> object:
        from kafka.errors import KafkaTimeoutError
        from kafka.producer.future import FutureProduceResult, FutureRecordMetadata

        produced = FutureProduceResult(None)
        future = FutureRecordMetadata(produced, 0, -1, None, 0, len(value), -1)
        if self.failures > 0:
            self.failures -= 1
            future.failure(KafkaTimeoutError("broker away"))
        else:
            self.sent.append(value)
            future.success(None)
        return future

    def flush(self) -> None:
        pass


def test_a_refused_dead_letter_is_retried_with_backoff_and_sent_once(tmp_path: Path) -> None:
    from ingest.dead_letters import Refusal

    settings = Settings(home=tmp_path, store_url=f"sqlite:///{tmp_path}/store.db", broker_retry_s=30)
    engine = make_engine(settings.resolved_store_url)
    refusals = [Refusal("t", 0, offset, None, b"x%d" % offset, "not JSON", "not_json") for offset in range(3)]
    producer = _FlakyProducer(failures=4)  # the first pass fails all three, the second one of them
    assert ingest_consumer.send_dead_letters(engine, producer, settings, refusals) == 3  # type: ignore[arg-type]
    assert sorted(json.loads(v)["offset"] for v in producer.sent) == [0, 1, 2]  # each letter acknowledged once
    again = _FlakyProducer(failures=0)
    assert ingest_consumer.send_dead_letters(engine, again, settings, refusals) == 0  # type: ignore[arg-type]
    assert again.sent == []


def test_a_broker_away_past_the_bound_raises_and_records_nothing(tmp_path: Path) -> None:
    from kafka.errors import KafkaTimeoutError

    from ingest.dead_letters import Refusal

    settings = Settings(home=tmp_path, store_url=f"sqlite:///{tmp_path}/store.db", broker_retry_s=1)
    engine = make_engine(settings.resolved_store_url)
    refusal = Refusal("t", 0, 7, None, b"x", "not JSON", "not_json")
    with pytest.raises(KafkaTimeoutError):
        ingest_consumer.send_dead_letters(engine, _FlakyProducer(failures=10**6), settings, [refusal])  # type: ignore[arg-type]
    with Session(engine) as session:
        assert dead_letters.find(session) == []


def _letters_by_event(settings: Settings) -> dict[str, str]:
    """Reason code of each dead-lettered record, by the event id in it (or its offset when it has none readable)."""
    with Session(make_engine(settings.resolved_store_url)) as session:
        rows = dead_letters.find(session)
        out = {}
        for row in rows:
            try:
                out[json.loads(dead_letters.original_bytes(row))["event_id"]] = row.reason_code
            except ValueError:
                out[f"offset-{row.offset}"] = row.reason_code
        return out


def _rows(settings: Settings) -> dict[str, tuple[str, str, dict[str, object]]]:
    from sqlalchemy import select

    from ingest.store import LabelRow

    with Session(make_engine(settings.resolved_store_url)) as session:
        return {r.event_id: (r.kind, r.source_id, r.item) for r in session.scalars(select(LabelRow))}


def test_an_integer_literal_past_4300_digits_is_dead_lettered_and_the_consumer_goes_on(settings: Settings) -> None:
    """json.loads raised a plain ValueError on it: the consumer died, and again after every restart."""
    huge = _event(1).replace(b'"y_w":0', b'"y_w":' + b"1" * 5000)
    assert huge != _event(1)
    producer = make_producer(settings)
    for value in (_event(0), huge, _event(2)):
        producer.send(settings.topic_proxy, value=value, key=b"k", partition=0)
    producer.flush()
    producer.close()
    with consumer_in_thread(settings) as thread:
        wait_until(lambda: list(_letters_by_event(settings).values()) == ["not_json"]
                   and {"ok-0", "ok-2"} <= set(_rows(settings)), 60, "ok-2 stored and the huge one dead-lettered")
        assert thread.is_alive()


def test_a_kind_on_the_other_kind_s_topic_or_taking_over_its_id_is_dead_lettered(settings: Settings) -> None:
    item = FeatureTriple(x=[1.0], y_w=0, y_l=1)
    producer = make_producer(settings)
    with consumer_in_thread(settings) as thread:
        publish(producer, settings.topic_expert, ExpertLabel(event_id="lbl-1", annotator_id="ann", item=item))
        wait_until(lambda: "lbl-1" in _rows(settings), 60, "the expert label to be stored")
        later = utcnow() + timedelta(hours=1)
        publish(producer, settings.topic_proxy, ExpertLabel(event_id="smuggled", annotator_id="ann", item=item))
        publish(producer, settings.topic_expert, ProxyPreference(event_id="stray", proxy_name="judge", item=item))
        publish(producer, settings.topic_proxy, ProxyPreference(
            event_id="lbl-1", proxy_name="judge", occurred_at=later, item=FeatureTriple(x=[9.0], y_w=1, y_l=0)))
        publish(producer, settings.topic_proxy, ProxyPreference(event_id="fine", proxy_name="judge", item=item))
        wait_until(lambda: len(_letters_by_event(settings)) >= 3 and "fine" in _rows(settings), 60,
                   "three letters and the fine event stored")
        assert thread.is_alive()
    producer.close()
    assert _letters_by_event(settings) == {"smuggled": "wrong_topic", "stray": "wrong_topic", "lbl-1": "kind_conflict"}
    rows = _rows(settings)
    assert sorted(rows) == ["fine", "lbl-1"]
    assert rows["lbl-1"] == ("expert", "ann", item.model_dump(mode="json"))

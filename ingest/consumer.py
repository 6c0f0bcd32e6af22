"""The ingest consumer: validate → upsert → commit offsets → emit `dataset.updated` on thresholds.

Run: `python -m ingest.consumer` (started by `proxyloop up`; run more for scale-out, the
consumer group shares the partitions).
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError
from kafka.producer.future import FutureRecordMetadata
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DataError, IntegrityError
from sqlalchemy.orm import Session

from ingest.bus import (
    LabelEvent,
    MalformedEvent,
    dead_letter,
    decode_label_event,
    ensure_topics,
    make_consumer,
    make_producer,
    publish,
)
from ingest.schemas import DatasetUpdated
from ingest.store import count_labels, make_engine, upsert_events, watermark
from proxyloop.settings import Settings, get_settings

log = logging.getLogger("proxyloop.ingest")

DATASET_UPDATED_EVENT = "proxyloop.dataset.updated"


@dataclass
class BatchOutcome:
    stored: int
    dead_lettered: int


def store_batch(
    engine: Engine, producer: KafkaProducer, settings: Settings, records: list[object]
) -> BatchOutcome:
    """Dead-letter what is malformed, upsert the rest, commit the store. Offsets come after.

    Every dead letter is acknowledged by the broker before this returns, so committing the
    offsets afterwards can never drop a refused record.
    """
    decoded: list[tuple[Any, LabelEvent]] = []
    letters: list[FutureRecordMetadata] = []

    def refuse(record: Any, reason: str) -> None:
        letters.append(dead_letter(producer, settings, reason, record.topic, record.partition, record.offset,
                                   record.value, wait=False))
        log.warning("dead-lettered %s:%s:%s: %s", record.topic, record.partition, record.offset, reason)

    for record in records:
        try:
            decoded.append((record, decode_label_event(record.value)))  # type: ignore[attr-defined]
        except MalformedEvent as exc:
            refuse(record, str(exc))
    try:
        stored = _upsert_committed(engine, [event for _, event in decoded])
    except (DataError, IntegrityError):
        # One row the database refuses must not block the partition: retry one by one and
        # dead-letter only the refused ones. Connection errors (OperationalError) still raise.
        stored = 0
        for record, event in decoded:
            try:
                stored += _upsert_committed(engine, [event])
            except (DataError, IntegrityError) as exc:
                refuse(record, f"the store refused the event: {str(exc.orig)[:500]}")
    if letters:
        producer.flush()
        for letter in letters:
            letter.get(timeout=30)
    return BatchOutcome(stored=stored, dead_lettered=len(letters))


def _upsert_committed(engine: Engine, events: list[LabelEvent]) -> int:
    with Session(engine) as session:
        stored = upsert_events(session, events)
        session.commit()
    return stored


def check_thresholds(engine: Engine, producer: KafkaProducer, settings: Settings) -> DatasetUpdated | None:
    """Emit `dataset.updated` (Kafka + Prefect event) once per threshold crossing."""
    with Session(engine) as session:
        counts = count_labels(session)
        mark = watermark(session)
        expert_new = counts["expert"] - mark.expert_total
        proxy_new = counts["proxy"] - mark.proxy_total
        # Either kind of new data past its threshold is reason enough to retrain.
        if expert_new < settings.retrain_min_expert and proxy_new < settings.retrain_min_proxy:
            session.commit()
            return None
        update = DatasetUpdated(
            event_id=f"dataset-updated-{counts['expert']}-{counts['proxy']}",
            expert_total=counts["expert"], proxy_total=counts["proxy"],
            expert_new=expert_new, proxy_new=proxy_new,
        )
        # Emit before moving the watermark: a crash in between re-triggers rather than loses.
        publish(producer, settings.topic_dataset_updated, update)  # type: ignore[arg-type]
        emit_prefect_event(update, settings)
        mark.expert_total, mark.proxy_total = counts["expert"], counts["proxy"]
        session.commit()
    log.info("dataset.updated: expert %d (+%d), proxy %d (+%d)", update.expert_total, expert_new,
             update.proxy_total, proxy_new)
    return update


def emit_prefect_event(update: DatasetUpdated, settings: Settings) -> None:
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker

    emit_event(
        event=DATASET_UPDATED_EVENT,
        resource={"prefect.resource.id": f"proxyloop.policy.{settings.policy_name}"},
        payload=update.model_dump(mode="json"),
    )
    EventsWorker.drain_all(timeout=15)


def _rewind(consumer: KafkaConsumer, records: list[Any]) -> None:
    """Back to the first record of the batch on each partition, so the batch is read again."""
    first: dict[TopicPartition, int] = {}
    for record in records:
        tp = TopicPartition(record.topic, record.partition)
        first[tp] = min(first.get(tp, record.offset), record.offset)
    for tp, offset in first.items():
        try:
            consumer.seek(tp, offset)
        except ValueError:  # kafka-python: "Unassigned partition"
            pass  # no longer ours after a rebalance: its new owner starts from the committed offset


def run(settings: Settings, stop: threading.Event) -> None:
    ensure_topics(settings)
    engine = make_engine(settings.resolved_store_url)
    producer = make_producer(settings)
    consumer = make_consumer(settings, [settings.topic_expert, settings.topic_proxy], settings.consumer_group)
    log.info("consuming %s, %s as group %s", settings.topic_expert, settings.topic_proxy, settings.consumer_group)
    try:
        while not stop.is_set():
            polled = consumer.poll(timeout_ms=500)
            records = [r for batch in polled.values() for r in batch]
            if not records:
                continue
            try:
                outcome = store_batch(engine, producer, settings, records)
                consumer.commit()  # only after the store commit above
            except KafkaError as error:
                # The broker went away mid-batch (a restart, a network blip): a dead letter or the
                # offset commit was not acknowledged. Read the batch again once it is back; the
                # store upserts by event id, so the second pass writes nothing twice (a dead
                # letter may be sent twice).
                log.warning("broker error on a batch of %d (%r); reading it again", len(records), error)
                _rewind(consumer, records)
                stop.wait(1.0)
                continue
            log.info("stored %d, dead-lettered %d", outcome.stored, outcome.dead_lettered)
            try:
                check_thresholds(engine, producer, settings)
            except KafkaError as error:  # the watermark did not move: the next batch tries again
                log.warning("dataset.updated not published (%r); retrying after the next batch", error)
    finally:
        consumer.close()
        producer.close()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    run(get_settings(), stop)


if __name__ == "__main__":
    main()

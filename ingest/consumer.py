"""The ingest consumer: validate → upsert → commit offsets → emit `dataset.updated` on thresholds.

Run: `python -m ingest.consumer` (started by `proxyloop up`; run more for scale-out, the
consumer group shares the partitions).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kafka import KafkaConsumer, KafkaProducer
from kafka.errors import KafkaError, UnsupportedCodecError
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DataError, IntegrityError, OperationalError
from sqlalchemy.orm import Session
from tenacity import Retrying, before_sleep_log, retry_if_exception, stop_after_delay, wait_exponential

from ground.schemas import DATASET_UPDATED_EVENT, DatasetUpdated, ExpertLabel, FeatureTriple
from ground.settings import Settings, get_settings
from ingest import dead_letters, prefect_events
from ingest.bus import (
    LabelEvent,
    MalformedEvent,
    check_moment,
    check_topic,
    decode_label_event,
    ensure_topics,
    make_consumer,
    make_producer,
    publish,
)
from ingest.dead_letters import Refusal
from ingest.positions import restart_past_the_end, rewind
from ingest.prefect_events import PrefectUnreachable
from ingest.store import count_labels, count_new_labels, feature_dimension, make_engine
from ingest.upsert import KindConflict, upsert_events

log = logging.getLogger("proxyloop.ingest")

@dataclass
class BatchOutcome:
    stored: int
    dead_lettered: int


class StoreUnavailable(RuntimeError):
    """The store stayed unreachable for longer than Settings.store_retry_s."""


def _retrying(seconds: float, on: Callable[[BaseException], bool]) -> Retrying:
    return Retrying(stop=stop_after_delay(seconds), wait=wait_exponential(multiplier=0.2, max=10),
                    retry=retry_if_exception(on), before_sleep=before_sleep_log(log, logging.WARNING), reraise=True)


def _retriable_kafka(error: BaseException) -> bool:
    return isinstance(error, KafkaError) and bool(getattr(error, "retriable", False))


@dataclass
class FeatureDimension:
    """The x length of the store's live feature labels, as this consumer knows it (None: not known yet).

    Why: one event of another dimension would break every later retrain with errors that name no event,
    so the consumer dead-letters it (`dimension_mismatch`). Looked up once from one stored row
    (ingest.store.feature_dimension), not per event; held only once read from the store, so an event
    that fixed it within a batch but was then refused does not fix it for good. Retracting every feature
    label to change dimension needs a consumer restart.
    """

    known: int | None = None


def store_batch(
    engine: Engine, producer: KafkaProducer, settings: Settings, records: list[Any],
    dimension: FeatureDimension | None = None,
) -> BatchOutcome:
    """Upsert what decodes, dead-letter the rest once, commit the store. Offsets come after.

    Every dead letter is acknowledged by the broker and recorded in the store before this returns,
    so committing the offsets afterwards can never drop a refused record, and a batch read again
    (after a broker error or a restart) sends no letter twice. A record that fails in a way no check
    foresaw is dead-lettered too (`undecodable`): a consumer that died on it would die on it again
    after every restart. Store connection errors still raise (the batch is read again).
    """
    dimension = dimension if dimension is not None else FeatureDimension()
    decoded: list[tuple[Any, LabelEvent]] = []
    refusals: list[Refusal] = []
    expected, looked_up = dimension.known, False

    def refuse(record: Any, error: MalformedEvent) -> None:
        refusals.append(Refusal(record.topic, record.partition, record.offset, record.key, record.value,
                                str(error), error.code))

    for record in records:
        try:
            event = decode_label_event(record.value, settings.max_event_bytes)
            check_topic(event, record.topic, settings)
            check_moment(event, settings)
        except MalformedEvent as exc:
            refuse(record, exc)
            continue
        except Exception as exc:  # see the docstring; decoding touches neither the store nor the broker
            refuse(record, MalformedEvent(f"could not be decoded: {type(exc).__name__}: {str(exc)[:500]}",
                                          "undecodable"))
            continue
        x = _features(event)
        if x is not None:
            if expected is None and not looked_up:  # outside the guard: a store error rewinds the batch
                with Session(engine) as session:
                    expected = dimension.known = feature_dimension(session)
                looked_up = True
            expected = len(x) if expected is None else expected  # an empty store: the batch's first fixes it
            if len(x) != expected:
                refuse(record, MalformedEvent(f"x has {len(x)} features; the store's feature labels have {expected}",
                                              "dimension_mismatch"))
                continue
        decoded.append((record, event))
    try:
        stored = _upsert_committed(engine, [event for _, event in decoded])
    except (DataError, IntegrityError, KindConflict):
        # One row the database refuses (or an id reused by the other kind) must not block the partition:
        # retry one by one and dead-letter only the refused ones. Connection errors (OperationalError) still raise.
        stored = 0
        for record, event in decoded:
            try:
                stored += _upsert_committed(engine, [event])
            except KindConflict as exc:
                refuse(record, MalformedEvent(str(exc), "kind_conflict"))
            except (DataError, IntegrityError) as exc:
                refuse(record, MalformedEvent(f"the store refused the event: {str(exc.orig)[:500]}",
                                              "store_refused"))
    return BatchOutcome(stored=stored, dead_lettered=send_dead_letters(engine, producer, settings, refusals))


def _features(event: LabelEvent) -> list[float] | None:
    """The x a stored version of this event would carry; a retraction carries none, whatever its item."""
    if isinstance(event, ExpertLabel) and event.action == "deleted":
        return None
    return event.item.x if isinstance(event.item, FeatureTriple) else None


def send_dead_letters(engine: Engine, producer: KafkaProducer, settings: Settings, refusals: list[Refusal]) -> int:
    """Send each refusal's letter unless the store says it was sent; retry the unacknowledged ones with
    backoff for Settings.broker_retry_s, then raise the broker's error. Returns letters sent now."""
    if not refusals:
        return 0
    with Session(engine) as session:
        done = dead_letters.already_dead_lettered(session, refusals)
    pending = [(r, dead_letters.letter_for(settings, r)) for r in refusals if r.position not in done]
    sent = 0
    for attempt in _retrying(settings.broker_retry_s, _retriable_kafka):
        with attempt:
            futures = []
            for refusal, letter in pending:
                try:
                    futures.append(producer.send(settings.topic_dead_letter, value=letter.model_dump_json().encode(),
                                                 key=f"{refusal.topic}:{refusal.partition}:{refusal.offset}".encode()))
                except KafkaError as error:  # e.g. no metadata: the broker is away
                    futures.append(error)
            producer.flush()
            acknowledged, failed, last_error = [], [], None
            for item, future in zip(pending, futures, strict=True):
                try:
                    if isinstance(future, KafkaError):
                        raise future
                    future.get(timeout=30)
                    acknowledged.append(item)
                except KafkaError as error:
                    failed.append(item)
                    last_error = error
            with Session(engine) as session:
                dead_letters.record(session, acknowledged)
                session.commit()
            for refusal, _ in acknowledged:
                log.warning("dead-lettered %s:%s:%s (%s): %s", refusal.topic, refusal.partition, refusal.offset,
                            refusal.code, refusal.reason[:300])
            sent += len(acknowledged)
            pending = failed
            if last_error is not None:
                raise last_error
    return sent


def _upsert_committed(engine: Engine, events: list[LabelEvent]) -> int:
    with Session(engine) as session:
        stored = upsert_events(session, events)
        session.commit()
    return stored


def commit_offsets(consumer: KafkaConsumer, settings: Settings) -> None:
    """Commit after the store commit; retriable broker errors are retried with backoff, bounded."""
    for attempt in _retrying(settings.broker_retry_s, _retriable_kafka):
        with attempt:
            consumer.commit()


def check_thresholds(engine: Engine, producer: KafkaProducer, settings: Settings) -> DatasetUpdated | None:
    """Emit `dataset.updated` (Kafka + Prefect event) once per threshold crossing.

    Counts only the labels added since the last check (ingest.store.count_new_labels), so the cost
    of a check does not grow with the store; the whole table is counted only when emitting. The counts
    are reset only once the Prefect server has the event (it is what triggers `retrain`): otherwise they
    are kept and PrefectUnreachable raised, so the check after the next batch emits again.
    """
    with Session(engine) as session:
        cursor = count_new_labels(session)
        # Either kind of new data past its threshold is reason enough to retrain.
        if cursor.expert_new < settings.retrain_min_expert and cursor.proxy_new < settings.retrain_min_proxy:
            session.commit()
            return None
        counts = count_labels(session)
        update = DatasetUpdated(
            event_id=f"dataset-updated-{counts['expert']}-{counts['proxy']}",
            expert_total=counts["expert"], proxy_total=counts["proxy"],
            expert_new=cursor.expert_new, proxy_new=cursor.proxy_new,
        )
        # Emit before resetting the counts: a crash in between re-triggers rather than loses.
        publish(producer, settings.topic_dataset_updated, update)  # type: ignore[arg-type]
        try:
            emit_prefect_event(update, settings)
        except PrefectUnreachable:
            session.commit()  # the counts so far, not reset: the next check crosses the threshold again
            raise
        cursor.expert_new = cursor.proxy_new = 0
        session.commit()
    log.info("dataset.updated: expert %d (+%d), proxy %d (+%d)", update.expert_total, update.expert_new,
             update.proxy_total, update.proxy_new)
    return update


def prepare_prefect_events() -> None:
    """Import Prefect's events client now (~1.5 s on a small VM), not inside the first threshold
    crossing's event → flow time. Imported lazily elsewhere: the store path never needs Prefect."""
    import prefect.events.clients  # noqa: F401


def emit_prefect_event(update: DatasetUpdated, settings: Settings) -> None:
    """The event the `retrain` deployment's trigger waits for; raises PrefectUnreachable unless delivered."""
    prefect_events.emit(DATASET_UPDATED_EVENT, {"prefect.resource.id": f"proxyloop.policy.{settings.policy_name}"},
                        update.model_dump(mode="json"))


def _label_consumer(settings: Settings) -> KafkaConsumer:
    return make_consumer(settings, [settings.topic_expert, settings.topic_proxy], settings.consumer_group)


def _reopened(consumer: KafkaConsumer, settings: Settings, stop: threading.Event, error: KafkaError,
              pause: float) -> KafkaConsumer | None:
    """A new consumer in place of one whose poll raised (an unreadable batch, say): kafka-python's next poll on
    the old one spins without returning, so it is closed and a new one rejoins the group from the committed
    offsets after `pause` s (None once `stop` is set). Nothing past the last stored batch was committed, so nothing
    is skipped; an error that does not go away leaves the partition's lag growing, which `proxyloop status` flags."""
    hint = " (a producer used a compression codec whose library is missing)" \
        if isinstance(error, UnsupportedCodecError) else ""
    log.error("could not read a batch: %s%s; reopening the consumer in %.0f s",
              str(error).splitlines()[0][:300], hint, pause)
    consumer.close()
    while not stop.wait(pause):
        try:
            return _label_consumer(settings)
        except KafkaError as again:  # the broker is away too: keep trying, as the batch loop does
            log.error("could not reopen the consumer (%s); trying again in %.0f s", again, pause)
    return None


def run(settings: Settings, stop: threading.Event) -> None:
    ensure_topics(settings)
    engine = make_engine(settings.resolved_store_url)
    producer = make_producer(settings)
    consumer = _label_consumer(settings)
    log.info("consuming %s, %s as group %s", settings.topic_expert, settings.topic_proxy, settings.consumer_group)
    pause, store_down_since, dimension = 1.0, None, FeatureDimension()
    try:
        while not stop.is_set():
            try:
                polled = consumer.poll(timeout_ms=500)
            except KafkaError as error:
                reopened = _reopened(consumer, settings, stop, error, pause)
                if reopened is None:
                    return
                consumer, pause = reopened, min(pause * 2, 30.0)
                continue
            records = [r for batch in polled.values() for r in batch]
            if not records:
                restart_past_the_end(consumer)
                continue
            try:
                outcome = store_batch(engine, producer, settings, records, dimension)
                commit_offsets(consumer, settings)  # only after the store commit above
            except (KafkaError, OperationalError) as error:
                # The broker stayed away past its retries, the group rebalanced, or the store is
                # unreachable: read the batch again later. The store upserts by event id and records
                # every letter sent, so the second pass stores and dead-letters nothing twice.
                if isinstance(error, OperationalError):
                    store_down_since = store_down_since or time.monotonic()
                    if time.monotonic() - store_down_since > settings.store_retry_s:
                        raise StoreUnavailable(f"the store at {engine.url!r} has been unreachable for more than "
                                               f"{settings.store_retry_s:.0f} s (PROXYLOOP_STORE_RETRY_S)") from error
                log.error("%s error on a batch of %d (%s); reading it again in %.0f s",
                          "store" if isinstance(error, OperationalError) else "broker", len(records),
                          str(error).splitlines()[0][:300], pause)
                rewind(consumer, records)
                stop.wait(pause)
                pause = min(pause * 2, 30.0)
                continue
            pause, store_down_since = 1.0, None
            log.info("stored %d, dead-lettered %d", outcome.stored, outcome.dead_lettered)
            try:
                check_thresholds(engine, producer, settings)
            except (KafkaError, OperationalError) as error:  # the watermark did not move: the next batch retries
                log.warning("dataset.updated not published (%r); retrying after the next batch", error)
            except PrefectUnreachable as error:  # stored and committed all the same; the counts were kept
                log.warning("retrain NOT triggered: %s; the new-label counts are kept and the event is sent again "
                            "after the next batch", error)
    finally:
        consumer.close()
        producer.close()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    prepare_prefect_events()
    run(get_settings(), stop)


if __name__ == "__main__":
    main()

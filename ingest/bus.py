"""Kafka (kafka-python): topics, producer, consumer, and bytes → typed event.

Works against the embedded Tansu broker and any Kafka cluster (`PROXYLOOP_KAFKA_BOOTSTRAP`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError
from kafka.producer.future import FutureRecordMetadata
from pydantic import TypeAdapter, ValidationError

from ground.moments import utcnow
from ground.schemas import (
    READABLE_SCHEMA_VERSIONS,
    SCHEMA_VERSION,
    DeadLetterReason,
    ExpertLabel,
    PolicyReleased,
    ProxyPreference,
)
from ground.settings import Settings
from ground.validation import validation_problems

LabelEvent = ExpertLabel | ProxyPreference
_label_adapter: TypeAdapter[LabelEvent] = TypeAdapter(LabelEvent)
_MODEL_OF_KIND: dict[str, type[LabelEvent]] = {"expert_label": ExpertLabel, "proxy_preference": ProxyPreference}

# Defaults of Settings.kafka_session_timeout_ms / kafka_heartbeat_interval_ms (kept for importers).
SESSION_TIMEOUT_MS = 6000
HEARTBEAT_INTERVAL_MS = 2000

# The default of Settings.max_event_bytes, for callers without settings; a label event is a few KB.
MAX_EVENT_BYTES: int = Settings.model_fields["max_event_bytes"].default


class MalformedEvent(ValueError):
    """Bytes that cannot become a typed event; the message is the dead-letter reason, `code` its kind."""

    def __init__(self, reason: str, code: DeadLetterReason) -> None:
        super().__init__(reason)
        self.code: DeadLetterReason = code


def all_topics(settings: Settings) -> list[str]:
    return [
        settings.topic_expert,
        settings.topic_proxy,
        settings.topic_dead_letter,
        settings.topic_dataset_updated,
        settings.topic_policy_released,
    ]


def ensure_topics(settings: Settings) -> None:
    """Create the platform's topics if missing (idempotent)."""
    admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, client_id="proxyloop-admin")
    try:
        existing = set(admin.list_topics())
        limit = {"max.message.bytes": str(settings.kafka_max_message_bytes)}
        missing = [
            NewTopic(name=t, num_partitions=settings.topic_partitions, replication_factor=1, topic_configs=limit)
            for t in all_topics(settings)
            if t not in existing
        ]
        if missing:
            try:
                admin.create_topics(missing)
            except TopicAlreadyExistsError:
                pass
    finally:
        admin.close()


def make_producer(settings: Settings) -> KafkaProducer:
    # acks="all": a publish returns only once the broker has the record. Idempotent publishing is
    # off: the embedded Tansu broker answers concurrent producers with "out of order sequence
    # number", after which kafka-python's idempotent producer fails every send. Duplicates from a
    # retried send are harmless: the store upserts by event id.
    return KafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap,
        acks="all",
        enable_idempotence=False,
        linger_ms=5,
        retries=5,
        max_request_size=settings.kafka_max_message_bytes,
        client_id="proxyloop-producer",
    )


def make_consumer(settings: Settings, topics: list[str], group_id: str) -> KafkaConsumer:
    consumer = KafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=settings.kafka_session_timeout_ms,
        heartbeat_interval_ms=settings.kafka_heartbeat_interval_ms,
        max_poll_records=settings.consumer_max_poll_records,
        # At least the largest record a producer may send, so one record never exceeds a fetch.
        max_partition_fetch_bytes=settings.kafka_max_message_bytes,
        fetch_max_bytes=max(52_428_800, settings.kafka_max_message_bytes),
        client_id=f"{group_id}-consumer",
        isolation_level=settings.kafka_isolation_level,
    )
    consumer.subscribe(topics)
    return consumer


def encode_event(event: LabelEvent | PolicyReleased) -> bytes:
    return event.model_dump_json().encode()


def decode_label_event(raw: bytes | None, max_bytes: int = MAX_EVENT_BYTES) -> LabelEvent:
    """The one place bytes become a typed label event; raises MalformedEvent with the reason."""
    if raw is None:
        raise MalformedEvent("empty record value (tombstone) on a label topic", "empty")
    if not raw:
        raise MalformedEvent("empty record value (0 bytes) on a label topic", "empty")
    if raw[:1] == b"\x00" and len(raw) >= 5:
        raise MalformedEvent(f"Confluent Schema Registry framing (magic byte 0, schema id "
                             f"{int.from_bytes(raw[1:5], 'big')}): label topics take plain UTF-8 JSON; produce "
                             "with a plain string or bytes serializer", "not_json")
    if len(raw) > max_bytes:
        raise MalformedEvent(f"record of {len(raw)} bytes exceeds the {max_bytes}-byte limit for one event "
                             "(PROXYLOOP_MAX_EVENT_BYTES)", "too_large")
    try:
        payload = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedEvent(f"not JSON: {exc}", "not_json") from exc
    except RecursionError as exc:  # e.g. b"[" * 100_000
        raise MalformedEvent("not JSON this reader accepts: nested too deeply", "too_deep") from exc
    except ValueError as exc:  # e.g. an integer literal past Python's 4300 digits (sys.set_int_max_str_digits)
        raise MalformedEvent(f"not JSON this reader accepts: {_clip(str(exc))}", "not_json") from exc
    if not isinstance(payload, dict):
        raise MalformedEvent(f"event must be a JSON object, got {type(payload).__name__}", "not_object")
    version = payload.get("schema_version")
    if version is not None and (type(version) is not int or version not in READABLE_SCHEMA_VERSIONS):
        raise MalformedEvent(f"unknown schema_version {_clip(repr(version))}; this reader knows "
                             f"{list(READABLE_SCHEMA_VERSIONS)}", "unknown_schema_version")
    if "occurred_at" not in payload:
        # The reader's clock would make a redelivery look newer than the stored version (contract v2).
        raise MalformedEvent(f"occurred_at is required (event contract v{SCHEMA_VERSION}): the producer's time of "
                             "this version, ISO 8601 with a zone", "missing_occurred_at")
    kind = payload.get("kind")
    # A known kind is checked against its own model: the union's errors would list the other kind's too.
    model = _MODEL_OF_KIND.get(kind) if isinstance(kind, str) else None
    try:
        return model.model_validate(payload) if model is not None else _label_adapter.validate_python(payload)
    except ValidationError as exc:
        problems = validation_problems(exc, limit=5)
        raise MalformedEvent(f"does not match the event contract: {_clip(problems)}", "contract") from exc
    except RecursionError as exc:
        raise MalformedEvent("does not match the event contract: nested too deeply", "too_deep") from exc


def check_topic(event: LabelEvent, topic: str, settings: Settings) -> None:
    """Raise MalformedEvent (`wrong_topic`) unless the event's kind is the one its topic carries.

    Why: the topic is what a producer is allowed to write to; without this check a proxy producer could
    create expert labels. The expert topic carries ExpertLabel (retractions are ExpertLabels with
    action "deleted"), the proxy topic ProxyPreference; the consumer reads no other label topic.
    """
    topics = ((settings.topic_expert, ExpertLabel), (settings.topic_proxy, ProxyPreference))
    carried = tuple(kind for name, kind in topics if name == topic)
    if not isinstance(event, carried):
        kinds = " and ".join(str(kind.model_fields["kind"].default) for kind in carried) or "no label events"
        raise MalformedEvent(f"a {event.kind} event on topic {_clip(topic, 200)!r}, which carries {kinds}",
                             "wrong_topic")


def check_moment(event: LabelEvent, settings: Settings) -> None:
    """Raise MalformedEvent (`future_occurred_at`) when the event claims a time past Settings.max_clock_ahead_s ahead.

    Why: the stored version is the one with the latest occurred_at, so an event from a clock hours ahead (or a
    typo'd year) would outrank every correction and retraction until then, silently. Refused, it waits in the
    dead-letter store; `proxyloop deadletters replay --reason future_occurred_at` stores it once its time is near.
    """
    ahead = (event.occurred_at - utcnow()).total_seconds()
    if ahead > settings.max_clock_ahead_s:
        raise MalformedEvent(f"occurred_at {event.occurred_at.isoformat()} is {ahead / 3600:.1f} h ahead of this "
                             f"reader's clock (limit {settings.max_clock_ahead_s:.0f} s, PROXYLOOP_MAX_CLOCK_AHEAD_S)",
                             "future_occurred_at")


def _clip(text: str, limit: int = 500) -> str:
    # A reason quotes the offending value; a hostile 1 MB string must not become a 1 MB reason.
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} chars)"


def publish(
    producer: KafkaProducer, topic: str, event: LabelEvent | PolicyReleased, wait: bool = True
) -> FutureRecordMetadata:
    """Publish keyed by event id; with wait=True return only after the broker acknowledged.

    With wait=False, call `.get()` on the returned futures after `flush()`: a failed send is
    otherwise silent.
    """
    future = producer.send(topic, key=event.event_id.encode(), value=encode_event(event))
    if wait:
        future.get(timeout=30)
    return future


def read_topic(
    settings: Settings, topic: str, stop_when: Callable[[list[bytes]], bool] | None = None,
    idle_polls: int | None = 3, timeout_s: float = 30,
) -> list[bytes]:
    """Values of every record of `topic`, all partitions from the start, without joining a group.

    For tools and tests. Stops after `idle_polls` empty polls in a row (None: never), when
    `stop_when(values)` holds, or at the timeout. The end is not taken from offsets: the embedded Tansu broker reports
    one offset per produced batch, not per record.
    """
    reader = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False,
                           isolation_level=settings.kafka_isolation_level)
    try:
        partitions = [TopicPartition(topic, p) for p in range(settings.topic_partitions)]
        reader.assign(partitions)
        reader.seek_to_beginning(*partitions)
        values: list[bytes] = []
        idle, deadline = 0, time.monotonic() + timeout_s
        while (idle_polls is None or idle < idle_polls) and time.monotonic() < deadline:
            polled = reader.poll(timeout_ms=300)
            idle = 0 if polled else idle + 1
            values += [r.value for records in polled.values() for r in records]
            if stop_when is not None and stop_when(values):
                break
        return values
    finally:
        reader.close()

"""Publish proxy preferences in bulk: a small Python client and the `proxyloop ingest proxy` command.

    from ingest.proxy_client import ProxyPublisher
    with ProxyPublisher(get_settings()) as publisher:
        publisher.publish(ProxyPreference(event_id="judge-1", proxy_name="judge", item=...))

Every event is acknowledged by the broker before `close()` returns; ids make re-publishing safe.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from kafka import KafkaProducer
from kafka.cluster import collect_hosts
from kafka.errors import KafkaError
from kafka.producer.future import FutureRecordMetadata
from pydantic import ValidationError

from ground.schemas import ProxyPreference
from ground.settings import OperatorError, Settings
from ground.validation import validation_problems
from ingest.bus import MalformedEvent, check_moment, encode_event, make_producer, publish


class BadProxyLine(ValueError):
    """A line of the input file that is not a valid ProxyPreference (path:line and the reason)."""


class EventTooLarge(ValueError):
    """An event larger than the consumer would store (it would only be dead-lettered)."""


class BrokerUnreachable(OperatorError):
    """No broker in PROXYLOOP_KAFKA_BOOTSTRAP answered."""


def read_preferences(path: Path) -> Iterator[ProxyPreference]:
    """One ProxyPreference JSON object per line; blank lines are skipped.

    A line without `occurred_at` is stamped with this publisher's clock when read: this command is
    the producer. Give it in the file when the lines come from elsewhere with their own time.
    Lines are decoded one by one, so a line that is not UTF-8 is a BadProxyLine naming it like any other.
    """
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise BadProxyLine(f"{path}:{number}: not UTF-8 (byte 0x{raw[exc.start]:02x} at column "
                                   f"{exc.start + 1})") from exc
            if not line.strip():
                continue
            try:
                yield ProxyPreference.model_validate_json(line)
            except ValidationError as exc:
                problems = validation_problems(exc, limit=3)
                raise BadProxyLine(f"{path}:{number}: not a ProxyPreference: {problems}") from exc


def check_size(event: ProxyPreference, limit: int) -> None:
    """Refused here rather than dead-lettered by the consumer: the producer can still fix it."""
    size = len(encode_event(event))
    if size > limit:
        raise EventTooLarge(f"event {event.event_id!r} is {size} bytes; the limit is {limit} "
                            "(PROXYLOOP_MAX_EVENT_BYTES)")


def check_file(path: Path, settings: Settings) -> int:
    """How many events `path` holds, each parsed, sized and its time checked: run before publishing, so a bad line
    (BadProxyLine, EventTooLarge) stops the command with nothing sent rather than with part of the file published."""
    count = 0
    for number, event in enumerate(read_preferences(path), start=1):
        check_size(event, settings.max_event_bytes)
        try:  # the consumer would dead-letter it (`future_occurred_at`); the producer can still fix its clock
            check_moment(event, settings)
        except MalformedEvent as exc:
            raise BadProxyLine(f"{path}: event {number} ({event.event_id!r}): {exc}") from None
        count += 1
    return count


def connect_producer(settings: Settings) -> KafkaProducer:
    """A producer, once a broker accepts connections. kafka-python's own bootstrap waits 30 s and raises a bare
    KafkaTimeoutError; a closed port answers at once here, and either way BrokerUnreachable names the setting."""
    where = f"Kafka at {settings.kafka_bootstrap} unreachable (PROXYLOOP_KAFKA_BOOTSTRAP)"
    problems = []
    for host, port, _ in collect_hosts(settings.kafka_bootstrap, randomize=False):
        try:
            with socket.create_connection((host, port), timeout=settings.kafka_bootstrap_timeout_s):
                break
        except OSError as exc:
            problems.append(f"{host}:{port}: {exc.strerror or exc}")
    else:
        raise BrokerUnreachable(f"{where}: {'; '.join(problems)}")
    try:
        return make_producer(settings)
    except KafkaError as exc:  # accepts connections but does not speak Kafka (in time)
        raise BrokerUnreachable(f"{where}: {exc}") from exc


class ProxyPublisher:
    """Publishes without waiting per event; `flush()`/`close()` wait for the broker's acknowledgements."""

    def __init__(self, settings: Settings, window: int = 1000) -> None:
        self.settings = settings
        self.window = window  # unacknowledged sends held before waiting: bounds memory
        self._producer = connect_producer(settings)
        self._pending: list[FutureRecordMetadata] = []
        self.acknowledged = 0

    def publish(self, event: ProxyPreference) -> None:
        check_size(event, self.settings.max_event_bytes)
        self._pending.append(publish(self._producer, self.settings.topic_proxy, event, wait=False))
        if len(self._pending) >= self.window:
            self.flush()

    def flush(self) -> int:
        """Wait until the broker has every event sent so far; returns how many it acknowledged now."""
        self._producer.flush()
        done = len(self._pending)
        for future in self._pending:
            future.get(timeout=30)
        self._pending.clear()
        self.acknowledged += done
        return done

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._producer.close()

    def __enter__(self) -> ProxyPublisher:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def example_line() -> str:
    """A valid line, for help texts and docs."""
    return json.dumps({"event_id": "judge-1", "proxy_name": "llm-judge", "occurred_at": "2026-11-29T17:00:00Z",
                       "item": {"type": "features", "x": [0.1, -0.3, 1.2, 0.0, 0.5], "y_w": 2, "y_l": 0}})

"""Publish proxy preferences in bulk: a small Python client and the `proxyloop ingest proxy` command.

    from ingest.proxy_client import ProxyPublisher
    with ProxyPublisher(get_settings()) as publisher:
        publisher.publish(ProxyPreference(event_id="judge-1", proxy_name="judge", item=...))

Every event is acknowledged by the broker before `close()` returns; ids make re-publishing safe.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from kafka.producer.future import FutureRecordMetadata
from pydantic import ValidationError

from ground.schemas import ProxyPreference
from ground.settings import Settings
from ingest.bus import encode_event, make_producer, publish


class BadProxyLine(ValueError):
    """A line of the input file that is not a valid ProxyPreference (path:line and the reason)."""


class EventTooLarge(ValueError):
    """An event larger than the consumer would store (it would only be dead-lettered)."""


def read_preferences(path: Path) -> Iterator[ProxyPreference]:
    """One ProxyPreference JSON object per line; blank lines are skipped.

    A line without `occurred_at` is stamped with this publisher's clock when read: this command is
    the producer. Give it in the file when the lines come from elsewhere with their own time.
    """
    with path.open() as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                yield ProxyPreference.model_validate_json(line)
            except ValidationError as exc:
                problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:3])
                raise BadProxyLine(f"{path}:{number}: not a ProxyPreference: {problems}") from exc


def count_lines(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())


class ProxyPublisher:
    """Publishes without waiting per event; `flush()`/`close()` wait for the broker's acknowledgements."""

    def __init__(self, settings: Settings, window: int = 1000) -> None:
        self.settings = settings
        self.window = window  # unacknowledged sends held before waiting: bounds memory
        self._producer = make_producer(settings)
        self._pending: list[FutureRecordMetadata] = []
        self.acknowledged = 0

    def publish(self, event: ProxyPreference) -> None:
        size = len(encode_event(event))
        if size > self.settings.max_event_bytes:
            # Refused here rather than dead-lettered by the consumer: the producer can still fix it.
            raise EventTooLarge(f"event {event.event_id!r} is {size} bytes; the limit is "
                                f"{self.settings.max_event_bytes} (PROXYLOOP_MAX_EVENT_BYTES)")
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

"""Fault cases on the ingest path: broker + object store SIGKILLed, the store stopped, the HTTP app
SIGKILLed during a webhook burst. Acknowledged = the broker acknowledged the publish or the webhook
answered 200; lost = acknowledged ids not in the store; duplicated = history rows beyond one per id.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx

from ground.settings import Settings
from ingest.bus import ensure_topics
from ingest.labelstudio import webhook_payload
from ingest.store import make_engine
from proxyloop import stack
from proxyloop.demo import _post_webhook, feature_task
from tests.conftest import wait_until
from tests.faults.harness import (
    CaseFigures,
    Publisher,
    ingest_figures,
    kill_and_restart,
    restarted_and_caught_up,
    running_stack,
    sigkill,
    start,
    stored_ids,
    wait_stored,
)
from tests.faults.pg import PostgresServer


def broker_and_object_store_killed(settings: Settings, inject: bool = True, warmup: int = 30, after: int = 30,
                                   down_s: float = 2.0, timeout_s: float = 180) -> CaseFigures:
    """Tansu and SeaweedFS both SIGKILLed mid-stream and restarted; producer and consumer keep going."""
    assert settings.broker_storage == "s3", "the durable broker is the one whose restart must lose nothing"
    started = time.monotonic()
    with running_stack(settings):
        start(settings, "objectstore", "kafka")
        ensure_topics(settings)
        make_engine(settings.resolved_store_url)  # the tables, before the consumer and the readers
        start(settings, "consumer")
        with Publisher(settings, "broker") as publisher:
            wait_until(lambda: len(stored_ids(settings)) >= warmup, timeout_s, "the first events stored")

            def outage() -> float:
                if not inject:
                    return 0.0
                killed = time.monotonic()
                for name in ("kafka", "objectstore"):
                    sigkill(settings, name)
                time.sleep(down_s)
                start(settings, "objectstore", "kafka")
                return time.monotonic() - killed
            down, recover_s = restarted_and_caught_up(settings, publisher, outage, after, timeout_s)
        wait_stored(settings, publisher.acked, timeout_s)
        return ingest_figures("broker+objectstore SIGKILL", settings, publisher.acked, inject, recover_s, down,
                               started, failed_sends=publisher.failed_sends,
                               consumer_survived=stack.pid_of(settings, "consumer") is not None)


# --- case 2: PostgreSQL stopped while events flow ----------------------------------------------------------------


def store_stopped(settings: Settings, server: PostgresServer, inject: bool = True, outage_s: float = 5.0,
                  warmup: int = 30, after: int = 30, timeout_s: float = 180) -> CaseFigures:
    """`pg_ctl stop -m fast` for `outage_s` while events flow; the consumer process rides it out and catches up."""
    started = time.monotonic()
    with running_stack(settings):
        start(settings, "kafka")
        ensure_topics(settings)
        make_engine(settings.resolved_store_url)  # the tables, before the consumer and the readers
        start(settings, "consumer")
        consumer_pid = stack.pid_of(settings, "consumer")
        with Publisher(settings, "store") as publisher:
            wait_until(lambda: len(stored_ids(settings)) >= warmup, timeout_s, "the first events stored")

            def outage() -> float:
                if not inject:
                    return 0.0
                stopped = time.monotonic()
                server.stop("fast")
                time.sleep(outage_s)
                server.start()
                return time.monotonic() - stopped
            try:
                down, recover_s = restarted_and_caught_up(settings, publisher, outage, after, timeout_s)
            except AssertionError as exc:
                log = (settings.home_dir / "logs" / "consumer.log").read_text(errors="replace")[-3000:]
                raise AssertionError(f"{exc}; consumer alive: {stack.pid_of(settings, 'consumer') is not None}; "
                                     f"its log ends:\n{log}") from exc
        wait_stored(settings, publisher.acked, timeout_s)
        return ingest_figures("store (PostgreSQL) stopped", settings, publisher.acked, inject, recover_s, down,
                               started, outage_s=outage_s if inject else 0,
                               consumer_survived=stack.pid_of(settings, "consumer") == consumer_pid)


# --- case 6: HTTP app SIGKILLed during a webhook burst -----------------------------------------------------------


class WebhookClient:
    """Label Studio's side: each annotation is POSTed until it is answered 200. A refused or broken
    attempt is sent again with the same payload, as Label Studio's reconciliation would re-read it."""

    def __init__(self, settings: Settings, payloads: list[dict[str, Any]], clients: int, timeout_s: float) -> None:
        self.settings, self.timeout_s = settings, timeout_s
        self.accepted: list[str] = []
        self.failed_attempts = 0
        self._queue = list(reversed(payloads))
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _next(self) -> dict[str, Any] | None:
        with self._lock:
            return self._queue.pop() if self._queue else None

    def _run(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        with httpx.Client(base_url=self.settings.http_url, timeout=30) as client:
            while (payload := self._next()) is not None:
                while time.monotonic() < deadline:
                    try:
                        response = _post_webhook(client, self.settings, payload, attempts=1)
                    except httpx.TransportError:
                        response = None
                    if response is not None and response.status_code == 200:
                        with self._lock:
                            self.accepted.extend(response.json()["event_ids"])
                        break
                    if response is not None and response.status_code < 500:
                        raise RuntimeError(f"webhook refused: {response.status_code} {response.text}")
                    with self._lock:
                        self.failed_attempts += 1
                    time.sleep(0.2)

    def __enter__(self) -> WebhookClient:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.join()

    def join(self) -> None:
        for thread in self._threads:
            thread.join(timeout=self.timeout_s)


def http_killed_during_burst(settings: Settings, inject: bool = True, webhooks: int = 200, clients: int = 4,
                             kill_after: int = 60, down_s: float = 1.0, timeout_s: float = 180) -> CaseFigures:
    """uvicorn SIGKILLed after `kill_after` of `webhooks` ANNOTATION_CREATED posts were answered, then restarted."""
    started = time.monotonic()
    base = int(time.time() * 1000) % 10**9
    payloads = [webhook_payload(task_id=base + i, annotation_id=base + i, data=data, selected=selected, annotator=7)
                for i, (data, selected) in enumerate(feature_task(settings, n_proxy=0, n_expert=webhooks).expert_tasks)]
    with running_stack(settings):
        start(settings, "kafka")
        ensure_topics(settings)
        make_engine(settings.resolved_store_url)  # the tables, before the consumer and the readers
        start(settings, "consumer", "http")
        with WebhookClient(settings, payloads, clients, timeout_s) as client:
            wait_until(lambda: len(client.accepted) >= kill_after, timeout_s, f"{kill_after} webhooks answered")
            down = kill_and_restart(settings, "http", down_s) if inject else 0.0
            restarted_at = time.monotonic()
        if len(client.accepted) != webhooks:
            raise AssertionError(f"only {len(client.accepted)} of {webhooks} webhooks were answered 200")
        wait_stored(settings, client.accepted, timeout_s)
        recover_s = time.monotonic() - restarted_at
        return ingest_figures("http SIGKILL during webhook burst", settings, client.accepted, inject, recover_s,
                               down, started, webhooks=webhooks, failed_attempts=client.failed_attempts)


# --- case 3: Redis stopped at training dispatch ------------------------------------------------------------------

"""What every fault case shares: isolated settings, starting and killing stack components, publishing,
counting what was stored, and the figures a case reports (`CaseFigures`).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from ground.moments import utcnow
from ground.schemas import FeatureTriple, ProxyPreference
from ground.settings import Settings
from ingest.bus import make_producer, publish
from ingest.store import LabelHistoryRow, LabelRow
from proxyloop import stack, testing
from tests.conftest import wait_until


@dataclass
class CaseFigures:
    """What one case measured; `recover_s` runs from the restart to caught up / a terminal state."""

    case: str
    fault: bool
    acknowledged: int
    stored: int
    lost: int
    duplicated: int
    recover_s: float | None
    down_s: float
    total_s: float
    detail: dict[str, Any] = field(default_factory=dict)


def case_settings(home: Path, **overrides: object) -> Settings:
    """Isolated settings for one case: thresholds out of reach (no retrain from ingest), quick group rejoin,
    the broker's log in memory (the broker case asks for the durable `broker_storage="s3"`)."""
    values: dict[str, object] = {"retrain_min_expert": 10**6, "retrain_min_proxy": 10**6, "broker_storage": "memory",
                                 "kafka_session_timeout_ms": 2000, "kafka_heartbeat_interval_ms": 600}
    return testing.isolated_settings(home, **{**values, **overrides})


def worker_pings(settings: Settings) -> bool:
    """The worker answers on *these* settings' broker (workers.app.app is bound to the process's settings)."""
    from celery import Celery

    probe = Celery("proxyloop-faults-probe", broker=settings.celery_broker)
    try:
        return bool(probe.control.ping(timeout=1.0))
    except Exception:  # noqa: BLE001 - any broker error means "not up yet"
        return False
    finally:
        probe.close()


def start(settings: Settings, *names: str) -> None:
    """Start stack components from this home (the worker's health probe bound to these settings)."""
    for name in names:
        component = stack.component(name)
        if name == "worker":
            component = dataclasses.replace(component, healthy=worker_pings)
        stack.start_component(settings, component, lambda _: None)


def sigkill(settings: Settings, name: str) -> None:
    """SIGKILL a component's whole process group (no clean shutdown) and forget its pid."""
    pid = stack.pid_of(settings, name)
    if pid is None:
        raise RuntimeError(f"{name} is not running under {settings.home_dir}")
    os.killpg(pid, signal.SIGKILL)
    wait_until(lambda: stack.pid_of(settings, name) is None, 30, f"{name} to die")
    stack.stop_component(settings, name)


def kill_and_restart(settings: Settings, name: str, down_s: float) -> float:
    """SIGKILL a component, leave it down `down_s`, start it again; returns the seconds it was down."""
    killed = time.monotonic()
    sigkill(settings, name)
    time.sleep(down_s)
    start(settings, name)
    return time.monotonic() - killed


@contextmanager
def running_stack(settings: Settings) -> Iterator[None]:
    """Everything a case started from this home is stopped afterwards, whatever happened."""
    try:
        yield
    finally:
        stack.down(settings)


# --- ingest: a publisher that counts acknowledgements, and what the store holds afterwards ------------------------


class Publisher:
    """Publishes proxy preferences from a thread until stopped. An event counts once the broker
    acknowledged it; a send that failed (the broker is down) is retried with the same event."""

    def __init__(self, settings: Settings, prefix: str, pause_s: float = 0.02) -> None:
        self.settings, self.prefix, self.pause_s = settings, prefix, pause_s
        self.acked: list[str] = []
        self.failed_sends = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        producer = make_producer(self.settings)
        event: ProxyPreference | None = None
        try:
            while not self._stop.is_set():
                if event is None:
                    n = len(self.acked)
                    event = ProxyPreference(event_id=f"{self.prefix}-{n}", proxy_name="fault-judge",
                                            occurred_at=utcnow(), item=FeatureTriple(x=[float(n)], y_w=0, y_l=1))
                try:
                    publish(producer, self.settings.topic_proxy, event, wait=False).get(timeout=10)
                except Exception:  # noqa: BLE001 - the broker is away: send the same event again
                    self.failed_sends += 1
                    time.sleep(0.2)
                    continue
                self.acked.append(event.event_id)
                event = None
                time.sleep(self.pause_s)
        finally:
            producer.close(timeout=5)

    def __enter__(self) -> Publisher:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def reader(settings: Settings) -> sqlalchemy.Engine:
    # No pool: after a PostgreSQL restart every query gets a fresh connection instead of a dead one.
    return sqlalchemy.create_engine(settings.resolved_store_url, poolclass=NullPool)


def stored_ids(settings: Settings) -> set[str]:
    engine = reader(settings)
    try:
        with Session(engine) as session:
            return set(session.scalars(select(LabelRow.event_id)))
    finally:
        engine.dispose()


def extra_history_rows(settings: Settings) -> int:
    """label_history rows beyond one per stored id: a redelivery that was written twice."""
    engine = reader(settings)
    try:
        with Session(engine) as session:
            counts = session.execute(select(LabelHistoryRow.event_id, func.count()).group_by(LabelHistoryRow.event_id))
            return sum(n - 1 for _, n in counts if n > 1)
    finally:
        engine.dispose()


def wait_stored(settings: Settings, ids: list[str] | set[str], timeout_s: float) -> float:
    """Seconds until every id is stored (store errors while it comes back are retried)."""
    wanted, started = set(ids), time.monotonic()

    def caught_up() -> bool:
        try:
            return wanted <= stored_ids(settings)
        except OperationalError:
            return False
    wait_until(caught_up, timeout_s, f"{len(wanted)} acknowledged events to be stored")
    return time.monotonic() - started


def ingest_figures(case: str, settings: Settings, acked: list[str], inject: bool, recover_s: float,
                    down_s: float, started: float, **detail: Any) -> CaseFigures:
    stored = stored_ids(settings)
    return CaseFigures(case=case, fault=inject, acknowledged=len(acked), stored=len(stored & set(acked)),
                       lost=len(set(acked) - stored), duplicated=extra_history_rows(settings),
                       recover_s=round(recover_s, 2), down_s=round(down_s, 2),
                       total_s=round(time.monotonic() - started, 2), detail=detail)


def restarted_and_caught_up(settings: Settings, publisher: Publisher, outage: Callable[[], float], after: int,
                             timeout_s: float) -> tuple[float, float]:
    """Run `outage` (kills/stops, waits, restarts; returns seconds down) mid-stream. Recovered = an event
    is acknowledged again and everything acknowledged up to then is stored; `after` more events follow."""
    down_s = outage()
    restarted_at, acked_then = time.monotonic(), len(publisher.acked)
    wait_until(lambda: len(publisher.acked) > acked_then, timeout_s, "an event acknowledged after the restart")
    wait_stored(settings, list(publisher.acked), timeout_s)
    recover_s = time.monotonic() - restarted_at
    wait_until(lambda: len(publisher.acked) >= acked_then + after, timeout_s, "events acknowledged after it")
    return down_s, recover_s


# --- case 1: broker and object store SIGKILLed -----------------------------------------------------------------------

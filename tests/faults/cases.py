"""Fault cases shared by tests/faults and `bench/faults.py`: kill or stop one service of the real
stack mid-stream, restart it, and count what was acknowledged, stored, duplicated, and how long
recovery took.

Each case starts what it needs from `settings` (its own home and loopback ports) and stops it
afterwards. `inject=False` runs the same workload without the fault: the baseline that
`recover_s` is read against. Acknowledged = the broker acknowledged the publish (producer future)
or the webhook answered 200; lost = acknowledged ids not in the store; duplicated = label_history
rows beyond one per stored id, or a run trained or released more than once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
import sqlalchemy
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from ingest.bus import ensure_topics, make_producer, publish
from ingest.labelstudio import webhook_payload
from ingest.schemas import ExpertLabel, FeatureTriple, ProxyPreference, utcnow
from ingest.store import LabelHistoryRow, LabelRow, RetrainRun, make_engine, upsert_events
from ingest.synthetic import appendix_d
from proxyloop import stack
from proxyloop.demo import FINAL_STATES, _post_webhook, feature_task
from proxyloop.settings import Settings
from tests.conftest import wait_until
from tests.faults.pg import PostgresServer


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
    return stack.isolated_settings(home, **{**values, **overrides})


def _worker_pings(settings: Settings) -> bool:
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
            component = dataclasses.replace(component, healthy=_worker_pings)
        stack.start_component(settings, component, lambda _: None)


def sigkill(settings: Settings, name: str) -> None:
    """SIGKILL a component's whole process group (no clean shutdown) and forget its pid."""
    pid = stack.pid_of(settings, name)
    if pid is None:
        raise RuntimeError(f"{name} is not running under {settings.home_dir}")
    os.killpg(pid, signal.SIGKILL)
    wait_until(lambda: stack.pid_of(settings, name) is None, 30, f"{name} to die")
    stack.stop_component(settings, name)


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


def _reader(settings: Settings) -> sqlalchemy.Engine:
    # No pool: after a PostgreSQL restart every query gets a fresh connection instead of a dead one.
    return sqlalchemy.create_engine(settings.resolved_store_url, poolclass=NullPool)


def stored_ids(settings: Settings) -> set[str]:
    engine = _reader(settings)
    try:
        with Session(engine) as session:
            return set(session.scalars(select(LabelRow.event_id)))
    finally:
        engine.dispose()


def extra_history_rows(settings: Settings) -> int:
    """label_history rows beyond one per stored id: a redelivery that was written twice."""
    engine = _reader(settings)
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


def _ingest_figures(case: str, settings: Settings, acked: list[str], inject: bool, recover_s: float,
                    down_s: float, started: float, **detail: Any) -> CaseFigures:
    stored = stored_ids(settings)
    return CaseFigures(case=case, fault=inject, acknowledged=len(acked), stored=len(stored & set(acked)),
                       lost=len(set(acked) - stored), duplicated=extra_history_rows(settings),
                       recover_s=round(recover_s, 2), down_s=round(down_s, 2),
                       total_s=round(time.monotonic() - started, 2), detail=detail)


def _restarted_and_caught_up(settings: Settings, publisher: Publisher, outage: Callable[[], float], after: int,
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
            down, recover_s = _restarted_and_caught_up(settings, publisher, outage, after, timeout_s)
        wait_stored(settings, publisher.acked, timeout_s)
        return _ingest_figures("broker+objectstore SIGKILL", settings, publisher.acked, inject, recover_s, down,
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
                down, recover_s = _restarted_and_caught_up(settings, publisher, outage, after, timeout_s)
            except AssertionError as exc:
                log = (settings.home_dir / "logs" / "consumer.log").read_text(errors="replace")[-3000:]
                raise AssertionError(f"{exc}; consumer alive: {stack.pid_of(settings, 'consumer') is not None}; "
                                     f"its log ends:\n{log}") from exc
        wait_stored(settings, publisher.acked, timeout_s)
        return _ingest_figures("store (PostgreSQL) stopped", settings, publisher.acked, inject, recover_s, down,
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
            down = 0.0
            if inject:
                killed = time.monotonic()
                sigkill(settings, "http")
                time.sleep(down_s)
                start(settings, "http")
                down = time.monotonic() - killed
            restarted_at = time.monotonic()
        if len(client.accepted) != webhooks:
            raise AssertionError(f"only {len(client.accepted)} of {webhooks} webhooks were answered 200")
        wait_stored(settings, client.accepted, timeout_s)
        recover_s = time.monotonic() - restarted_at
        return _ingest_figures("http SIGKILL during webhook burst", settings, client.accepted, inject, recover_s,
                               down, started, webhooks=webhooks, failed_attempts=client.failed_attempts)


# --- case 3: Redis stopped at training dispatch ------------------------------------------------------------------


def store_training_data(settings: Settings, n_proxy: int = 300, n_expert: int = 30, seed: int = 0) -> None:
    """Labels a retrain can snapshot (paper 1's Appendix D task), written straight to the store."""
    task = appendix_d(n_proxy=n_proxy, n_expert=n_expert, seed=seed)
    now = utcnow()
    with Session(make_engine(settings.resolved_store_url)) as session:
        upsert_events(session, [ProxyPreference(event_id=f"fp{i}", proxy_name="judge", item=t, occurred_at=now)
                                for i, t in enumerate(task.proxy)])
        upsert_events(session, [ExpertLabel(event_id=f"fe{i}", annotator_id="a", item=t, occurred_at=now)
                                for i, t in enumerate(task.expert)])
        session.commit()


def retrain_runs(settings: Settings) -> dict[str, RetrainRun]:
    engine = _reader(settings)
    try:
        with Session(engine) as session:
            runs = {run.run_id: run for run in session.scalars(select(RetrainRun))}
            session.expunge_all()
            return runs
    finally:
        engine.dispose()


def releases_of(settings: Settings, run_id: str) -> int:
    """Registry versions whose lineage names this run: more than one is a double release."""
    policy_dir = settings.registry_dir / settings.policy_name
    if not policy_dir.is_dir():
        return 0
    return sum(json.loads((v / "lineage.json").read_text()).get("flow_run_id") == run_id
               for v in policy_dir.iterdir() if v.is_dir() and v.name.isdigit())


def trainings_of(settings: Settings, run_id: str) -> int:
    """How often a worker actually trained this run (a redelivery of a finished run returns its result)."""
    log = settings.home_dir / "logs" / "worker.log"
    return log.read_text(errors="replace").count(f"run {run_id}: plan ") if log.exists() else 0


def prefect_state(settings: Settings, run_id: str) -> str | None:
    try:
        response = httpx.get(f"{settings.prefect_api_url}/flow_runs/{run_id}", timeout=10)
    except httpx.HTTPError:
        return None
    return str(response.json()["state"]["type"]) if response.status_code == 200 else None


def _task_runs(settings: Settings, run_id: str, name: str) -> list[dict[str, Any]]:
    body = {"flow_runs": {"id": {"any_": [run_id]}}, "task_runs": {"name": {"like_": name}}}
    response = httpx.post(f"{settings.prefect_api_url}/task_runs/filter", json=body, timeout=10)
    runs: list[dict[str, Any]] = response.json()
    return runs


def _wait_terminal(settings: Settings, run_id: str, timeout_s: float) -> float | None:
    """Seconds until the run's store row reaches a terminal state; None if it is still not there (stuck)."""
    started, deadline = time.monotonic(), time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if retrain_runs(settings)[run_id].status in FINAL_STATES:
                return time.monotonic() - started
        except OperationalError:
            pass
        time.sleep(0.2)
    return None


def _run_figures(case: str, settings: Settings, run_id: str, inject: bool, recover_s: float | None, down_s: float,
                 started: float, **detail: Any) -> CaseFigures:
    """lost = the run left without a terminal state; duplicated = extra trainings or releases of it."""
    run = retrain_runs(settings)[run_id]
    trained, released = trainings_of(settings, run_id), releases_of(settings, run_id)
    return CaseFigures(
        case=case, fault=inject, acknowledged=1, stored=int(run.status in FINAL_STATES),
        lost=int(run.status not in FINAL_STATES), duplicated=max(0, trained - 1) + max(0, released - 1),
        recover_s=None if recover_s is None else round(recover_s, 2), down_s=round(down_s, 2),
        total_s=round(time.monotonic() - started, 2),
        detail={"run_id": run_id, "status": run.status, "error": run.summary.get("error"), "trained": trained,
                "released": released, "prefect_state": prefect_state(settings, run_id), **detail})


def _start_retrain(settings: Settings) -> subprocess.Popen[bytes]:
    """`retrain()` as its own process (as a Prefect runner would start it), logging to logs/retrain.log."""
    with open(settings.home_dir / "logs" / "retrain.log", "ab") as log:
        return subprocess.Popen([sys.executable, "-c", "from flows.retrain import retrain; retrain()"],
                                env=stack.child_env(settings), stdout=log, stderr=subprocess.STDOUT)


def _new_run(settings: Settings, before: set[str], timeout_s: float) -> str:
    def one_new() -> bool:
        new = set(retrain_runs(settings)) - before
        assert len(new) <= 1, f"one retrain started {len(new)} runs: {sorted(new)}"
        return bool(new)
    wait_until(one_new, timeout_s, "the retrain run's record in the store")
    return next(iter(set(retrain_runs(settings)) - before))


def redis_stopped(settings: Settings, inject: bool = True, during: Literal["dispatch", "training"] = "dispatch",
                  outage_s: float = 0.0, timeout_s: float = 300) -> CaseFigures:
    """Redis stopped while a retrain sends its training task to the `gpu` queue (back `outage_s` after
    the first dispatch attempt failed), or while the worker trains (back after `outage_s`; the
    embedded Redis keeps no data, so the queued message and the task's state are gone). The run must
    then complete, or end visibly failed, trained and released at most once."""
    started = time.monotonic()
    with running_stack(settings):
        start(settings, "kafka", "redis", "prefect", "worker")
        ensure_topics(settings)
        store_training_data(settings)
        before = set(retrain_runs(settings))
        stopped = time.monotonic()
        if inject and during == "dispatch":
            stack.stop_component(settings, "redis")
        flow = _start_retrain(settings)
        try:
            run_id = _new_run(settings, before, timeout_s)
            down = 0.0
            if inject and during == "dispatch":
                wait_until(lambda: any(t["run_count"] >= 1 and t["state_type"] != "RUNNING"
                                       for t in _task_runs(settings, run_id, "train-on-gpu-queue")) or
                           flow.poll() is not None, timeout_s, "a dispatch attempt to fail")
            elif inject:
                wait_until(lambda: (settings.runs_dir / run_id / "started.json").exists(), timeout_s,
                           "the worker to start training")
                stopped = time.monotonic()
                stack.stop_component(settings, "redis")
            if inject:
                time.sleep(outage_s)
                start(settings, "redis")
                down = time.monotonic() - stopped
            recover_s = _wait_terminal(settings, run_id, timeout_s)
            flow.wait(timeout=60)
            if retrain_runs(settings)[run_id].status == "failed":
                time.sleep(10)  # nothing may train the failed run once Redis is back
        finally:
            if flow.poll() is None:
                flow.kill()
        attempts = max((t["run_count"] for t in _task_runs(settings, run_id, "train-on-gpu-queue")), default=0)
        return _run_figures(f"redis stopped during {during}", settings, run_id, inject, recover_s, down, started,
                            flow_exit=flow.returncode, dispatch_attempts=attempts)


# --- case 4: the Celery worker SIGKILLed mid-training (tests/workers/test_resume_after_sigkill.py) --------------


def worker_killed_mid_training(settings: Settings, inject: bool = True, timeout_s: float = 300) -> CaseFigures:
    """A DPO run on the `gpu` queue; its worker SIGKILLed after the first checkpoint and a second one
    started: Redis redelivers the unacknowledged task, which resumes from the last checkpoint."""
    from celery import Celery

    from tests.workers.lm_helpers import tiny_model_dir, write_pairs
    from tests.workers.test_resume_after_sigkill import CONFIG, _start_worker
    from workers.lm_tasks import TRAIN_LM_TASK
    from workers.training.lm_run import LMTrainingRequest

    # Redelivery within seconds of the kill, as in the test (the default waits for hours).
    settings = settings.model_copy(update={"celery_visibility_timeout_s": 3, "celery_unacked_restore_interval_s": 1})
    started = time.monotonic()
    home = settings.home_dir
    home.mkdir(parents=True, exist_ok=True)
    request = LMTrainingRequest(run_id="fault-lm", method="dpo", base_model=str(tiny_model_dir()),
                                dataset=str(write_pairs(home / "pairs.jsonl", 24)), output_dir=str(home / "lm"),
                                config=CONFIG)
    out, log_path = Path(request.output_dir), home / "worker.log"
    workers: list[subprocess.Popen[bytes]] = []
    client = Celery("proxyloop-faults", broker=settings.celery_broker, backend=settings.celery_backend)
    with running_stack(settings):
        start(settings, "redis")
        try:
            workers.append(_start_worker(settings, log_path, "doomed"))
            sent = client.send_task(TRAIN_LM_TASK, args=[request.model_dump()], queue="gpu", task_id=request.run_id)
            down, killed_at = 0.0, 0
            restarted_at = time.monotonic()
            if inject:
                wait_until(lambda: (out / "checkpoint-000005").exists() or workers[0].poll() is not None, timeout_s,
                           "the first checkpoint")
                killed = time.monotonic()
                os.killpg(workers[0].pid, signal.SIGKILL)
                workers[0].wait()
                killed_at = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-0*")
                                if not p.name.endswith("partial"))
                workers.append(_start_worker(settings, log_path, "heir"))
                restarted_at = time.monotonic()
                down = restarted_at - killed
            try:
                result: dict[str, Any] | None = sent.get(timeout=timeout_s)
            except Exception:  # noqa: BLE001 - reported as a lost run below
                result = None
            recover_s = time.monotonic() - restarted_at if result else None
        finally:
            for worker in workers:
                if worker.poll() is None:
                    os.killpg(worker.pid, signal.SIGKILL)
                    worker.wait()
            client.close()
    steps = int(CONFIG["max_steps"])
    recorded = len(result["losses"]) if result else 0
    return CaseFigures(
        case="celery worker SIGKILL mid-training", fault=inject, acknowledged=1, stored=int(result is not None),
        lost=int(result is None), duplicated=max(0, recorded - steps), recover_s=None if recover_s is None else
        round(recover_s, 2), down_s=round(down, 2), total_s=round(time.monotonic() - started, 2),
        detail={"steps": steps, "losses_recorded": recorded, "killed_after_checkpoint": killed_at,
                "resumed_from_step": result.get("resumed_from_step") if result else None,
                "worker": result.get("worker") if result else None})


# --- case 5: the Prefect server SIGKILLed mid-flow ---------------------------------------------------------------


def _create_retrain_run(settings: Settings) -> str:
    """A run of the served `retrain/retrain` deployment, created through the Prefect API."""
    api = settings.prefect_api_url
    deployment = httpx.get(f"{api}/deployments/name/retrain/retrain", timeout=30)
    deployment.raise_for_status()
    for _ in range(30):  # a server just started answers 503 for a while
        created = httpx.post(f"{api}/deployments/{deployment.json()['id']}/create_flow_run",
                             json={"parameters": {}}, timeout=30)
        if created.status_code != 503:
            break
        time.sleep(2)
    if created.status_code >= 300:
        raise RuntimeError(f"Prefect refused a retrain run: {created.status_code} {created.text[:500]}")
    return str(created.json()["id"])


def prefect_killed_mid_flow(settings: Settings, inject: bool = True, down_s: float = 10.0,
                            timeout_s: float = 600) -> CaseFigures:
    """A retrain run served by `python -m flows.serve`; the Prefect server SIGKILLed once the worker
    is training, and started again `down_s` later. Afterwards the run must have a terminal state in
    the store and in Prefect, and at most one registry version naming it."""
    started = time.monotonic()
    with running_stack(settings):
        start(settings, "kafka", "redis", "prefect")
        ensure_topics(settings)
        start(settings, "worker", "flows")
        store_training_data(settings)
        run_id = _create_retrain_run(settings)
        wait_until(lambda: (settings.runs_dir / run_id / "started.json").exists(), timeout_s,
                   "the worker to start training")
        down = 0.0
        if inject:
            killed = time.monotonic()
            sigkill(settings, "prefect")
            time.sleep(down_s)
            start(settings, "prefect")
            down = time.monotonic() - killed
        recover_s = _wait_terminal(settings, run_id, timeout_s)
        # Prefect's own view may trail the store's (the runner reports the final state last).
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and prefect_state(settings, run_id) not in (
                "COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            time.sleep(1)
        return _run_figures("prefect server SIGKILL mid-flow", settings, run_id, inject, recover_s, down, started,
                            flows_survived=stack.pid_of(settings, "flows") is not None)

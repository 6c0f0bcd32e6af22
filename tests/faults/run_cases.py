"""Fault cases on the retrain path: Redis stopped at dispatch or mid-training, the Celery worker
SIGKILLed mid-training, the Prefect server SIGKILLed mid-flow. Duplicated = a run trained or released
more than once; every run must end in a visible terminal state.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Literal

import httpx
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from ground.moments import utcnow
from ground.schemas import ExpertLabel, ProxyPreference
from ground.settings import Settings
from ingest.bus import ensure_topics
from ingest.store import RetrainRun, make_engine, run_record
from ingest.synthetic import appendix_d
from ingest.upsert import upsert_events
from proxyloop import stack
from proxyloop.demo import FINAL_STATES
from tests.conftest import wait_until
from tests.faults.harness import CaseFigures, kill_and_restart, reader, running_stack, start


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
    engine = reader(settings)
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
        detail={"run_id": run_id, "status": run.status, "error": run_record(run).error, "trained": trained,
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

    from ground.schemas import LMTrainingRequest
    from tests.workers.lm_helpers import tiny_model_dir, write_pairs
    from tests.workers.test_resume_after_sigkill import CONFIG, _start_worker
    from workers.lm.tasks import TRAIN_LM_TASK

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
                sent.get(timeout=timeout_s)  # the TrainingResult; the run's full record is its result.json
                result: dict[str, Any] | None = json.loads((out / "result.json").read_text())
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
    """A retrain run served by `python -m flows.deployments`; the Prefect server SIGKILLed once the worker
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
        down = kill_and_restart(settings, "prefect", down_s) if inject else 0.0
        recover_s = _wait_terminal(settings, run_id, timeout_s)
        # Prefect's own view may trail the store's (the runner reports the final state last).
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and prefect_state(settings, run_id) not in (
                "COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            time.sleep(1)
        return _run_figures("prefect server SIGKILL mid-flow", settings, run_id, inject, recover_s, down, started,
                            flows_survived=stack.pid_of(settings, "flows") is not None)

"""A training run survives SIGKILL of its worker: Redis redelivers it and it resumes from the last checkpoint."""

import json
import os
import signal
import subprocess
import sys

import pytest

from ground.schemas import LMTrainingRequest
from proxyloop import stack
from tests.conftest import export, wait_until
from tests.workers.lm_helpers import tiny_model_dir, write_pairs
from workers.lm.training.run import run_lm_training

pytestmark = pytest.mark.integration

CONFIG = {"learning_rate": 1e-3, "batch_size": 2, "max_length": 64, "max_steps": 40, "checkpoint_every": 5,
          "seed": 7}


def _start_worker(settings, log_path, name):
    log = open(log_path, "ab")
    return subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "-Q", "gpu", "-c", "1", "-n",
         f"{name}@%h", "--loglevel", "INFO"],
        env=stack.child_env(settings), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def test_sigkilled_worker_run_is_redelivered_and_resumes_to_the_same_final_loss(
        service_settings, redis, tmp_path, monkeypatch):
    # A short visibility timeout so that Redis hands the dead worker's task to the next one within seconds.
    settings = service_settings.model_copy(update={"celery_visibility_timeout_s": 3,
                                                   "celery_unacked_restore_interval_s": 1})
    export(settings, monkeypatch)
    from workers.app import make_app

    app = make_app()
    data = write_pairs(tmp_path / "pairs.jsonl", 24)
    request = LMTrainingRequest(run_id="lm-kill", method="dpo", base_model=str(tiny_model_dir()),
                                dataset=str(data), output_dir=str(tmp_path / "lm-kill"), config=CONFIG)
    out = tmp_path / "lm-kill"
    log_path = tmp_path / "worker.log"

    first = _start_worker(settings, log_path, "doomed")
    sent = app.send_task("proxyloop.train_lm", args=[request.model_dump()], task_id=request.run_id)
    wait_until(lambda: (out / "checkpoint-000005").exists() or first.poll() is not None, 120, "the first checkpoint")
    assert first.poll() is None, log_path.read_text()
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert not (out / "result.json").exists(), "the run finished before the kill: raise max_steps"
    killed_at = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-0*") if not p.name.endswith("partial"))

    second = _start_worker(settings, log_path, "heir")
    try:
        returned = sent.get(timeout=240)
    finally:
        os.killpg(second.pid, signal.SIGKILL)  # nothing in flight any more; a warm shutdown takes seconds
        second.wait()

    # The task returns the run's TrainingResult; the run's full record (losses, resume point) is result.json.
    result = json.loads((out / "result.json").read_text())
    assert returned["worker"] == result["worker"] and returned["worker"].startswith("heir@")
    assert [c["path"] for c in returned["checkpoints"]] == result["checkpoints"]
    assert result["resumed_from_step"] >= 5
    assert result["resumed_from_step"] >= killed_at
    assert result["steps"] == 40 and len(result["losses"]) == 40
    assert "resuming from checkpoint-" in log_path.read_text()

    uninterrupted = run_lm_training(request.model_copy(update={"run_id": "lm-whole",
                                                               "output_dir": str(tmp_path / "lm-whole")}),
                                    lambda _: None)
    assert result["final_loss"] == pytest.approx(uninterrupted["final_loss"], rel=1e-4, abs=1e-5)
    assert result["losses"] == pytest.approx(uninterrupted["losses"], rel=1e-4, abs=1e-5)

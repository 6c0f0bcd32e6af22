"""A flow's wait on a Celery task sends it again when it is lost: its message went with the embedded Redis (which
keeps nothing across a restart) before a worker took it, or its worker was SIGKILLed mid-training (the delivery
then waits out the visibility timeout, 12 h by default, in `unacked`). Real Redis and Celery workers on loopback;
the flow side runs as its own process, as a flow run does, with the waits' thresholds shortened."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import redis as redislib

from ground.schemas import TrainingRequest
from ground.settings import Settings
from proxyloop import stack, testing
from tests.conftest import stack_env, stored_snapshot, wait_until
from tests.faults.harness import running_stack, sigkill, start

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
# The flow side: train_on_gpu_queue (training) or flows.retrain.evaluate (evaluation), as a flow run calls them.
FLOW = """
import logging, sys
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
import flows.celery_tasks as ct
ct.get_run_logger = lambda: logging.getLogger("flow")  # no Prefect run around it
ct.LOST_AFTER_S, ct.ORPHAN_AFTER_S, ct.LOOK_EVERY_S, ct.INSPECT_TIMEOUT_S = 3.0, 4.0, 1.0, 2.0
from ground.schemas import TrainingRequest, TrainingResult
from ground.settings import get_settings
if sys.argv[1] == "train":
    from workers.app import TRAIN_TASK
    out = ct.train_on_gpu_queue(TRAIN_TASK, TrainingRequest.model_validate_json(sys.argv[2]), "training task")
else:
    from flows.retrain import evaluate
    training = TrainingResult(run_id="r", device="cpu", worker="w", checkpoints=[], final_loss=0.0, seconds=0.0)
    out = evaluate.fn(get_settings(), sys.argv[2], training)
print("RESULT " + out.model_dump_json(), flush=True)
"""


def home(tmp_path: Path) -> Settings:
    return testing.isolated_settings(tmp_path / "home", worker_torch_threads=1)


def snapshot(settings: Settings) -> str:
    from ingest.synthetic import appendix_d

    return stored_snapshot(settings, appendix_d(n_proxy=200, n_expert=40, n_heldout=0, seed=0))


def training(settings: Settings, snapshot_id: str, run_id: str, epochs: int) -> TrainingRequest:
    return TrainingRequest(run_id=run_id, snapshot_id=snapshot_id, store_url=settings.resolved_store_url,
                           plan="two_stage", output_dir=str(settings.runs_dir / run_id), stage1_epochs=epochs,
                           stage2_epochs=50)


def flow(settings: Settings, what: str, argument: str) -> subprocess.Popen[str]:
    env = {**stack.child_env(settings), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", FLOW, what, argument], env=env, cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def finished(process: subprocess.Popen[str], timeout_s: float) -> str:
    """The flow side's output once it ended; it must have returned a result."""
    try:
        output, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        raise AssertionError(f"the flow's wait did not end within {timeout_s:.0f} s:\n{output[-4000:]}") from None
    assert process.returncode == 0 and "RESULT " in output, output[-4000:]
    return output


def queued(settings: Settings, queue: str) -> int:
    return int(redislib.Redis.from_url(settings.celery_broker).llen(queue))


def restart_redis(settings: Settings) -> None:
    stack.stop_component(settings, "redis")
    start(settings, "redis")


@pytest.mark.parametrize("what", ["train", "evaluate"])
def test_a_task_lost_with_a_restarted_redis_before_any_worker_took_it_is_sent_again(tmp_path, what):
    settings = home(tmp_path)
    with stack_env(), running_stack(settings):
        start(settings, "redis")
        snapshot_id = snapshot(settings)
        queue = "gpu" if what == "train" else "cpu"
        request = training(settings, snapshot_id, "run-lost", 100)
        argument = request.model_dump_json() if what == "train" else snapshot_id
        waiting = flow(settings, what, argument)
        try:
            wait_until(lambda: queued(settings, queue) == 1 or waiting.poll() is not None, 60, "the task queued")
            restart_redis(settings)  # the queued message goes with it
            assert queued(settings, queue) == 0
            start(settings, "worker")
            output = finished(waiting, 45)
        finally:
            waiting.kill()
    assert "lost with the broker; sending it again" in output, output[-4000:]
    if what == "train":
        assert '"run_id":"run-lost"' in output


def test_a_run_whose_worker_was_sigkilled_mid_training_is_sent_again_and_completes(tmp_path):
    settings = home(tmp_path)  # the default visibility timeout: Redis would hold the dead delivery for hours
    with stack_env(), running_stack(settings):
        start(settings, "redis", "worker")
        request = training(settings, snapshot(settings), "run-orphan", 3000)
        waiting = flow(settings, "train", request.model_dump_json())
        try:
            out = Path(request.output_dir)
            wait_until(lambda: (out / "started.json").exists() or waiting.poll() is not None, 60, "training")
            sigkill(settings, "worker")
            assert not (out / "result.json").exists(), "the run finished before the kill: raise its epochs"
            broker = redislib.Redis.from_url(settings.celery_broker)
            assert broker.hlen("unacked") == 1  # the dead worker's delivery
            start(settings, "worker")
            output = finished(waiting, 50)
        finally:
            waiting.kill()
        # The dead delivery was dropped when the task was sent again (not redelivered after the visibility timeout);
        # the new worker acknowledges its own once it stored the result.
        wait_until(lambda: broker.hlen("unacked") == 0, 15, "no delivery left unacknowledged")
    assert "orphaned: no live worker runs it; sending it again" in output, output[-4000:]
    assert '"run_id":"run-orphan"' in output

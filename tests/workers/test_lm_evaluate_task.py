"""`proxyloop.evaluate_lm` in a real worker process on the `cpu` queue: accuracy and indicators per checkpoint."""

import math

import pytest

from ground.schemas import EvaluationRequest, LMTrainingRequest
from tests.conftest import celery_worker, export
from tests.workers.lm_helpers import tiny_model_dir, write_pairs
from workers.lm.tasks import EVALUATE_LM_TASK
from workers.lm.training.run import run_lm_training

pytestmark = pytest.mark.integration
INDICATOR_KEYS = {f"{view}/{name}_{stat}" for view in ("teacher_forced", "generated")
                  for name in ("entropy", "entropy_raw", "mass") for stat in ("mean", "std")}


@pytest.fixture
def cpu_worker(service_settings, redis, tmp_path, monkeypatch):
    export(service_settings, monkeypatch)
    with celery_worker(service_settings, "cpu", f"cpu-test-{tmp_path.name}", tmp_path / "worker.log") as app:
        yield app


def test_every_checkpoint_gets_implicit_reward_accuracy_and_both_indicator_views(cpu_worker, tmp_path):
    base = str(tiny_model_dir())
    train = write_pairs(tmp_path / "train.jsonl", 16)
    heldout = write_pairs(tmp_path / "heldout.jsonl", 6)
    result = run_lm_training(LMTrainingRequest(
        run_id="eval", method="dpo", base_model=base, dataset=str(train), output_dir=str(tmp_path / "run"),
        config={"learning_rate": 1e-2, "batch_size": 8, "max_steps": 4, "checkpoint_every": 2}),
        progress=lambda _: None)
    # The base model itself as "step 0": its implicit reward is zero for every response.
    checkpoints = [{"step": 0, "path": base}] + [{"step": int(c[-6:]), "path": c} for c in result["checkpoints"]]

    request = EvaluationRequest(checkpoints=checkpoints, base_model=base, heldout_path=str(heldout))
    evaluation = cpu_worker.send_task(EVALUATE_LM_TASK, args=[request.model_dump(mode="json")],
                                      queue="cpu").get(timeout=180)

    assert evaluation["language_model"] is True and evaluation["n_heldout"] == 6
    assert evaluation["baseline_accuracy"] == 0.5
    evals = evaluation["evaluations"]
    assert [e["step"] for e in evals] == [0, 2, 4]
    assert evals[0]["heldout_accuracy"] == 0.5 and evals[0]["indicators"]["rewards/margins_mean"] == 0.0
    assert evaluation["n_heldout_inputs"] == 6 and evals[0]["task_scores"] == [0.5] * 6  # the reference: all ties
    for e in evals:  # the gate's test against a coin reads these: one share per task, their mean the accuracy
        assert len(e["task_scores"]) == 6 and sum(e["task_scores"]) / 6 == pytest.approx(e["heldout_accuracy"])
    assert evals[-1]["indicators"]["rewards/margins_mean"] > 0  # trained on the same kind of pairs
    for e in evals:
        assert INDICATOR_KEYS <= set(e["indicators"])
        assert e["topk_entropy"] == e["indicators"]["teacher_forced/entropy_mean"]
        assert e["topk_mass"] == e["indicators"]["teacher_forced/mass_mean"]
        assert 0 <= e["topk_entropy"] <= math.log2(10) + 1e-6 and 0 < e["topk_mass"] <= 1
    assert evals[-1]["indicators"] != evals[0]["indicators"]
    assert evaluation["base_topk_mass"] == pytest.approx(evals[0]["topk_mass"])  # step 0 is the base model

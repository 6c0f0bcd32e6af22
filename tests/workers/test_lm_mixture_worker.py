"""The mode-mixture reading as a worker run (workers/lm/mixture_run.py): each stage moves only its part of the
mixture, never the base; a checkpoint is a loadable policy; an interrupted or SIGKILLed run resumes to the same
mixture."""

import json
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from policies.lm.mode_mixture import WEIGHTS_FILE, is_mixture_dir, load_mixture_dir
from policies.lm.simplex_bottleneck import load_causal_lm_dir
from tests.workers.lm_helpers import tiny_model_dir, write_pairs
from workers.lm.plans import MixtureRecipe, recipe_request
from workers.lm.training.run import run_lm_training

RECIPE = MixtureRecipe(simplex_dim=3, batch_size=4, proxy_epochs=2, adapter_epochs=2, fine_tune_epochs=2,
                       checkpoint_every=2)
ADAPTER = {"adapter.weight", "adapter.bias", "adapter.centre_weight", "adapter.centre_bias"}


class Interrupted(Exception):
    pass


def _request(tmp_path, recipe_name, name, base=None, recipe=RECIPE):
    data = write_pairs(tmp_path / "pairs.jsonl", 12)
    return recipe_request(recipe_name, recipe, run_id=name, base_model=str(base or tiny_model_dir()),
                          dataset=str(data), output_dir=tmp_path / name)


def _mixture(checkpoint):
    return load_file(str(checkpoint / WEIGHTS_FILE))


def _base_unchanged(checkpoint):
    before = load_causal_lm_dir(tiny_model_dir()).state_dict()
    after = load_causal_lm_dir(checkpoint).state_dict()
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_stage_1_then_the_adapter_stage_moves_only_the_adapter_and_never_the_base(tmp_path):
    stage1 = run_lm_training(_request(tmp_path, "stage1", "s1"), lambda _: None)
    assert stage1["steps"] == 6 and [c.rsplit("-", 1)[1] for c in stage1["checkpoints"]] == ["000002", "000004",
                                                                                                 "000006"]
    stage1_dir = stage1["checkpoints"][-1]
    assert is_mixture_dir(stage1_dir) and _base_unchanged(stage1_dir)
    assert (tmp_path / "s1" / "checkpoint-000006" / "tokenizer.json").exists()  # a loadable policy directory
    first = _mixture(tmp_path / "s1" / "checkpoint-000006")
    assert first["theta"].abs().sum() > 0 and torch.equal(first["adapter.weight"], torch.eye(3))

    stage2 = run_lm_training(_request(tmp_path, "two_stage", "s2", base=stage1_dir), lambda _: None)
    second = _mixture(tmp_path / "s2" / "checkpoint-000006")
    moved = {k for k in first if not torch.equal(first[k], second[k])}
    assert moved and moved <= ADAPTER, moved
    assert _base_unchanged(stage2["checkpoints"][-1])
    assert load_mixture_dir(stage2["checkpoints"][-1])[1]["base_model"] == str(tiny_model_dir())
    again = run_lm_training(_request(tmp_path, "two_stage", "s2", base=stage1_dir), lambda _: None)
    assert again == json.loads((tmp_path / "s2" / "result.json").read_text())  # idempotent by run id


def test_the_all_stage_moves_every_part_of_the_mixture_but_not_the_base(tmp_path):
    stage1 = run_lm_training(_request(tmp_path, "stage1", "s1"), lambda _: None)
    tuned = run_lm_training(_request(tmp_path, "fine_tune", "ft", base=stage1["checkpoints"][-1]), lambda _: None)
    before, after = _mixture(tmp_path / "s1" / "checkpoint-000006"), _mixture(tmp_path / "ft" / "checkpoint-000006")
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert {"tau.weight", "tau.bias", "theta", "adapter.weight", "adapter.bias"} <= moved
    assert _base_unchanged(tuned["checkpoints"][-1])


def test_a_run_left_at_the_default_cadence_keeps_eight_evenly_spaced_checkpoints(tmp_path):
    recipe = replace(RECIPE, checkpoint_every=0, proxy_epochs=16)  # 3 steps an epoch: 48, every 6th kept
    result = run_lm_training(_request(tmp_path, "stage1", "auto", recipe=recipe), lambda _: None)
    assert [int(c[-6:]) for c in result["checkpoints"]] == list(range(6, 49, 6))


def test_a_later_stage_needs_a_mixture_stage_1(tmp_path):
    with pytest.raises(ValueError, match="mixture_stage='proxy'"):
        run_lm_training(_request(tmp_path, "two_stage", "no-stage1"), lambda _: None)
    bad = _request(tmp_path, "stage1", "bad")
    with pytest.raises(ValueError, match="unknown keys"):
        run_lm_training(bad.model_copy(update={"config": {**bad.config, "learning_rat": 1}}), lambda _: None)


@pytest.mark.parametrize("recipe_name", ["stage1", "two_stage"])
def test_an_interrupted_run_resumes_to_the_same_mixture_as_an_uninterrupted_one(tmp_path, recipe_name):
    recipe = replace(RECIPE, checkpoint_every=2, proxy_epochs=3, adapter_epochs=3)
    base = None
    if recipe_name != "stage1":
        base = run_lm_training(_request(tmp_path, "stage1", "s1", recipe=recipe), lambda _: None)["checkpoints"][-1]
    whole = run_lm_training(_request(tmp_path, recipe_name, "whole", base=base, recipe=recipe), lambda _: None)

    def die_at_step_5(meta):
        if meta["step"] == 5:
            raise Interrupted

    with pytest.raises(Interrupted):
        run_lm_training(_request(tmp_path, recipe_name, "cut", base=base, recipe=recipe), die_at_step_5)
    assert not (tmp_path / "cut" / "result.json").exists()
    resumed = run_lm_training(_request(tmp_path, recipe_name, "cut", base=base, recipe=recipe), lambda _: None)
    assert resumed["resumed_from_step"] == 4 and resumed["steps"] == whole["steps"] == 9
    assert resumed["losses"] == whole["losses"]
    assert [c.rsplit("-", 1)[1] for c in resumed["checkpoints"]] == [c.rsplit("-", 1)[1] for c in whole["checkpoints"]]
    final_whole, final_cut = _mixture(tmp_path / "whole" / "checkpoint-000009"), _mixture(
        tmp_path / "cut" / "checkpoint-000009")
    assert all(torch.equal(final_whole[k], final_cut[k]) for k in final_whole)


def test_a_sigkilled_run_resumes_from_its_newest_checkpoint_to_the_same_mixture(tmp_path):
    recipe = replace(RECIPE, batch_size=2, proxy_epochs=100, checkpoint_every=100)  # 6 steps an epoch: 600
    request = _request(tmp_path, "stage1", "killed", recipe=recipe)
    code = ("import sys; from ground.schemas import LMTrainingRequest; from workers.lm.training.run import "
            "run_lm_training; run_lm_training(LMTrainingRequest.model_validate_json(sys.argv[1]), lambda _: None)")
    child = subprocess.Popen([sys.executable, "-c", code, request.model_dump_json()])
    first = tmp_path / "killed" / "checkpoint-000100"
    deadline = time.monotonic() + 240
    while not first.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL, "the run ended before the kill"
    assert first.exists() and not (tmp_path / "killed" / "result.json").exists()

    resumed = run_lm_training(request, lambda _: None)
    whole = run_lm_training(_request(tmp_path, "stage1", "whole", recipe=recipe), lambda _: None)
    assert resumed["resumed_from_step"] >= 100 and resumed["steps"] == 600
    assert resumed["losses"] == whole["losses"]
    final_whole, final_cut = (_mixture(tmp_path / name / "checkpoint-000600") for name in ("whole", "killed"))
    assert all(torch.equal(final_whole[k], final_cut[k]) for k in final_whole)

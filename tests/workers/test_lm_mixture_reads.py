"""What reads a mode-mixture checkpoint besides serving: paper 1's condition tests on a mixture stage 1
(`proxyloop.text_conditions`'s body) and the held-out evaluation with paper 2's indicators."""

import math

import pytest

from ground.schemas import CheckpointRef, ConditionReport, TextConditionRequest
from tests.workers.lm_helpers import tiny_model_dir, write_pairs
from workers.lm.evaluate import evaluate_lm_checkpoints
from workers.lm.plans import MixtureRecipe, recipe_request
from workers.lm.text_conditions import text_condition_report
from workers.lm.training.run import run_lm_training

RECIPE = MixtureRecipe(simplex_dim=3, batch_size=4, proxy_epochs=2, checkpoint_every=3)


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    work = tmp_path_factory.mktemp("mixture-reads")
    proxy, expert = write_pairs(work / "proxy.jsonl", 12), write_pairs(work / "expert.jsonl", 10)
    request = recipe_request("stage1", RECIPE, run_id="s1", base_model=str(tiny_model_dir()), dataset=str(proxy),
                             output_dir=work / "s1")
    return run_lm_training(request, lambda _: None), proxy, expert


def test_the_condition_tests_read_a_mixture_stage_1(stage1):
    result, proxy, expert = stage1
    report = text_condition_report(TextConditionRequest(
        snapshot_id="snap", base_model=str(tiny_model_dir()), stage1_checkpoint=result["checkpoints"][-1],
        expert_pairs=str(expert), proxy_pairs=str(proxy), n_expert=10, n_proxy=12, beta=RECIPE.beta))
    assert isinstance(report, ConditionReport) and report.snapshot_id == "snap" and report.checks


def test_mixture_checkpoints_are_scored_by_their_own_log_probs_against_the_base(stage1):
    result, _, expert = stage1
    checkpoints = [CheckpointRef(step=int(c[-6:]), path=c) for c in result["checkpoints"]]
    evaluation = evaluate_lm_checkpoints(str(tiny_model_dir()), str(expert), checkpoints, n_indicator_prompts=4)
    assert [e.step for e in evaluation.evaluations] == [3, 6] and evaluation.n_heldout == 10
    for e in evaluation.evaluations:
        halves = e.heldout_accuracy * 2 * 10  # ties count half
        assert abs(halves - round(halves)) < 1e-6 and e.indicators["rewards/margins_mean"] != 0.0
        assert 0 <= e.topk_entropy <= math.log2(10) + 1e-6 and 0 < e.topk_mass <= 1
        assert "generated/mass_mean" in e.indicators

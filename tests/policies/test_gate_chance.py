"""The gate's test that its pick beats a coin, allowing for the pick among checkpoints (policies/gate_chance.py).
The text audit's case: on 5 held-out tasks a pure-noise proxy's checkpoints scored [1.0, 1.0, 0.8, 0.8, ...], and the
best cleared the 0.55 floor; 8 of 24 such runs were released."""

from __future__ import annotations

import numpy as np
import pytest

from ground.schemas import CheckpointEvaluation
from policies.gate_chance import EXACT_UP_TO, chance_test
from policies.promotion import GateRules, decide


def test_one_checkpoint_right_on_all_five_tasks_is_one_flip_in_thirty_two():
    test = chance_test([[1.0] * 5])
    assert (test.p_value, test.best, test.n_tasks, test.exact) == (1 / 32, 1.0, 5, True)


def test_checkpoints_that_disagree_pay_for_the_choice_and_ones_that_agree_do_not():
    missing_one_each = [[1.0] * 5] + [[0.0 if t == k else 1.0 for t in range(5)] for k in range(3)]
    assert chance_test(missing_one_each).p_value == 4 / 32  # a perfect score is reached under four flips
    assert chance_test([[1.0] * 5] * 8).p_value == 1 / 32  # eight copies of one checkpoint are one test


def test_ties_and_copied_tasks_score_halves_and_shares():
    assert chance_test([[0.5, 0.5]]).p_value == 1.0  # ties on every task: nothing a flip can change
    assert chance_test([[0.75, 1.0]]).p_value == pytest.approx(1 / 4)  # only the labels as given reach 0.875


def test_above_the_exact_limit_flips_are_sampled_with_the_labels_as_given_among_them():
    scores = [[1.0] * (EXACT_UP_TO + 8)]
    test = chance_test(scores)
    assert not test.exact and 0 < test.p_value < 0.001  # never 0: the labels as given count
    assert chance_test(scores).p_value == test.p_value  # seeded


@pytest.mark.parametrize("n_tasks", [6, 20, 60])
def test_noise_checkpoints_are_shown_better_than_a_coin_at_most_alpha_of_the_time(n_tasks):
    """A training run's checkpoints drift: each copies the previous one's ranking on most tasks. Their labels carry no
    information about the rankings. Size over 400 such runs of 8 checkpoints."""
    rng = np.random.default_rng(n_tasks)
    passed = floor = 0
    for _ in range(400):
        ranking = rng.random(n_tasks) < 0.5
        checkpoints = []
        for _ in range(8):
            ranking = np.where(rng.random(n_tasks) < 0.2, rng.random(n_tasks) < 0.5, ranking)
            checkpoints.append(ranking.astype(float))
        labels = rng.random(n_tasks) < 0.5
        scores = np.where(labels, np.array(checkpoints), 1.0 - np.array(checkpoints))
        passed += chance_test(scores.tolist()).p_value <= 0.05
        floor += scores.mean(axis=1).max() >= 0.55
    assert passed / 400 <= 0.05 + 0.025  # 0.025: about three binomial standard errors at 400 runs
    assert floor / 400 > 0.4  # what the 0.55 floor alone lets through


def _checkpoint(step: int, scores: list[float] | None, accuracy: float | None = None) -> CheckpointEvaluation:
    mean = float(np.mean(scores)) if scores else (accuracy or 0.0)
    return CheckpointEvaluation(step=step, path=f"/c/{step}", heldout_accuracy=mean, topk_entropy=1.0, topk_mass=None,
                                task_scores=scores)


RULES = GateRules(indicators="not_applicable", chance_alpha=0.05)


def test_the_audits_noise_checkpoints_are_blocked_and_a_clear_winner_released():
    noise = [_checkpoint(1, [1, 1, 1, 1, 1]), _checkpoint(2, [1, 1, 1, 0, 1]), _checkpoint(3, [1, 0, 1, 1, 1]),
             _checkpoint(4, [0, 1, 1, 1, 1]), _checkpoint(5, [1, 1, 0, 1, 1])]
    blocked = decide(noise, 0.5, RULES)
    assert blocked.decision == "block" and blocked.checkpoint is not None and blocked.checkpoint.step == 1
    assert blocked.reasons[-1].startswith("not shown better than a coin: p = 0.1562")
    assert "PROXYLOOP_GATE_CHANCE_ALPHA" in blocked.reasons[-1]
    good = [_checkpoint(s, [1.0] * 17 + [0.0] * 3) for s in (1, 2, 3)]
    released = decide(good, 0.5, RULES)
    assert released.decision == "pick_checkpoint"  # all tie: the earliest, as ever
    assert any(r.startswith("better than a coin: p = 0.00") for r in released.reasons)
    advisory = decide(noise, 0.5, GateRules(indicators="not_applicable"))  # the default: reported, not applied
    assert advisory.decision == "pick_checkpoint" and advisory.reasons[-2].startswith(
        "advisory (PROXYLOOP_GATE_CHANCE_ALPHA=1), not applied: test against a coin: p = 0.1562")


def test_without_per_task_scores_the_rules_decide_as_before_and_say_the_test_was_not_run():
    decision = decide([_checkpoint(1, None, accuracy=0.8)], 0.5, RULES)
    assert decision.decision == "release" and "test against a coin not run" in decision.reasons[-1]

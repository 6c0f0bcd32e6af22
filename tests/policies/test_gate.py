import pytest

from ground.schemas import CheckpointEvaluation
from policies.promotion import GateRules, decide


def _evals(accuracies, entropies=None, masses=None):
    entropies = entropies or [1.0] * len(accuracies)
    masses = masses or [1.0] * len(accuracies)
    return [CheckpointEvaluation(step=50 * i, path=f"c{i}", heldout_accuracy=a, topk_entropy=e, topk_mass=m)
            for i, (a, e, m) in enumerate(zip(accuracies, entropies, masses, strict=True))]


def test_releases_last_checkpoint_when_it_is_best():
    decision = decide(_evals([0.6, 0.7, 0.8]), baseline_accuracy=0.7, rules=GateRules())
    assert decision.decision == "release" and decision.checkpoint.step == 100
    assert any("baseline" in r for r in decision.reasons)


def test_blocks_below_the_accuracy_floor():
    decision = decide(_evals([0.4, 0.5]), baseline_accuracy=0.3, rules=GateRules(min_heldout_accuracy=0.55))
    assert decision.decision == "block"
    assert any("floor" in r for r in decision.reasons)


def test_blocks_when_worse_than_the_baseline():
    decision = decide(_evals([0.6, 0.62]), baseline_accuracy=0.8, rules=GateRules())
    assert decision.decision == "block"


DECIDE = GateRules(indicators="decide")


def test_entropy_peak_then_decline_picks_the_peak_checkpoint():
    decision = decide(_evals([0.6, 0.7, 0.75, 0.8], entropies=[1.0, 1.5, 1.2, 0.9]), 0.5, DECIDE)
    assert decision.decision == "pick_checkpoint"
    assert decision.checkpoint.step == 50
    assert any("peaked" in r for r in decision.reasons)


def test_mass_collapse_excludes_later_checkpoints():
    decision = decide(_evals([0.6, 0.7, 0.9], masses=[1.0, 0.95, 0.5]), 0.5, DECIDE)
    assert decision.checkpoint.step == 50
    assert any("mass" in r for r in decision.reasons)


def test_no_checkpoints_blocks():
    assert decide([], 0.5, GateRules()).decision == "block"


def test_without_indicators_a_confident_policy_is_not_blocked_for_falling_entropy():
    evals = _evals([0.6, 0.8, 0.9], entropies=[1.5, 1.0, 0.5])
    decision = decide(evals, 0.5, GateRules(indicators="not_applicable"))
    assert decision.decision == "release" and decision.checkpoint.step == 100
    assert any("not applicable" in r for r in decision.reasons)


def test_a_fall_with_a_bump_after_the_peak_still_triggers():
    evals = _evals([0.6, 0.7, 0.75, 0.8, 0.9], entropies=[1.0, 0.9, 0.91, 0.8, 0.7])
    decision = decide(evals, 0.5, DECIDE)
    assert decision.checkpoint.step == 0 and any("peaked at step 0" in r for r in decision.reasons)


def test_noise_around_a_plateau_is_not_a_fall():
    evals = _evals([0.6, 0.7, 0.8, 0.9], entropies=[1.0, 0.995, 1.0, 0.993])
    decision = decide(evals, 0.5, DECIDE)
    assert decision.checkpoint.step == 150 and not any("peaked" in r for r in decision.reasons)


def test_the_mass_rule_compares_against_the_base_model():
    evals = _evals([0.6, 0.7, 0.9], masses=[0.78, 0.77, 0.76])  # flat across checkpoints, far below the base
    assert decide(evals, 0.5, DECIDE).checkpoint.step == 100  # against the first checkpoint: no collapse
    decision = decide(evals, 0.5, DECIDE, base_mass=1.0)
    assert decision.checkpoint.step == 0  # every checkpoint collapsed: the earliest is kept
    assert any("below the base model's 1.000" in r for r in decision.reasons)


def test_advisory_indicators_are_reported_but_do_not_change_the_pick():
    evals = _evals([0.6, 0.7, 0.75, 0.8], entropies=[1.0, 1.5, 1.2, 0.9])
    advisory = decide(evals, 0.5, GateRules())  # the default
    assert advisory.decision == "release" and advisory.checkpoint.step == 150
    assert any(r.startswith("advisory") and "peaked at step 50" in r for r in advisory.reasons)
    assert decide(evals, 0.5, DECIDE).checkpoint.step == 50


# Found by a release audit (/tmp/audit_rel/p_gate.py): NaN readings and checkpoints out of step order.

NAN = float("nan")


def _at(steps, accuracies, entropies=None, masses=None):
    """Evaluations at the given steps, in the order given."""
    return [e.model_copy(update={"step": s, "path": f"c{s}"})
            for s, e in zip(steps, _evals(accuracies, entropies, masses), strict=True)]


def test_all_nan_accuracies_block_with_no_checkpoint():
    decision = decide(_evals([NAN, NAN]), 0.5, GateRules())
    assert decision.decision == "block" and decision.checkpoint is None
    assert any("not finite at steps [0, 50]" in r for r in decision.reasons)


def test_a_nan_accuracy_is_left_out_named_and_never_the_pick():
    """NaN is a diverged checkpoint's (pairwise_accuracy): the others are still judged, not all blocked."""
    for accuracies in ([NAN, 0.9], [0.9, NAN]):
        decision = decide(_evals(accuracies), 0.5, GateRules())
        assert decision.decision in ("release", "pick_checkpoint") and decision.checkpoint.heldout_accuracy == 0.9
        assert any("accuracy is not finite" in r and "left out" in r for r in decision.reasons)


def test_a_nan_baseline_blocks():
    decision = decide(_evals([0.56]), NAN, GateRules())
    assert decision.decision == "block" and any("baseline accuracy is nan" in r for r in decision.reasons)
    assert decide(_evals([0.56]), float("inf"), GateRules()).decision == "block"


def test_a_nan_first_entropy_does_not_hide_the_fall_after_the_peak():
    decision = decide(_evals([0.6, 0.7, 0.8, 0.85, 0.9], entropies=[NAN, 3.0, 2.5, 2.0, 1.5]), 0.5, DECIDE)
    assert decision.checkpoint.step == 50 and any("peaked at step 50" in r for r in decision.reasons)
    assert any("top-k entropy is not finite at steps [0]: ignored" in r for r in decision.reasons)


def test_a_nan_or_zero_base_mass_is_ignored_not_a_switch_that_turns_the_mass_rule_off():
    for base_mass in (NAN, 0.0, float("inf")):
        decision = decide(_evals([0.8, 0.8], masses=[0.9, 0.1]), 0.5, DECIDE, base_mass=base_mass)
        assert decision.checkpoint.step == 0, base_mass
        assert any(f"base model top-k mass {base_mass} is not a usable reading" in r for r in decision.reasons)
        assert any("below the first checkpoint's 0.900" in r for r in decision.reasons)


def test_a_nan_checkpoint_mass_is_ignored_and_named():
    decision = decide(_evals([0.7, 0.8, 0.9], masses=[NAN, 0.9, 0.1]), 0.5, DECIDE)
    assert decision.checkpoint.step == 50  # measured from the first usable mass, 0.9 at step 50
    assert any("top-k mass is not finite at steps [0]" in r for r in decision.reasons)


def test_the_last_checkpoint_is_the_last_step_not_the_last_in_the_list():
    decision = decide(_at([300, 100, 200], [0.9, 0.7, 0.8]), 0.5, GateRules())
    assert decision.decision == "release" and decision.checkpoint.step == 300


def test_the_indicator_rules_read_checkpoints_in_step_order():
    shuffled = _at([150, 0, 100, 50], [0.8, 0.6, 0.75, 0.7], entropies=[0.9, 1.0, 1.2, 1.5])
    decision = decide(shuffled, 0.5, DECIDE)  # by step: 1.0, 1.5, 1.2, 0.9: peaked at 50, then fell
    assert decision.decision == "pick_checkpoint" and decision.checkpoint.step == 50


def test_duplicate_steps_are_refused():
    with pytest.raises(ValueError, match=r"evaluated more than once: \[50\]"):
        decide(_at([0, 50, 50], [0.6, 0.7, 0.8]), 0.5, GateRules())

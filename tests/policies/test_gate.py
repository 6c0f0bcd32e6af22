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

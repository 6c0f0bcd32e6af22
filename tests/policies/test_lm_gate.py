"""The language-model gate states the indicator trend it judged, whether or not a rule fired."""

from ground.schemas import CheckpointEvaluation
from policies.lm.gate import decide_language_model
from policies.promotion import GateRules

DECIDE = GateRules(indicators="decide")


def _evals(entropy, mass, accuracy):
    return [CheckpointEvaluation(step=10 * (i + 1), path=f"c{i}", heldout_accuracy=a, topk_entropy=e, topk_mass=m)
            for i, (e, m, a) in enumerate(zip(entropy, mass, accuracy, strict=True))]


def test_a_steady_run_is_released_with_reasons_citing_entropy_and_mass():
    decision = decide_language_model(_evals([1.0, 1.1, 1.2], [0.9, 0.9, 0.91], [0.7, 0.8, 0.9]), 0.5, DECIDE)
    assert decision.decision == "release" and decision.checkpoint.step == 30
    assert "1.000 → 1.100 → 1.200" in decision.reasons[0] and "no peak" in decision.reasons[0]
    assert "top-k mass" in decision.reasons[1] and "within the 20% limit" in decision.reasons[1]


def test_entropy_peak_then_decline_picks_the_peak_even_when_later_accuracy_is_higher():
    decision = decide_language_model(_evals([1.0, 1.4, 1.2, 1.0], [0.9] * 4, [0.7, 0.8, 0.85, 0.9]), 0.5,
                                     DECIDE)
    assert decision.decision == "pick_checkpoint" and decision.checkpoint.step == 20
    assert "peaked, then 2+ new lows" in decision.reasons[0]
    assert any("peaked at step 20" in r for r in decision.reasons)


def test_a_mass_collapse_is_named_with_its_size():
    decision = decide_language_model(_evals([1.0, 1.1, 1.2], [0.9, 0.6, 0.5], [0.7, 0.8, 0.9]), 0.5, DECIDE)
    assert decision.checkpoint.step == 10
    assert "44.4% exceeds the 20% limit" in decision.reasons[1]
    based = decide_language_model(_evals([1.0, 1.1, 1.2], [0.9, 0.6, 0.5], [0.7, 0.8, 0.9]), 0.5, DECIDE, 1.0)
    assert "from the base model's 1.000 50.0% exceeds" in based.reasons[1]


def test_fired_rules_name_the_peak_the_new_lows_and_each_collapsed_checkpoint():
    from policies.lm.gate import fired_rules

    evals = _evals([1.0, 0.9, 0.91, 0.8, 0.7], [0.9, 0.9, 0.6, 0.9, 0.5], [0.6] * 5)
    flags = fired_rules(evals, DECIDE, base_mass=0.9)
    assert flags[10] == ["entropy peak"]
    assert flags[20] == ["entropy new low after the peak"] and flags[40] == ["entropy new low after the peak"]
    assert flags[30][0].startswith("mass 0.600 < 0.720 (20% below base)")
    assert fired_rules(evals, GateRules(indicators="not_applicable")) == {e.step: [] for e in evals}


def test_a_missing_mass_is_shown_as_n_a_and_not_counted_as_a_drop():
    """Found by a release audit: a None mass read as 0.0, "100.0% exceeds", though no rule fired."""
    decision = decide_language_model(_evals([1.0, 1.0], [0.9, None], [0.8, 0.8]), 0.5, DECIDE)
    assert "0.900 → n/a" in decision.reasons[1] and "0.0% within the 20% limit" in decision.reasons[1]
    assert any("no rule fired" in r for r in decision.reasons)
    none = decide_language_model(_evals([1.0, 1.0], [None, None], [0.8, 0.8]), 0.5, DECIDE)
    assert "n/a → n/a; no usable reading: the mass rule did not apply" in none.reasons[1]


def test_the_trend_is_reported_in_step_order_and_a_nan_base_mass_is_not_called_the_base():
    evals = _evals([1.0, 1.1, 1.2], [0.9, 0.6, 0.5], [0.7, 0.8, 0.9])
    decision = decide_language_model(evals[::-1], 0.5, DECIDE, float("nan"))
    assert "at steps [10, 20, 30]: 1.000 → 1.100 → 1.200" in decision.reasons[0]
    assert "from the first checkpoint's 44.4% exceeds" in decision.reasons[1]
    assert decision.checkpoint.step == 10


def test_fired_rules_ignore_a_nan_base_mass_and_read_steps_in_order():
    from policies.lm.gate import fired_rules

    evals = _evals([1.0, 0.9, 0.91, 0.8, 0.7], [0.9, 0.9, 0.6, 0.9, 0.5], [0.6] * 5)
    flags = fired_rules(evals[::-1], DECIDE, base_mass=float("nan"))
    assert flags[10] == ["entropy peak"] and flags[40] == ["entropy new low after the peak"]
    assert flags[30][0].startswith("mass 0.600 < 0.720 (20% below first checkpoint)")

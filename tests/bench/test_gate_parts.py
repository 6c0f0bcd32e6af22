"""The gate bench's statistics: online indicator rules, detection and false alarms, rank correlation, the unbiased
oracle denominator and the out-of-sample fit (bench/gate_parts.py), on hand-made runs."""

from __future__ import annotations

import pytest

from bench.gate_parts import (
    Rule,
    Run,
    RunSpec,
    Score,
    bootstrap_ci,
    detection,
    fit_detector,
    gate_pick,
    heldout_pick,
    ratio_to_oracle,
    spearman,
)


def _score(step: int, gold: float, entropy: float, mass: float = 0.9, accuracy: float = 0.6,
           gold_b: float | None = None) -> Score:
    indicators = {f"{view}/{name}_mean": value for view in ("generated", "teacher_forced")
                  for name, value in (("entropy", entropy), ("mass", mass))}
    b = gold if gold_b is None else gold_b
    return Score(step, f"c{step}", [gold] * 8, [b] * 8, accuracy, indicators)


def _run(gold: list[float], entropy: list[float], mass: list[float] | None = None, seed: int = 0,
         accuracy: list[float] | None = None) -> Run:
    mass = mass or [0.9] * len(gold)
    accuracy = accuracy or [0.6] * len(gold)
    checkpoints = [_score(10 * (i + 1), g, h, m, a)
                   for i, (g, h, m, a) in enumerate(zip(gold, entropy, mass, accuracy, strict=True))]
    return Run(RunSpec("sigmoid", 0.02, 1e-2, seed), _score(0, 0.2, 2.0, 0.9), checkpoints)


def test_a_run_falls_only_when_gold_drops_past_its_standard_error() -> None:
    falling = _run([0.2, 0.4, 0.5, 0.3], [2, 2, 2, 2])
    assert falling.peak == 2 and falling.fall == 3
    noisy = _run([0.5, 0.45], [2, 2])
    noisy.checkpoints[0].gold_a = noisy.checkpoints[0].gold_b = [0.0, 1.0] * 4
    noisy.checkpoints[1].gold_a = noisy.checkpoints[1].gold_b = [0.0, 0.9] * 4
    assert noisy.fall is None


def test_rules_fire_online_and_detection_counts_signals_at_or_before_the_peak() -> None:
    entropy = Rule("generated", "entropy", 0.0, lows=2)
    # Entropy peaks at index 1 and reaches 2 new lows by index 3; gold peaks at index 4 then falls: detected, lead 1.
    early = _run([0.2, 0.3, 0.4, 0.5, 0.6, 0.3], [2.0, 2.5, 2.2, 2.0, 1.8, 1.5])
    assert entropy.fires_at(early) == 3
    late = _run([0.2, 0.6, 0.3, 0.2], [2.0, 2.1, 2.2, 2.3])  # falls, entropy never peaks: missed
    steady = _run([0.2, 0.3, 0.4, 0.5], [2.0, 2.5, 2.2, 2.0])  # does not fall, the rule fires: a false alarm
    result = detection(entropy, [early, late, steady])
    assert (result.detection, result.false_alarm, result.lead) == (0.5, 1.0, 1.0)
    mass = Rule("teacher_forced", "mass", 0.2)
    assert mass.fires_at(_run([0.2, 0.3, 0.1], [2, 2, 2], mass=[0.9, 0.7, 0.5])) == 1  # base 0.9: limit 0.72
    assert fit_detector([entropy, mass], [early, late, steady]).kind == "mass"  # no false alarm beats one


def test_spearman_matches_ranks_and_handles_ties_and_constants() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(0.8660254)
    assert spearman([1, 1, 1], [1, 2, 3]) is None
    assert spearman([1, 2], [1, 2]) is None


def test_the_oracle_is_chosen_on_one_sample_set_and_scored_on_the_other() -> None:
    run = _run([0.2, 0.5], [2, 2])
    run.checkpoints[0] = _score(10, 0.6, 2.0, gold_b=0.3)  # lucky on set A
    run.checkpoints[1] = _score(20, 0.5, 2.0, gold_b=0.5)
    assert ratio_to_oracle(run, 1) == pytest.approx(0.5 / 0.3)  # the oracle (chosen on A) scored on B
    assert ratio_to_oracle(run, None) == pytest.approx(0.2 / 0.3)  # blocked: the base stays


def test_gate_pick_follows_the_rule_and_the_floor() -> None:
    run = _run([0.3, 0.6, 0.4, 0.2], [2.0, 2.5, 2.2, 2.0], accuracy=[0.6, 0.62, 0.64, 0.7])
    assert heldout_pick(run) == 3
    assert gate_pick(run, None, 0.55) == 3  # advisory: the plain pick
    assert gate_pick(run, Rule("generated", "entropy", 0.0, 2), 0.55) == 1  # the entropy peak
    assert gate_pick(run, None, 0.75) is None  # below the floor: blocked


def test_bootstrap_interval_brackets_the_mean() -> None:
    low, high = bootstrap_ci([0.8, 0.9, 1.0, 1.1])
    assert low < 0.95 < high and low >= 0.8 and high <= 1.1


def test_diagnostic_readings_compare_with_the_base_and_stay_out_of_the_gate() -> None:
    run = _run([0.3, 0.4, 0.2], [1.9, 1.5, 0.9], mass=[0.95, 0.99, 1.0])  # base: entropy 2.0, mass 0.9
    assert Rule("generated", "entropy_floor", 0.2).fires_at(run) == 1  # 1.5 < 1.6
    assert Rule("generated", "mass_rise", 0.1).fires_at(run) == 2  # 0.99 is not above 0.9 * 1.1; 1.0 is
    assert not Rule("generated", "mass_rise", 0.1).in_gate
    with pytest.raises(ValueError, match="diagnostic"):
        Rule("generated", "entropy_floor", 0.2).gate_rules()

"""Specification of paper 2's top-k entropy and top-k mass indicators."""

from __future__ import annotations

import math

import pytest
import torch

from policies.indicators import summarise, topk_indicators


def test_hand_computed_entropy_and_mass() -> None:
    logits = torch.tensor([0.5, 0.25, 0.125, 0.125]).log()
    entropy, mass = topk_indicators(logits, k=2)
    # Top-2 raw probabilities 0.5 and 0.25, renormalised to 2/3 and 1/3.
    expected = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert float(entropy) == pytest.approx(expected, rel=1e-5)
    assert float(mass) == pytest.approx(0.75, rel=1e-6)
    raw_entropy, raw_mass = topk_indicators(logits, k=2, renormalise=False)
    assert float(raw_entropy) == pytest.approx(0.5 * 1 + 0.25 * 2, rel=1e-5)
    assert float(raw_mass) == float(mass)


def test_uniform_over_twenty_with_k_ten() -> None:
    entropy, mass = topk_indicators(torch.zeros(20), k=10)
    assert float(entropy) == pytest.approx(math.log2(10), rel=1e-5)
    assert float(mass) == pytest.approx(0.5, rel=1e-5)
    raw_entropy, _ = topk_indicators(torch.zeros(20), k=10, renormalise=False)
    assert float(raw_entropy) == pytest.approx(0.5 * math.log2(20), rel=1e-5)


def test_k_is_clamped_to_the_vocabulary() -> None:
    logits = torch.tensor([2.0, 0.0, -1.0, 0.5])
    entropy, mass = topk_indicators(logits, k=50)
    p = torch.softmax(logits, dim=-1)
    assert float(mass) == pytest.approx(1.0, rel=1e-6)
    assert float(entropy) == pytest.approx(float(-(p * p.log2()).sum()), rel=1e-5)


def test_every_position_gets_its_own_value() -> None:
    logits = torch.randn(2, 3, 50, generator=torch.Generator().manual_seed(0))
    entropy, mass = topk_indicators(logits)
    assert entropy.shape == mass.shape == (2, 3)
    one_entropy, one_mass = topk_indicators(logits[1, 2])
    assert float(entropy[1, 2]) == pytest.approx(float(one_entropy), rel=1e-6)
    assert float(mass[1, 2]) == pytest.approx(float(one_mass), rel=1e-6)


def test_certain_outputs_have_zero_entropy_not_nan() -> None:
    logits = torch.tensor([0.0, -math.inf, -math.inf, -math.inf])
    entropy, mass = topk_indicators(logits, k=3)
    assert float(entropy) == 0.0
    assert float(mass) == 1.0


def test_half_precision_logits_are_computed_in_float32() -> None:
    entropy, mass = topk_indicators(torch.zeros(20, dtype=torch.float16), k=10)
    assert entropy.dtype == torch.float32
    assert float(entropy) == pytest.approx(math.log2(10), rel=1e-5)


def test_bad_k_is_refused() -> None:
    with pytest.raises(ValueError, match="k must be >= 1"):
        topk_indicators(torch.zeros(5), k=0)


def test_summarise_gives_mean_and_population_std() -> None:
    assert summarise(torch.tensor([1.0, 2.0, 3.0, 4.0])) == pytest.approx({"mean": 2.5, "std": math.sqrt(1.25)})
    with pytest.raises(ValueError, match="empty"):
        summarise(torch.tensor([]))


@pytest.mark.parametrize("renormalise", [True, False])
@pytest.mark.parametrize("row", ["all -inf", "one +inf", "NaN"])
def test_undefined_softmax_gives_nan_for_both_not_zero_entropy(row, renormalise) -> None:
    """Found by a release audit: these rows read -0.0 bits ("fully confident") next to a NaN mass."""
    logits = torch.zeros(2, 20)
    logits[0] = {"all -inf": -math.inf, "NaN": math.nan}.get(row, 0.0)
    if row == "one +inf":
        logits[0, 3] = math.inf
    entropy, mass = topk_indicators(logits, renormalise=renormalise)
    assert math.isnan(float(entropy[0])) and math.isnan(float(mass[0]))
    assert float(entropy[1]) == pytest.approx(math.log2(10) if renormalise else 0.5 * math.log2(20), rel=1e-5)


def test_a_certain_output_reads_plus_zero_bits() -> None:
    entropy, _ = topk_indicators(torch.tensor([0.0, -math.inf, -math.inf]))
    assert math.copysign(1.0, float(entropy)) == 1.0


def test_the_gate_ignores_an_undefined_reading_instead_of_reading_a_collapse() -> None:
    from ground.schemas import CheckpointEvaluation
    from policies.promotion import GateRules, decide

    undefined, _ = topk_indicators(torch.full((1, 20), -math.inf))
    entropies = [1.0, 1.5, 1.2, float(undefined.mean())]  # read as 0 bits, the last would be a second new low
    evals = [CheckpointEvaluation(step=i, path=f"c{i}", heldout_accuracy=a, topk_entropy=e, topk_mass=0.5)
             for i, (e, a) in enumerate(zip(entropies, [0.6, 0.7, 0.8, 0.9], strict=True))]
    decision = decide(evals, 0.5, GateRules(indicators="decide"))
    assert decision.decision == "release" and decision.checkpoint.step == 3
    assert not any("peaked" in r for r in decision.reasons)
    assert any("top-k entropy is not finite at steps [3]: ignored" in r for r in decision.reasons)

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

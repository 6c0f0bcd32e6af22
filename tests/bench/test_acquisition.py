"""The bench's "labels to target" figures (bench/acquisition_parts.py)."""

from __future__ import annotations

import numpy as np
import pytest

from bench.acquisition_parts import bootstrap_ratios, labels_ratio, labels_to_target, mean_curve


def test_labels_to_target_interpolates_and_flags_a_lower_bound() -> None:
    curve = {5: 0.6, 10: 0.7, 15: 0.8, 20: 0.9}
    assert labels_to_target(curve, 0.75) == (12.5, True)
    assert labels_to_target(curve, 0.8) == (15.0, True)
    assert labels_to_target(curve, 0.5) == (5.0, True)  # already there at the first batch
    assert labels_to_target(curve, 0.95) == (20.0, False)  # never: the budget, a lower bound
    assert labels_to_target({5: 0.9, 10: 0.6, 15: 0.9}, 0.85) == (5.0, True)  # the first crossing counts
    with pytest.raises(ValueError):
        labels_to_target({}, 0.5)


def test_labels_ratio_uses_averaged_curves() -> None:
    sizes = range(5, 105, 5)
    random = [{n: 0.5 + 0.004 * n for n in sizes}, {n: 0.5 + 0.002 * n for n in sizes}]  # mean 0.5 + 0.003 n
    ranked = [{n: min(0.8, 0.5 + 0.012 * n) for n in sizes}] * 2
    figure = labels_ratio(random, ranked, 100)
    assert mean_curve(random)[100] == pytest.approx(0.8)
    assert figure.target == pytest.approx(0.8)
    assert figure.random_labels == pytest.approx(100.0)
    assert figure.ranked_labels == pytest.approx(25.0) and figure.ranked_reached
    assert figure.ratio == pytest.approx(4.0)
    never = labels_ratio(random, [{n: 0.6 for n in sizes}], 100)
    assert not never.ranked_reached and never.ranked_labels == 100.0 and never.ratio == pytest.approx(1.0)


def test_bootstrap_resamples_seeds_with_their_worlds() -> None:
    sizes = range(5, 105, 5)
    random = {s: [{n: 0.5 + 0.003 * n for n in sizes}] for s in (100, 101, 102)}
    ranked = {s: [{n: min(0.8, 0.5 + 0.012 * n) for n in sizes}] for s in (100, 101, 102)}
    ratios = bootstrap_ratios(random, ranked, 100, 20, np.random.default_rng(0))
    assert len(ratios) == 20 and ratios == pytest.approx([4.0] * 20)

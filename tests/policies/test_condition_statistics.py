"""Each condition-test statistic on hand-built inputs whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from policies.condition_statistics import (
    bootstrap_mean,
    coverage,
    distance_ratios,
    encoding_dimension,
    favourite_shares,
    grouped_folds,
    input_groups,
    log_ratios,
    preferred_outputs,
    relaxation_constant,
)
from policies.plan_choice import significantly_worse


def _rng() -> np.random.Generator:
    return np.random.default_rng(0)


def test_bootstrap_of_a_constant_has_no_spread_and_a_sure_sign() -> None:
    up = bootstrap_mean(np.full(20, 0.3), _rng())
    assert (up.mean, up.low, up.high, up.p_not_positive) == pytest.approx((0.3, 0.3, 0.3, 0.0))
    assert bootstrap_mean(np.full(20, -0.3), _rng()).p_not_positive == 1.0
    assert bootstrap_mean(np.zeros(5), _rng()).p_not_positive == 1.0  # "mean > 0" is not shown by zeros


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_n() -> None:
    rng = np.random.default_rng(1)
    small = bootstrap_mean(rng.normal(1.0, 1.0, 25), _rng())
    large = bootstrap_mean(rng.normal(1.0, 1.0, 2500), _rng())
    assert small.low < small.mean < small.high
    assert large.high - large.low < (small.high - small.low) / 5  # ∝ 1/√n: 10x narrower
    assert large.low < 1.0 < large.high
    with pytest.raises(ValueError, match="non-empty 1-d"):
        bootstrap_mean(np.array([]), _rng())


def test_log_ratios_centre_each_row_and_ignore_the_normaliser() -> None:
    lp = np.log(np.array([[0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3]]))
    z = log_ratios(lp)
    np.testing.assert_allclose(z.sum(axis=1), 0.0, atol=1e-12)
    np.testing.assert_allclose(z[1], 0.0, atol=1e-12)
    np.testing.assert_allclose(log_ratios(lp + 7.0), z)  # unnormalised scores give the same point
    np.testing.assert_allclose(z[0], [2 / 3 * np.log(2), -1 / 3 * np.log(2), -1 / 3 * np.log(2)])


def test_encoding_dimension_counts_the_directions_the_points_span() -> None:
    t = np.linspace(-1, 1, 50)
    line = np.outer(t, [1.0, -2.0, 1.0])
    plane = np.stack([t, t**2, np.zeros_like(t)], axis=1)
    assert encoding_dimension(line, 0.99)[0] == 1
    assert encoding_dimension(plane, 0.99)[0] == 2
    assert encoding_dimension(np.random.default_rng(0).standard_normal((500, 4)), 0.99)[0] == 4
    dim, explained = encoding_dimension(np.ones((10, 3)), 0.99)
    assert dim == 0 and not explained.any()
    _, explained = encoding_dimension(plane, 0.99)
    assert explained[-1] == pytest.approx(1.0) and np.all(np.diff(explained) >= -1e-12)


def test_favourite_shares_and_preferred_outputs() -> None:
    lp = np.log(np.array([[0.6, 0.3, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.5, 0.4, 0.1]]))
    shares = favourite_shares(lp)
    np.testing.assert_allclose(shares, [0.75, 0.25, 0.0])
    assert preferred_outputs(shares, 0.25) == {0, 1}
    assert preferred_outputs(shares, 0.5) == {0}


def test_coverage_is_the_share_of_expert_outputs_the_proxy_also_prefers() -> None:
    assert coverage({0, 1, 2}, {0, 1}) == pytest.approx(2 / 3)
    assert coverage({0, 1}, {0, 1, 2}) == 1.0
    assert coverage(set(), {0}) == 1.0  # nothing the expert prefers is missing


def test_distance_ratios_recover_a_known_scaling() -> None:
    rng = _rng()
    proxy_z = log_ratios(rng.standard_normal((100, 3)))
    i, j = np.arange(0, 50), np.arange(50, 100)
    np.testing.assert_allclose(distance_ratios(2.0 * proxy_z, proxy_z, i, j), 2.0)
    # A relabelling of outputs keeps every distance: L = 1.
    np.testing.assert_allclose(distance_ratios(proxy_z[:, [2, 0, 1]], proxy_z, i, j), 1.0)
    # Inputs the proxy merges but the expert separates give huge ratios.
    merged = np.zeros_like(proxy_z)
    assert distance_ratios(proxy_z, merged, i, j).min() > 1e3


def test_distance_ratios_floor_drops_the_pairs_the_proxy_barely_separates() -> None:
    rng = _rng()
    # 100 pairs: the proxy puts half of them 0.05 apart and half 1.0 apart.
    base = log_ratios(rng.standard_normal((100, 3)))
    step = log_ratios(rng.standard_normal((100, 3)))
    step *= np.where(np.arange(100) < 50, 0.05, 1.0)[:, None] / np.linalg.norm(step, axis=1, keepdims=True)
    proxy_z = np.concatenate([base, base + step])
    i, j = np.arange(0, 100), np.arange(100, 200)
    # The expert = 3 x proxy (L = 3) seen through a fitted model with noise of fixed size: on the
    # near pairs the noise dominates and the ratio overshoots L; on the far ones it does not.
    expert_z = 3.0 * proxy_z + 0.1 * rng.standard_normal(proxy_z.shape)
    everything = distance_ratios(expert_z, proxy_z, i, j)
    separated = distance_ratios(expert_z, proxy_z, i, j, proxy_floor_quantile=0.5)
    assert len(everything) == 100 and len(separated) == 50
    assert np.quantile(separated, 0.9) < 3.5 < 5.0 < np.quantile(everything, 0.9)
    # A proxy that merges every input keeps all pairs at the floor, and the ratios stay huge.
    merged = np.zeros_like(proxy_z)
    assert distance_ratios(proxy_z, merged, i, j, proxy_floor_quantile=0.5).min() > 1e3


def test_relaxation_constant_is_the_chosen_quantile() -> None:
    ratios = np.arange(1, 101, dtype=float)
    assert relaxation_constant(ratios, 0.9) == pytest.approx(90.1)
    assert relaxation_constant(ratios, 0.5) == pytest.approx(50.5)


def test_significantly_worse_needs_a_consistent_gap() -> None:
    rng = _rng()
    best = rng.normal(-0.4, 0.3, 80)
    assert significantly_worse(best - 0.3, best, rng)[0]  # the same triples, each 0.3 worse
    worse, p = significantly_worse(best.copy(), best, rng)
    assert not worse and p == 1.0
    noisy = best + rng.normal(0.0, 0.5, 80)
    assert not significantly_worse(noisy - noisy.mean() + best.mean(), best, rng)[0]


def test_input_groups_number_copies_by_their_first_appearance() -> None:
    rows = np.array([[1.0, 2.0], [3.0, 4.0], [1.0, 2.0], [5.0, 6.0], [3.0, 4.0]])
    assert input_groups(rows).tolist() == [0, 1, 0, 2, 1]
    assert input_groups(np.arange(12.0).reshape(6, 2)).tolist() == list(range(6))
    assert input_groups(np.zeros((0, 3))).tolist() == []


@given(st.lists(st.integers(0, 6), min_size=1, max_size=40), st.integers(1, 8), st.integers(0, 10_000))
def test_grouped_folds_never_split_a_group_and_match_plain_folds_without_copies(labels, folds, seed) -> None:
    groups = input_groups(np.array(labels, dtype=float)[:, None])
    order = np.random.default_rng(seed).permutation(int(groups.max()) + 1)
    parts = grouped_folds(order, groups, folds)
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(labels)))
    fold_of = {int(i): k for k, part in enumerate(parts) for i in part}
    assert all(fold_of[i] == fold_of[j] for i in range(len(labels)) for j in range(len(labels))
               if labels[i] == labels[j])
    distinct = np.random.default_rng(seed).permutation(len(labels))
    plain = grouped_folds(distinct, np.arange(len(labels)), folds)
    assert [p.tolist() for p in plain] == [p.tolist() for p in np.array_split(distinct, min(folds, len(labels)))]

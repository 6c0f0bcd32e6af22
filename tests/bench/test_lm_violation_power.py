"""The oracle power bound of bench/lm_violation_power.py: the KL projection on the per-class null family, and
the Neyman–Pearson statistic's power (≈ α where the expert is in the null, ≈ 1 on the blind judge)."""

from __future__ import annotations

import numpy as np
import pytest

from bench.lm_violation_power import (
    ALPHA,
    draw_pool,
    expert_components,
    expert_prob,
    fit_projection,
    kl_per_pair,
    mixture_power,
    null_prob,
    oracle_power,
)
from ingest.synthetic_judges import make_world


@pytest.fixture(scope="module")
def pools() -> tuple:
    world = make_world(0, "blind")
    return draw_pool(world, 5000, 1), draw_pool(world, 5000, 2)


def _projection(judge: str, pools: tuple) -> tuple:
    fit_pool, pool = pools
    world = make_world(0, judge)
    weights = fit_projection(world, fit_pool, expert_prob(world, fit_pool))
    p1 = expert_prob(world, pool)
    return world, weights, p1, null_prob(world, pool, weights)


def test_projection_is_exact_for_a_satisfying_judge_and_not_for_blind(pools: tuple) -> None:
    _, weights, p1, p0 = _projection("relabelled", pools)
    assert kl_per_pair(p1, p0) < 1e-6
    assert np.sort(np.abs(weights[:4]).max(axis=1)) == pytest.approx([20.0] * 4, abs=1e-3)  # e_topic / T
    _, _, p1, p0 = _projection("blind", pools)
    assert kl_per_pair(p1, p0) > 0.05


def test_oracle_power_is_alpha_under_the_null_and_high_on_blind(pools: tuple) -> None:
    rng = np.random.default_rng(0)
    reps = 2000
    _, _, p1, p0 = _projection("relabelled", pools)
    power, se = oracle_power(p1, p0, 50, reps, rng)
    assert abs(power - ALPHA) < 3 * np.sqrt(ALPHA * (1 - ALPHA) / reps) + 1e-9
    world, weights, p1, p0 = _projection("blind", pools)
    assert oracle_power(p1, p0, 100, reps, rng)[0] > 0.95
    comps = expert_components(world, weights)
    assert comps.shape == (3, 5, 4)
    assert mixture_power(world, pools[1], p1, comps, 100, 500, rng)[0] > 0.9


def test_mixture_null_of_a_satisfying_judge_is_the_expert(pools: tuple) -> None:
    world = make_world(0, "tempered")
    p1 = expert_prob(world, pools[1])
    power, _ = mixture_power(world, pools[1], p1, expert_components(world), 50, 2000, np.random.default_rng(1))
    assert power == pytest.approx(ALPHA, abs=0.02)

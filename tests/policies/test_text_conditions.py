"""The text condition tests on synthetic stage-1 features with known truth.

Each response has latent logits u ∈ R^D (its simplex point is log_softmax(u)) and two coordinates
the bottleneck never sees; its "hidden state" is a fixed rotation of [u, unseen, small noise] in R^K,
so the direct features carry everything and the simplex only u. The proxy prefers by b · log s and
the stage-1 margin is that reward difference; the expert prefers by a reward set per world.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pytest

from ground.schemas import ConditionCheck, ConditionReport
from policies.features.condition_config import CHECK_NAMES
from policies.lm.condition_config import TEXT_THRESHOLDS
from policies.lm.conditions import TextPairFeatures, fit_bradley_terry, run_text_condition_tests
from policies.plan_choice import CANDIDATES

D, K, UNSEEN = 8, 48, 2
WORLD = np.random.default_rng(1234)
ROTATION = np.linalg.qr(WORLD.normal(size=(K, K)))[0]
PROXY_WEIGHTS = WORLD.normal(0.0, 0.7, D)
PERMUTED = PROXY_WEIGHTS[WORLD.permutation(D)]

Reward = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (log s [n, D], unseen [n, UNSEEN]) -> [n]


def proxy_reward(log_s: np.ndarray, unseen: np.ndarray) -> np.ndarray:
    return np.asarray(log_s @ PROXY_WEIGHTS)


def remapped_expert(log_s: np.ndarray, unseen: np.ndarray) -> np.ndarray:
    """A fixed linear map of the simplex coordinates: part proxy, part permuted proxy."""
    return np.asarray(log_s @ (0.6 * PROXY_WEIGHTS + 0.8 * PERMUTED))


def blind_spot_expert(log_s: np.ndarray, unseen: np.ndarray) -> np.ndarray:
    """Mostly a direction of the hidden state the bottleneck (and so the proxy) never sees."""
    return np.asarray(0.3 * log_s @ PROXY_WEIGHTS + 2.0 * unseen[:, 0])


def _responses(rng: np.random.Generator, n: int, shift: float, collapsed: bool) -> tuple[np.ndarray, ...]:
    u = rng.normal(0.0, 1.0, (n, D))
    u[:, 0] += shift
    unseen = rng.normal(0.0, 1.0, (n, UNSEEN))
    hidden = np.hstack([u, unseen, rng.normal(0.0, 0.1, (n, K - D - UNSEEN))]) @ ROTATION
    logits = 1e-4 * u if collapsed else u
    log_s = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    return log_s, unseen, hidden


def _pairs(rng: np.random.Generator, n: int, reward: Reward, shift: float = 0.0,
           collapsed: bool = False) -> TextPairFeatures:
    (sa, ua, ha), (sb, ub, hb) = (_responses(rng, n, shift, collapsed) for _ in range(2))
    a_wins = (rng.random(n) < 1.0 / (1.0 + np.exp(reward(sb, ub) - reward(sa, ua))))[:, None]
    sc, sr = np.where(a_wins, sa, sb), np.where(a_wins, sb, sa)
    uc, ur = np.where(a_wins, ua, ub), np.where(a_wins, ub, ua)
    return TextPairFeatures(simplex_chosen=sc, simplex_rejected=sr, direct_chosen=np.where(a_wins, ha, hb),
                            direct_rejected=np.where(a_wins, hb, ha),
                            proxy_margin=proxy_reward(sc, uc) - proxy_reward(sr, ur))


def _report(expert_reward: Reward = remapped_expert, n_expert: int = 150, n_proxy: int = 1500, seed: int = 0,
            shift: float = 0.0, collapsed: bool = False, **kwargs: object) -> ConditionReport:
    rng = np.random.default_rng(seed)
    proxy = _pairs(rng, n_proxy, proxy_reward, collapsed=collapsed)
    expert = _pairs(rng, n_expert, expert_reward, shift=shift, collapsed=collapsed)
    return run_text_condition_tests(expert, proxy, f"text-{seed}", n_expert=n_expert, n_proxy=n_proxy + 500,
                                    seed=seed, **kwargs)  # type: ignore[arg-type]


def _check(report: ConditionReport, name: str) -> ConditionCheck:
    return next(c for c in report.checks if c.name == name)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_expert_that_remaps_the_simplex_passes_every_check_and_uses_the_proxy(seed: int) -> None:
    report = _report(seed=seed)
    assert [c.name for c in report.checks] == list(CHECK_NAMES)
    assert all(c.passed for c in report.checks), [c.detail for c in report.checks if not c.passed]
    assert report.plan in ("two_stage", "proxy_as_is")
    assert (report.n_expert, report.n_proxy, report.snapshot_id) == (150, 2000, f"text-{seed}")
    assert report.reasons[0].startswith("these tests ran on the stage-1 model's D=8 simplex representation")
    assert set(report.heldout_log_likelihood) == set(CANDIDATES)
    assert report.heldout_log_likelihood["two_stage"] > report.heldout_log_likelihood["expert_only"]
    for check in report.checks:  # each detail states its statistic, threshold and n
        n = "3000 proxy responses" if check.name == "low_dimensional_encoding" else "150"
        assert n in check.detail and "pass" in check.detail, check.detail
    assert "p=" in _check(report, "shared_level_sets").detail
    assert "above 10%" in _check(report, "image_containment").detail
    assert "bootstrap" in _check(report, "similarity_preserved").detail and "above 15.0" in _check(
        report, "similarity_preserved").detail


def test_expert_reading_what_the_bottleneck_drops_fails_shared_level_sets() -> None:
    report = _report(blind_spot_expert, n_expert=200)
    assert not _check(report, "shared_level_sets").passed
    assert report.plan in ("fine_tune", "expert_only")
    assert any(r.startswith("shared_level_sets failed") for r in report.reasons)
    assert any("two_stage is not eligible" in r for r in report.reasons)


def test_expert_choices_outside_the_proxys_cloud_fail_image_containment() -> None:
    report = _report(shift=5.0, n_expert=100, n_proxy=800)
    check = _check(report, "image_containment")
    assert not check.passed and check.statistic > 0.5 and check.threshold == TEXT_THRESHOLDS.max_outside_share
    assert report.plan != "two_stage"


def test_collapsed_simplex_fails_low_dimensional_encoding() -> None:
    report = _report(collapsed=True, n_expert=100, n_proxy=800)
    check = _check(report, "low_dimensional_encoding")
    assert not check.passed and check.statistic == 0 and "collapsed" in check.detail
    assert report.plan != "two_stage"
    assert _check(_report(n_expert=100, n_proxy=800), "low_dimensional_encoding").statistic == D - 1


def test_too_few_expert_pairs_take_choose_plans_too_few_path() -> None:
    report = _report(n_expert=10, n_proxy=600)
    size = _check(report, "expert_sample_size")
    assert not size.passed and size.statistic == 10 and size.threshold == TEXT_THRESHOLDS.min_expert_pairs
    assert "undecided" in _check(report, "shared_level_sets").detail
    assert _check(report, "low_dimensional_encoding").passed
    assert report.heldout_log_likelihood == {}
    assert report.plan == "proxy_as_is"  # the informative proxy agrees with most of the 10
    assert _report(n_expert=0, n_proxy=600).plan == "proxy_as_is"  # unvalidated, but usable
    assert _report(n_expert=10, n_proxy=600, collapsed=True).plan == "refuse"  # no usable proxy
    # too few proxy pairs to test anything, enough expert pairs to learn from alone
    assert _report(n_expert=40, n_proxy=100).plan == "expert_only"
    stricter = replace(TEXT_THRESHOLDS, min_expert_pairs=8)
    assert _check(_report(n_expert=10, n_proxy=600, thresholds=stricter), "expert_sample_size").passed


def test_same_seed_same_report() -> None:
    assert _report(seed=3, n_expert=60, n_proxy=600) == _report(seed=3, n_expert=60, n_proxy=600)


def _arrays(n: int = 4) -> dict[str, np.ndarray]:
    return {"simplex_chosen": np.full((n, 3), -1.1), "simplex_rejected": np.full((n, 3), -1.1),
            "direct_chosen": np.zeros((n, 5)), "direct_rejected": np.zeros((n, 5)), "proxy_margin": np.zeros(n)}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"simplex_rejected": np.full((4, 2), -1.0)}, "simplex_chosen and simplex_rejected must be 2-d"),
        ({"direct_chosen": np.zeros(4)}, "direct_chosen and direct_rejected must be 2-d"),
        ({"proxy_margin": np.zeros(3)}, "one row per pair"),
        ({"direct_chosen": np.zeros((3, 5)), "direct_rejected": np.zeros((3, 5))}, "one row per pair"),
        ({"proxy_margin": np.array([0.0, np.nan, 0.0, 0.0])}, "proxy_margin has 1 non-finite"),
        ({"simplex_chosen": np.full((4, 3), 0.3)}, "pass log s, not s"),
        ({"simplex_chosen": np.zeros((4, 1)), "simplex_rejected": np.zeros((4, 1))}, "need D >= 2"),
        ({"proxy_margin": ["a", "b", "c", "d"]}, "proxy_margin must be a numeric array"),
    ],
)
def test_bad_arrays_are_refused_with_a_clear_message(change: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TextPairFeatures(**{**_arrays(), **change})  # type: ignore[arg-type]


def test_expert_and_proxy_must_match_and_counts_cover_the_rows() -> None:
    proxy = TextPairFeatures(**_arrays(300))
    other = {**_arrays(40), "direct_chosen": np.zeros((40, 6)), "direct_rejected": np.zeros((40, 6))}
    with pytest.raises(ValueError, match="must share D and K"):
        run_text_condition_tests(TextPairFeatures(**other), proxy, "s", n_expert=40, n_proxy=300)
    with pytest.raises(ValueError, match="cannot be below the pairs given"):
        run_text_condition_tests(TextPairFeatures(**_arrays(40)), proxy, "s", n_expert=39, n_proxy=300)


def test_bradley_terry_fit_recovers_weights_and_keeps_its_prior_without_data() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(size=(4000, 3))
    truth = np.array([1.5, -0.5, 0.0])
    z *= np.where(rng.random(4000) < 1 / (1 + np.exp(-z @ truth)), 1.0, -1.0)[:, None]  # orient as chosen first
    np.testing.assert_allclose(fit_bradley_terry(z, np.zeros(3), 1.0), truth, atol=0.1)
    np.testing.assert_allclose(fit_bradley_terry(z[:0], np.array([1.0, 0.0, 0.0]), 2.0), [1.0, 0.0, 0.0])

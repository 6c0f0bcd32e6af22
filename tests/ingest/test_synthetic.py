"""Specification of the Appendix D synthetic worlds: shapes, determinism, and what each variant breaks."""

from __future__ import annotations

import numpy as np
import pytest

from ingest.synthetic import (
    VARIANTS,
    SyntheticTask,
    SyntheticWorld,
    appendix_d,
    sample_triples,
)
from ingest.synthetic_families import appendix_d_family, draw_triples


def _small(seed: int = 0, variant: str = "ok") -> SyntheticTask:
    return appendix_d(n_proxy=200, n_expert=20, n_heldout=30, seed=seed, variant=variant)


def _world(variant: str, seed: int = 0) -> SyntheticWorld:
    return appendix_d(n_proxy=0, n_expert=0, n_heldout=0, seed=seed, variant=variant).world


def _inputs(n: int = 4000, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 5))


def _favourite_shares(probs: np.ndarray) -> np.ndarray:
    return np.bincount(probs.argmax(axis=1), minlength=probs.shape[1]) / len(probs)


def _log_ratios(log_probs: np.ndarray) -> np.ndarray:
    return log_probs - log_probs.mean(axis=1, keepdims=True)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_gives_valid_triples_of_the_requested_sizes(variant: str) -> None:
    task = _small(0, variant)
    assert (len(task.proxy), len(task.expert), len(task.expert_heldout)) == (200, 20, 30)
    assert task.variant == variant
    for t in [*task.proxy, *task.expert, *task.expert_heldout]:
        assert len(t.x) == 5
        assert 0 <= t.y_w < task.n_outputs and 0 <= t.y_l < task.n_outputs and t.y_w != t.y_l
    for probs in (task.world.proxy_probs(_inputs(100)), task.world.expert_probs(_inputs(100))):
        assert probs.shape == (100, task.n_outputs)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0)


def test_same_seed_same_task_other_seed_other_task() -> None:
    a, b, c = _small(3), _small(3), _small(4)
    assert a.proxy == b.proxy and a.expert == b.expert and a.expert_heldout == b.expert_heldout
    assert a.proxy != c.proxy


def test_unknown_variant_is_refused_with_the_valid_names() -> None:
    with pytest.raises(ValueError, match="should be one of.*'merged_level_sets'"):
        appendix_d(variant="nope")
    with pytest.raises(ValueError, match="n_expert must be >= 0"):
        appendix_d(n_expert=-1)


def test_ok_expert_is_an_injective_map_of_the_proxy() -> None:
    world, x = _world("ok"), _inputs()
    proxy = world.proxy_log_probs(x)
    relabelled = proxy[:, list(world.permutation)] / world.temperature + world.expert_bias
    expected = relabelled - np.log(np.exp(relabelled).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(world.expert_log_probs(x), expected, atol=1e-10)
    assert sorted(world.permutation) == list(range(3)) and world.temperature > 0
    # Image containment: every output is some input's favourite, for proxy and expert alike.
    assert _favourite_shares(world.proxy_probs(x)).min() > 0.05
    assert _favourite_shares(world.expert_probs(x)).min() > 0.05


def test_merged_level_sets_proxy_ignores_what_the_expert_reads() -> None:
    world, x = _world("merged_level_sets"), _inputs()
    shifted = x.copy()
    shifted[:, 2:] = _inputs(seed=2)[:, 2:]
    np.testing.assert_allclose(world.proxy_probs(shifted), world.proxy_probs(x))
    changed = world.expert_probs(shifted).argmax(axis=1) != world.expert_probs(x).argmax(axis=1)
    assert changed.mean() > 0.3


def test_missing_image_proxy_never_prefers_an_output_the_expert_prefers() -> None:
    world, x = _world("missing_image"), _inputs()
    assert _favourite_shares(world.proxy_probs(x))[2] == 0.0
    assert _favourite_shares(world.expert_probs(x))[2] > 0.2


def _components_for(log_probs: np.ndarray, share: float = 0.99) -> int:
    z = _log_ratios(log_probs)
    variances = np.linalg.svd(z - z.mean(axis=0), compute_uv=False) ** 2
    return int(np.searchsorted(np.cumsum(variances) / variances.sum(), share) + 1)


def test_high_dim_proxy_image_is_as_large_as_the_input_space() -> None:
    high, ok = _world("high_dim"), _world("ok")
    assert high.n_outputs == _small(variant="high_dim").n_outputs == 12
    assert _components_for(high.proxy_log_probs(_inputs())) >= 5
    assert _components_for(ok.proxy_log_probs(_inputs())) <= 2


def _median_distance_ratio(world: SyntheticWorld) -> float:
    x, y = _inputs(seed=1), _inputs(seed=2)
    d_expert = np.linalg.norm(_log_ratios(world.expert_log_probs(x)) - _log_ratios(world.expert_log_probs(y)), axis=1)
    d_proxy = np.linalg.norm(_log_ratios(world.proxy_log_probs(x)) - _log_ratios(world.proxy_log_probs(y)), axis=1)
    return float(np.median(d_expert / d_proxy))


def test_large_l_proxy_distorts_similarity_where_ok_does_not() -> None:
    # A relabelling preserves log-ratio distances, so "ok" scales them by exactly 1/T = 2.
    assert _median_distance_ratio(_world("ok")) == pytest.approx(2.0)
    assert _median_distance_ratio(_world("large_L")) > 25


def test_bradley_terry_draws_follow_the_policy() -> None:
    rng = np.random.default_rng(0)
    n = 30000
    probs = np.tile([0.7, 0.2, 0.1], (n, 1))
    triples = sample_triples(probs, np.zeros((n, 5)), rng)
    pairs = [tuple(sorted((t.y_w, t.y_l))) for t in triples]
    assert {p: pairs.count(p) / n for p in set(pairs)} == pytest.approx(
        {(0, 1): 1 / 3, (0, 2): 1 / 3, (1, 2): 1 / 3}, abs=0.02
    )
    zero_vs_one = [t.y_w == 0 for t in triples if {t.y_w, t.y_l} == {0, 1}]
    assert np.mean(zero_vs_one) == pytest.approx(0.7 / 0.9, abs=0.02)


def test_appendix_d_family_follows_the_issue_specification() -> None:
    permuted, tempered = appendix_d_family(3, "permuted"), appendix_d_family(3, "tempered")
    x = _inputs(500)
    assert permuted.weight.shape == (5, 2) and permuted.readout.shape == (2, 3)
    np.testing.assert_array_equal(permuted.weight, tempered.weight)  # one expert per seed, two proxies
    logits = np.tanh(x @ permuted.weight) @ permuted.readout
    expert = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(permuted.expert_log_probs(x), expert)
    assert permuted.permutation != (0, 1, 2) and sorted(permuted.permutation) == [0, 1, 2]
    np.testing.assert_allclose(permuted.proxy_probs(x), permuted.expert_probs(x)[:, list(permuted.permutation)])
    tempered_logits = logits / 3.0
    np.testing.assert_allclose(
        tempered.proxy_log_probs(x), tempered_logits - np.log(np.exp(tempered_logits).sum(axis=1, keepdims=True))
    )
    # Tempering keeps the expert's ranking of every pair: the proxy's answers are right, only flatter.
    assert (tempered.proxy_probs(x).argmax(axis=1) == tempered.expert_probs(x).argmax(axis=1)).all()


def test_appendix_d_family_draws_and_refuses_unknown_proxies() -> None:
    world = appendix_d_family(0, "tempered")
    triples = draw_triples(world, 50, expert=True, rng=np.random.default_rng(0))
    assert len(triples) == 50 and all(len(t.x) == 5 and t.y_w != t.y_l for t in triples)
    scales = [np.std(appendix_d_family(s, "permuted").weight) for s in range(40)]
    assert np.mean(scales) == pytest.approx(1.5, rel=0.15)
    with pytest.raises(ValueError, match="should be one of"):
        appendix_d_family(0, "noisy")

"""The Appendix D proxy families: each satisfies or breaks shared level sets as it claims, checked on its
known parameters; the expert is the same for every kind of a seed; draws are deterministic."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from ingest.synthetic_families import (
    FAMILY_PROXIES,
    REGION_THRESHOLD,
    SATISFYING_FAMILIES,
    VIOLATING_FAMILIES,
    appendix_d_family,
    centred_basis,
    draw_triples,
)

SEEDS = range(100, 106)  # reporting seeds: the generators must hold there, not only where tuned


def _x(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 5))


def _probs(log_probs: np.ndarray) -> np.ndarray:
    return np.exp(log_probs)


@pytest.mark.parametrize("kind", SATISFYING_FAMILIES)
@pytest.mark.parametrize("seed", SEEDS)
def test_satisfying_kinds_have_a_fixed_map_from_proxy_to_expert(kind: str, seed: int) -> None:
    world = appendix_d_family(seed, kind)
    x = _x(2000, seed)
    np.testing.assert_allclose(world.expert_from_proxy(world.proxy_log_probs(x)), world.expert_log_probs(x),
                               atol=1e-8)


@pytest.mark.parametrize("seed", SEEDS)
def test_invertible_map_is_neither_a_relabelling_nor_a_tempering(seed: int) -> None:
    world = appendix_d_family(seed, "invertible")
    u = centred_basis()
    plane = u.T @ world.mixing @ u  # the map on the log-ratio plane
    assert abs(np.linalg.det(plane)) > 0.1  # invertible
    for order in itertools.permutations(range(3)):
        relabel = u.T @ np.eye(3)[:, list(order)] @ u
        scale = float((plane * relabel).sum() / (relabel**2).sum())  # best tempering of this relabelling
        assert np.linalg.norm(plane - scale * relabel) > 0.2 * np.linalg.norm(plane)
    # ... so the proxy's favourite is not the expert's on many inputs, yet the map g recovers the expert.
    x = _x(2000, seed)
    assert (world.proxy_log_probs(x).argmax(axis=1) != world.expert_log_probs(x).argmax(axis=1)).mean() > 0.02


def test_more_outputs_proxy_answers_over_a_superset_of_the_expert_outputs() -> None:
    world = appendix_d_family(101, "more_outputs")
    assert world.n_outputs == 6 and world.expert_outputs == 3
    rng = np.random.default_rng(0)
    proxy = draw_triples(world, 3000, expert=False, rng=rng)
    expert = draw_triples(world, 500, expert=True, rng=rng)
    assert max(max(t.y_w, t.y_l) for t in proxy) == 5
    assert max(max(t.y_w, t.y_l) for t in expert) <= 2
    favourites = world.proxy_log_probs(_x(5000)).argmax(axis=1)
    assert set(range(3)) <= set(favourites.tolist())  # every expert output is the proxy's favourite somewhere


@pytest.mark.parametrize("kind", VIOLATING_FAMILIES)
def test_violating_kinds_have_no_map_from_proxy_to_expert(kind: str) -> None:
    world = appendix_d_family(100, kind)
    with pytest.raises(ValueError, match="breaks shared level sets"):
        world.expert_from_proxy(world.proxy_log_probs(_x(10)))


@pytest.mark.parametrize("seed", SEEDS)
def test_blind_direction_proxy_merges_inputs_the_expert_tells_apart(seed: int) -> None:
    world = appendix_d_family(seed, "blind_direction")
    x = 0.3 * _x(50, seed)  # away from where tanh saturates
    moved = x + 0.5 * world.direction
    np.testing.assert_allclose(world.proxy_log_probs(moved), world.proxy_log_probs(x), atol=1e-10)
    gap = np.abs(_probs(world.expert_log_probs(moved)) - _probs(world.expert_log_probs(x))).max(axis=1)
    assert gap.mean() > 0.05  # the expert uses that direction: its answers move


@pytest.mark.parametrize("seed", SEEDS)
def test_partly_wrong_proxy_answers_alike_where_the_expert_does_not(seed: int) -> None:
    """x inside the relabelled region and x' outside it with z(x') = z(x)∘σ: same proxy answer, different
    expert answers, so the expert does not factor through the proxy."""
    world = appendix_d_family(seed, "partly_wrong")
    w, a, v = world.weight, world.readout, world.direction
    null = np.eye(5) - w @ np.linalg.pinv(w)  # directions the expert does not read
    v_null = null @ v
    centring = np.eye(3) - 1.0 / 3
    # The latent h' with z(h')C = (z(h)∘σ)C is linear in h: h' = h·L. Take h along L's least
    # amplified direction, scaled so both latents lie inside tanh's range.
    matched = a[:, list(world.permutation)] @ centring @ np.linalg.pinv(a @ centring)
    direction = np.linalg.svd(matched)[2][-1]
    h = 0.9 * direction / max(np.abs(direction).max(), np.abs(direction @ matched).max())
    x = np.arctanh(h) @ np.linalg.pinv(w)
    x = x + (REGION_THRESHOLD + 1.0 - x @ v) / (v_null @ v) * v_null  # inside the region, latent unchanged
    h_other = h @ matched
    np.testing.assert_allclose(h_other @ a @ centring, (h @ a)[list(world.permutation)] @ centring, atol=1e-9)
    x_other = np.arctanh(h_other) @ np.linalg.pinv(w)
    x_other = x_other + (REGION_THRESHOLD - 1.0 - x_other @ v) / (v_null @ v) * v_null  # outside
    pair = np.stack([x, x_other])
    assert pair[0] @ v > REGION_THRESHOLD > pair[1] @ v
    proxy, expert = _probs(world.proxy_log_probs(pair)), _probs(world.expert_log_probs(pair))
    np.testing.assert_allclose(proxy[0], proxy[1], atol=1e-8)
    assert np.abs(expert[0] - expert[1]).max() > 0.01


def test_every_kind_shares_the_expert_of_its_seed_and_is_deterministic() -> None:
    worlds = [appendix_d_family(7, kind) for kind in FAMILY_PROXIES]
    x = _x(100)
    for world in worlds:
        np.testing.assert_array_equal(world.expert_log_probs(x), worlds[0].expert_log_probs(x))
    for kind in FAMILY_PROXIES:
        one, two = appendix_d_family(7, kind), appendix_d_family(7, kind)
        np.testing.assert_array_equal(one.proxy_log_probs(x), two.proxy_log_probs(x))
        a = draw_triples(one, 40, expert=False, rng=np.random.default_rng(3))
        b = draw_triples(two, 40, expert=False, rng=np.random.default_rng(3))
        assert a == b
    # Issue 6's worlds are unchanged by the new kinds: W, A and σ come from the seed's first stream.
    rng = np.random.default_rng(7)
    np.testing.assert_array_equal(worlds[0].weight, rng.normal(0.0, 1.5, size=(5, 2)))
    assert appendix_d_family(8, "invertible").mixing.tolist() != worlds[2].mixing.tolist()


def test_unknown_kind_is_refused_with_the_valid_kinds() -> None:
    with pytest.raises(ValueError, match="should be one of") as raised:
        appendix_d_family(0, "noisy")
    assert all(kind in str(raised.value) for kind in FAMILY_PROXIES)

"""The ceiling bench's adapter: it contains the invertible proxy's true map, and its rules pick from one grid."""

import numpy as np
import torch

from bench.appendix_d import accuracy_and_kl
from bench.invertible_ceiling import RULES, fit, log_probs, rules_at
from ingest.synthetic_families import appendix_d_family, draw_triples
from policies.features.model import triples_to_tensors


def _world_data(n: int, seed: int = 3) -> tuple[torch.Tensor, ...]:
    world = appendix_d_family(seed, "invertible")
    rng = np.random.default_rng(seed)
    x, y_w, y_l = triples_to_tensors(draw_triples(world, n, expert=True, rng=rng))
    x_test = rng.standard_normal((2000, world.input_dim))
    lp = torch.tensor(world.proxy_log_probs(x.double().numpy()))
    return lp, y_w, y_l, torch.tensor(world.proxy_log_probs(x_test)), torch.tensor(world.expert_log_probs(x_test))


def test_adapter_on_the_true_proxy_recovers_the_expert_from_many_triples() -> None:
    lp, y_w, y_l, lp_test, gold = _world_data(3000)
    as_is = accuracy_and_kl(lp_test, gold.numpy())
    fitted = accuracy_and_kl(log_probs(lp_test, fit(lp, y_w, y_l, 0.01)), gold.numpy())
    assert fitted[0] > 0.97 and fitted[1] < 0.02  # the map g is in the adapter's family
    assert as_is[0] < fitted[0] - 0.05 and as_is[1] > 5 * fitted[1]  # and the proxy as is is far from it


def test_a_strong_ridge_keeps_the_proxy() -> None:
    lp, y_w, y_l, lp_test, gold = _world_data(35)
    theta = fit(lp, y_w, y_l, 1e6)
    assert torch.allclose(log_probs(lp_test, theta), torch.log_softmax(lp_test, dim=-1), atol=1e-3)


def test_rules_pick_from_the_grid_and_hindsight_bounds_them() -> None:
    lp, y_w, y_l, lp_test, gold = _world_data(35)
    picked = rules_at(lp, y_w, y_l, lp_test, gold.numpy(), seed=0)
    assert set(picked) == set(RULES)
    for rule in ("cv", "cv_1se", "evidence"):  # each one of the grid's fits (evidence_avg mixes them)
        assert picked["hindsight"][0] >= picked[rule][0] - 1e-9
        assert picked["hindsight"][1] <= picked[rule][1] + 1e-9

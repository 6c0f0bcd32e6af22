"""The adapter's centre: relabellings of the frozen head's outputs, and the choice among them."""

from __future__ import annotations

import itertools

import pytest
import torch

from policies.features.fitting import choose_centre
from policies.features.model import TwoStagePolicy
from policies.features.simplex_adapter import SimplexAdapter, relabelled_centres

pytestmark = pytest.mark.usefixtures("one_thread")


def _stack(seed: int = 0) -> TwoStagePolicy:
    torch.manual_seed(seed)
    stack = TwoStagePolicy()
    with torch.no_grad():  # a peaked head, so preferences between its outputs carry signal
        stack.output_map.weight.mul_(6.0)
    return stack


def _set(adapter: SimplexAdapter, weight: torch.Tensor, bias: torch.Tensor) -> None:
    with torch.no_grad():
        adapter.weight.copy_(weight)
        adapter.bias.copy_(bias)


def test_each_centre_reproduces_one_relabelling_of_the_outputs_exactly() -> None:
    stack = _stack()
    x = torch.randn(50, 5)
    with torch.no_grad():
        original = stack.log_probs(x)
        centres = relabelled_centres(*stack.head_affine())
        assert len(centres) == 6
        relabelled = []
        for weight, bias in centres:
            _set(stack.adapter, weight, bias)
            relabelled.append(stack.log_probs(x))
    torch.testing.assert_close(relabelled[0], original)  # the identity comes first
    for order, got in zip(itertools.permutations(range(3)), relabelled, strict=True):
        torch.testing.assert_close(got, original[:, list(order)], atol=1e-4, rtol=1e-4)


def test_no_relabelling_is_searched_beyond_six_outputs() -> None:
    centres = relabelled_centres(torch.randn(7, 3), torch.randn(7))
    assert len(centres) == 1 and torch.equal(centres[0][0], torch.eye(3))


def _triples(log_probs: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bradley–Terry winners of a random pair per row, drawn from the given policy."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 3, (log_probs.shape[0],), generator=g)
    b = (a + torch.randint(1, 3, a.shape, generator=g)) % 3
    p_a = torch.sigmoid(log_probs.gather(1, a[:, None]) - log_probs.gather(1, b[:, None])).squeeze(1)
    a_wins = torch.rand(a.shape, generator=g) < p_a
    return torch.where(a_wins, a, b), torch.where(a_wins, b, a)


def test_choose_centre_finds_the_relabelling_the_expert_applies_and_keeps_an_honest_proxy() -> None:
    stack = _stack()
    x = torch.randn(35, 5)
    order = [2, 0, 1]
    with torch.no_grad():
        log_s, proxy = stack.log_embed(x), stack.log_probs(x)
    y_w, y_l = _triples(proxy[:, order], seed=1)  # an expert who answers like the proxy, relabelled
    picked = choose_centre(stack, log_s, y_w, y_l)
    assert picked == list(itertools.permutations(range(3))).index(tuple(order))
    with torch.no_grad():
        torch.testing.assert_close(stack.log_probs(x), proxy[:, order], atol=1e-4, rtol=1e-4)

    y_w, y_l = _triples(proxy, seed=2)  # an expert who answers like the proxy itself
    assert choose_centre(stack, log_s, y_w, y_l) == 0
    torch.testing.assert_close(stack.adapter.centre_weight, torch.eye(3))


def test_one_triple_is_not_enough_to_relabel() -> None:
    stack = _stack()
    x = torch.randn(1, 5)
    with torch.no_grad():
        log_s, proxy = stack.log_embed(x), stack.log_probs(x)
    # The proxy's least likely output beats its most likely: every relabelling that swaps them
    # explains this triple better, but one triple is worth less than the prior's log(5) nats.
    y_w, y_l = proxy.argmin(dim=1), proxy.argmax(dim=1)
    assert choose_centre(stack, log_s, y_w, y_l) == 0


def test_deviation_is_measured_from_the_centre() -> None:
    adapter = SimplexAdapter(3)
    centre = torch.eye(3)[[1, 2, 0]] * 2.0
    adapter.set_centre(centre, torch.tensor([0.5, 0.0, 0.0]))
    adapter.reset()
    assert float(adapter.deviation().detach()) == 0.0
    _set(adapter, 3 * centre, adapter.centre_bias)  # re-tempering the centre: ‖M₀‖²(α − 1)² = 12·4
    assert float(adapter.deviation(0.1).detach()) == pytest.approx(0.1 * 48)
    adapter.reset(identity=True)
    assert torch.equal(adapter.weight, torch.eye(3)) and torch.equal(adapter.bias, torch.zeros(3))

"""Stage 2's bootstrap bag: each member is the fit `fit_adapter` makes on its resample, the distillation moves
only the adapter and lands closer to the bag than the single fit, members that agree about the centre leave the
single fit alone, and the worker checkpoints the final adapter."""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch

from ingest.synthetic_families import appendix_d_family, draw_triples
from policies.features import bagged_adapter
from policies.features.bagged_adapter import Bag, bag_and_distil, centre_in_doubt, fit_bag, unlabelled_embedding
from policies.features.fit_recipe import ADAPTER_STAGE
from policies.features.fitting import fit_adapter, fit_stage1
from policies.features.model import TwoStageConfig, TwoStagePolicy, triples_to_tensors
from policies.features.recipe import TWO_STAGE, fit_two_stage_adapter

STAGE = replace(ADAPTER_STAGE, steps=80, adapter_prior=1.0)


def _world(seed: int) -> tuple[TwoStagePolicy, tuple[torch.Tensor, ...], torch.Tensor]:
    family, rng = appendix_d_family(seed, "invertible"), np.random.default_rng(seed)
    proxy = triples_to_tensors(draw_triples(family, 1500, expert=False, rng=rng))
    expert = triples_to_tensors(draw_triples(family, 30, expert=True, rng=rng))
    torch.manual_seed(seed)
    stack = TwoStagePolicy(TwoStageConfig(input_dim=5, n_outputs=3, simplex_dim=3))
    fit_stage1(stack, *proxy, seed, replace(TWO_STAGE.proxy_stage, steps=200))
    stack.freeze_proxy()
    return stack, expert, proxy[0]


@pytest.fixture(scope="module")
def world() -> tuple[TwoStagePolicy, tuple[torch.Tensor, ...], torch.Tensor]:
    """A stage-1 stack on an `invertible` proxy (a map between the identity and a relabelling) whose bag splits
    between two centres, 30 expert triples, and the proxy triples' inputs."""
    return _world(7)


def test_each_member_is_the_adapter_fitted_on_its_bootstrap_resample(world) -> None:
    stack, (x, y_w, y_l), _ = world
    with torch.no_grad():
        log_s = stack.log_embed(x)
    weight, bias, _ = fit_bag(stack, log_s, y_w, y_l, seed=5, stage=STAGE, size=4)
    generator = torch.Generator().manual_seed(5)
    for k in range(4):
        rows = torch.randint(0, x.shape[0], (x.shape[0],), generator=generator)
        alone = copy.deepcopy(stack)
        fit_adapter(alone, x[rows], y_w[rows], y_l[rows], k, STAGE)
        torch.testing.assert_close(weight[k], alone.adapter.weight.detach(), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(bias[k], alone.adapter.bias.detach(), atol=1e-4, rtol=1e-4)
    assert not all(torch.allclose(weight[0], weight[k]) for k in range(1, 4))  # the resamples differ


def _kl_from_bag(bag: Bag, model: TwoStagePolicy, x: torch.Tensor) -> float:
    with torch.no_grad():
        target, lp = bag.log_probs(x), model.log_probs(x)
        return float((target.exp() * (target - lp)).sum(-1).mean())


def test_distillation_moves_only_the_adapter_toward_the_bag(world, monkeypatch) -> None:
    stack, (x, y_w, y_l), proxy_x = world
    monkeypatch.setattr(bagged_adapter, "DISTIL_STEPS", 150)
    single = copy.deepcopy(stack)
    fit_adapter(single, x, y_w, y_l, 0, STAGE)
    distilled = copy.deepcopy(single)
    kl = bag_and_distil(distilled, x, y_w, y_l, proxy_x, seed=0, stage=STAGE)
    assert kl is not None  # this world's resamples disagree about the centre
    for before, after in zip(stack.proxy_parameters(), distilled.proxy_parameters(), strict=True):
        assert torch.equal(before, after)
    bag = Bag(stack, *fit_bag(stack, stack.log_embed(x).detach(), y_w, y_l, 0, STAGE)[:2])
    held = unlabelled_embedding(stack, proxy_x, 0)
    assert held.shape[0] == min(proxy_x.shape[0], bagged_adapter.DISTIL_INPUTS)
    assert _kl_from_bag(bag, distilled, proxy_x) == pytest.approx(kl, abs=0.02)
    assert _kl_from_bag(bag, distilled, proxy_x) < _kl_from_bag(bag, single, proxy_x)


def test_the_last_checkpoint_sees_the_distilled_adapter(world, monkeypatch) -> None:
    """The worker saves its final checkpoint from `after_step(steps)`: it must come once, after the bag."""
    stack, (x, y_w, y_l), proxy_x = world
    monkeypatch.setattr(bagged_adapter, "DISTIL_STEPS", 50)
    monkeypatch.setattr(bagged_adapter, "MIN_DISSENT", 0)  # use the bag whatever its members chose
    recipe = replace(TWO_STAGE, adapter_stage=replace(TWO_STAGE.adapter_stage, steps=40), bag_size=4)
    model = copy.deepcopy(stack)
    seen: list[tuple[int, torch.Tensor]] = []
    fit_two_stage_adapter(model, x, y_w, y_l, 0, recipe, None,
                          lambda step: seen.append((step, model.adapter.weight.detach().clone())), unlabelled=proxy_x)
    steps = [step for step, _ in seen]
    assert steps == list(range(1, 41))
    torch.testing.assert_close(seen[-1][1], model.adapter.weight.detach())
    assert not torch.allclose(seen[-2][1], seen[-1][1])  # the bag replaced the single fit's last step
    plain = copy.deepcopy(stack)
    fit_two_stage_adapter(plain, x, y_w, y_l, 0, recipe)  # no inputs to distil on: the single fit, as before
    assert not torch.allclose(plain.adapter.weight, model.adapter.weight)


def test_members_that_agree_about_the_centre_leave_the_single_fit() -> None:
    assert not centre_in_doubt([0] * 15 + [3]) and centre_in_doubt([0] * 14 + [3, 5]) and centre_in_doubt([1, 2] * 8)
    stack, (x, y_w, y_l), proxy_x = _world(1)  # its resamples keep the identity (one dissent in 16)
    single = copy.deepcopy(stack)
    fit_adapter(single, x, y_w, y_l, 0, STAGE)
    after = copy.deepcopy(single)
    assert bag_and_distil(after, x, y_w, y_l, proxy_x, seed=0, stage=STAGE) is None
    before, now = single.state_dict(), after.state_dict()
    assert all(torch.equal(before[k], now[k]) for k in before)

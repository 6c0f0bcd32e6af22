"""Specification of the two-stage policy, its baseline, the preference loss and the fit loop."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from ground.schemas import FeatureTriple
from ingest.synthetic import appendix_d
from policies.features.fit_recipe import ADAPTER_PRIORS, ADAPTER_STAGE
from policies.features.fitting import choose_adapter_prior, fit_adapter, fit_preferences
from policies.features.model import (
    DirectPolicy,
    TwoStageConfig,
    TwoStagePolicy,
    pairwise_accuracy,
    preference_loss,
    triples_to_tensors,
)
from policies.features.simplex_adapter import SimplexAdapter

pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    y_w = torch.randint(0, 3, (n,), generator=g)
    y_l = (y_w + torch.randint(1, 3, (n,), generator=g)) % 3
    return x, y_w, y_l


def _snapshot(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


def test_config_round_trips_through_a_dict() -> None:
    config = TwoStageConfig(input_dim=7, n_outputs=4, simplex_dim=2, hidden=16)
    assert TwoStageConfig.from_dict(config.to_dict()) == config


def test_config_refuses_unknown_keys_and_bad_values() -> None:
    with pytest.raises(ValueError, match="Unknown TwoStageConfig keys"):
        TwoStageConfig.from_dict({"input_dim": 5, "width": 3})
    with pytest.raises(ValueError, match="n_outputs"):
        TwoStageConfig(n_outputs=1)
    with pytest.raises(ValueError, match="simplex_dim must be an int >= 2"):
        TwoStageConfig(simplex_dim=1)


def test_adapter_starts_as_the_identity_so_inserting_it_changes_nothing() -> None:
    torch.manual_seed(0)
    model = TwoStagePolicy()
    x, _, _ = _batch()
    without_adapter = torch.log_softmax(model.head(model.log_embed(x)), dim=-1)
    torch.testing.assert_close(model.log_probs(x), without_adapter)


def test_embedding_is_a_point_on_the_simplex() -> None:
    torch.manual_seed(0)
    model = TwoStagePolicy(TwoStageConfig(simplex_dim=4))
    s = model.embed(_batch()[0])
    assert s.shape == (64, 4)
    assert bool((s > 0).all())
    torch.testing.assert_close(s.sum(dim=-1), torch.ones(64))


def test_parameter_groups_split_the_model_into_adapter_and_proxy_stack() -> None:
    model = TwoStagePolicy(TwoStageConfig(simplex_dim=3))
    assert sum(p.numel() for p in model.adapter_parameters()) == 3 * 3 + 3
    n_all = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in model.proxy_parameters()) == n_all - 12


def test_stage_two_trains_only_the_adapter() -> None:
    torch.manual_seed(0)
    model = TwoStagePolicy()
    x, y_w, y_l = _batch()
    proxy_before, adapter_before = _snapshot(model.proxy_parameters()), _snapshot(model.adapter_parameters())
    model.set_stage(2)
    fit_preferences(model, model.parameters(), x, y_w, y_l, steps=20, lr=0.05, seed=0)
    assert _same(proxy_before, _snapshot(model.proxy_parameters()))
    assert not _same(adapter_before, _snapshot(model.adapter_parameters()))


def test_stage_one_leaves_the_adapter_at_the_identity() -> None:
    torch.manual_seed(0)
    model = TwoStagePolicy()
    x, y_w, y_l = _batch()
    model.set_stage(1)
    fit_preferences(model, model.parameters(), x, y_w, y_l, steps=20, lr=0.05, seed=0)
    torch.testing.assert_close(model.adapter.weight.detach(), torch.eye(3))
    torch.testing.assert_close(model.adapter.bias.detach(), torch.zeros(3))


def test_freeze_proxy_and_bad_stage() -> None:
    model = TwoStagePolicy()
    model.freeze_proxy()
    assert not any(p.requires_grad for p in model.proxy_parameters())
    with pytest.raises(ValueError, match="stage must be 1"):
        model.set_stage(3)


def test_preference_loss_matches_a_hand_computed_value() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    y_w, y_l = torch.tensor([0, 2]), torch.tensor([1, 1])
    # σ(log a − log b) = a / (a + b): the triples win with 0.5/0.8 and 0.3/0.9.
    expected = (-math.log(0.5 / 0.8) - math.log(0.3 / 0.9)) / 2
    assert float(preference_loss(probs.log(), y_w, y_l)) == pytest.approx(expected, rel=1e-6)


def test_pairwise_accuracy_counts_triples_ranked_the_right_way() -> None:
    class Fixed(torch.nn.Module):
        def log_probs(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]).log()

    x = torch.zeros(2, 5)
    assert pairwise_accuracy(Fixed(), x, torch.tensor([0, 2]), torch.tensor([1, 1])) == 0.5
    assert pairwise_accuracy(Fixed(), x, torch.tensor([0, 1]), torch.tensor([2, 2])) == 1.0


def test_fit_preferences_lowers_the_loss_and_is_deterministic() -> None:
    x, y_w, y_l = _batch(128)
    losses: list[float] = []
    results = []
    for _ in range(2):
        torch.manual_seed(3)
        model = DirectPolicy()
        final = fit_preferences(
            model, model.parameters(), x, y_w, y_l, steps=50, lr=0.02, seed=7, on_step=lambda s, v: losses.append(v)
        )
        results.append((final, _snapshot(list(model.parameters()))))
    assert results[0][0] < losses[0]
    assert results[0][0] == results[1][0]
    assert _same(results[0][1], results[1][1])


def test_fit_preferences_leaves_the_callers_rng_alone() -> None:
    x, y_w, y_l = _batch()
    model = DirectPolicy()
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    fit_preferences(model, model.parameters(), x, y_w, y_l, steps=2, lr=0.01, seed=99)
    torch.testing.assert_close(torch.rand(3), expected)


def test_anchor_keeps_the_adapter_near_where_it_started() -> None:
    x, y_w, y_l = _batch()
    moved = []
    for anchor in (0.0, 1.0):
        torch.manual_seed(0)
        model = TwoStagePolicy()
        model.set_stage(2)
        fit_preferences(model, model.adapter_parameters(), x, y_w, y_l, steps=100, lr=0.05, seed=0, anchor=anchor)
        moved.append(float((model.adapter.weight.detach() - torch.eye(3)).norm()))
    assert moved[1] < moved[0] / 2


def test_adapter_deviation_on_hand_built_adapters() -> None:
    adapter = SimplexAdapter(3)
    assert float(adapter.deviation().detach()) == 0.0
    with torch.no_grad():
        adapter.weight.copy_(3 * torch.eye(3))  # a tempering: 3(α - 1)² = 12, of which 0.1 is paid
    assert float(adapter.deviation(0.1).detach()) == pytest.approx(1.2)
    full = float(((adapter.weight - torch.eye(3)) ** 2).sum().detach())
    assert float(adapter.deviation(1.0).detach()) == pytest.approx(full)
    with torch.no_grad():
        adapter.weight.copy_(torch.eye(3)[[1, 2, 0]])  # a relabelling: α = 0, ‖P‖² = 3, + 0.1·3·1
        adapter.bias.copy_(torch.tensor([1.0, 0.0, 0.0]))
    assert float(adapter.deviation(0.1).detach()) == pytest.approx(3.0 + 0.3 + 1.0)


def test_fit_adapter_moves_only_the_adapter_and_calls_back_every_step() -> None:
    x, y_w, y_l = _batch()
    torch.manual_seed(0)
    model = TwoStagePolicy()
    before = _snapshot(model.proxy_parameters())
    seen: list[int] = []
    fit_adapter(model, x, y_w, y_l, seed=0, recipe=replace(ADAPTER_STAGE, steps=30), after_step=seen.append)
    assert _same(before, _snapshot(model.proxy_parameters()))
    assert not torch.equal(model.adapter.weight, torch.eye(3))
    assert seen == list(range(1, 31))


def test_adapter_prior_is_worth_a_number_of_triples() -> None:
    """The pull toward the identity is prior/n: with the same prior, 16x the data moves it further."""
    def moved(n: int, prior: float) -> float:
        x, y_w, y_l = _batch(n, seed=1)
        torch.manual_seed(0)
        model = TwoStagePolicy()
        fit_adapter(model, x, y_w, y_l, seed=0, recipe=replace(ADAPTER_STAGE, steps=100, adapter_prior=prior))
        return float(model.adapter.deviation().detach())

    assert moved(64, prior=1000.0) < moved(64, prior=1.0) / 2
    assert moved(64 * 16, prior=50.0) > moved(64, prior=50.0)


def test_choose_adapter_prior_picks_from_the_grid_and_leaves_the_stack_alone() -> None:
    x, y_w, y_l = _batch(40)
    torch.manual_seed(0)
    model = TwoStagePolicy()
    before = _snapshot(list(model.parameters()))
    quick = replace(ADAPTER_STAGE, steps=40)
    prior = choose_adapter_prior(model, x, y_w, y_l, seed=0, folds=4, priors=(0.3, 30.0), recipe=quick)
    assert prior in (0.3, 30.0)
    assert _same(before, _snapshot(list(model.parameters())))
    assert choose_adapter_prior(model, x, y_w, y_l, seed=0, folds=4, priors=(0.3, 30.0), recipe=quick) == prior


def test_choose_adapter_prior_takes_the_strongest_prior_the_data_cannot_tell_apart() -> None:
    """One-standard-error rule: when the expert answers like the proxy stack, no prior is clearly
    better and the strongest wins (the best CV score alone picks 10 on these 40 triples); when
    the expert is another policy and there are many triples, a strong pull toward the stack is
    clearly worse and a weaker prior wins."""
    quick = replace(ADAPTER_STAGE, steps=60)
    torch.manual_seed(0)
    stack = TwoStagePolicy()
    with torch.no_grad():
        stack.output_map.weight.mul_(4.0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 5, generator=g)
    y_w = torch.randint(0, 3, (40,), generator=g)
    y_l = (y_w + torch.randint(1, 3, (40,), generator=g)) % 3
    with torch.no_grad():
        own = stack.log_probs(x)
    same_w, same_l = _bt_winners(own, y_w, y_l, g)
    assert choose_adapter_prior(stack, x, same_w, same_l, 0, 4, ADAPTER_PRIORS, quick) == max(ADAPTER_PRIORS)

    g = torch.Generator().manual_seed(3)
    x = torch.randn(400, 5, generator=g)
    y_w = torch.randint(0, 3, (400,), generator=g)
    y_l = (y_w + torch.randint(1, 3, (400,), generator=g)) % 3
    with torch.no_grad():  # another expert: the stack's logits through a fixed non-tempering mixing
        mixing = torch.tensor([[0.2, 1.5, -1.0], [-1.2, 0.1, 1.3], [1.0, -1.4, 0.3]])
        other = torch.log_softmax(stack.log_probs(x) @ mixing, dim=-1)
    other_w, other_l = _bt_winners(other, y_w, y_l, g)
    assert choose_adapter_prior(stack, x, other_w, other_l, 0, 4, (0.3, 3000.0), quick) == 0.3


def _bt_winners(log_probs: torch.Tensor, a: torch.Tensor, b: torch.Tensor, g: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor]:
    p_a = torch.sigmoid(log_probs.gather(1, a[:, None]) - log_probs.gather(1, b[:, None])).squeeze(1)
    a_wins = torch.rand(a.shape, generator=g) < p_a
    return torch.where(a_wins, a, b), torch.where(a_wins, b, a)


def test_fit_preferences_refuses_frozen_parameters() -> None:
    model = TwoStagePolicy()
    model.freeze_proxy()
    x, y_w, y_l = _batch()
    with pytest.raises(ValueError, match="no trainable parameters"):
        fit_preferences(model, model.proxy_parameters(), x, y_w, y_l, steps=1, lr=0.1, seed=0)


def test_direct_policy_gives_normalised_log_probs() -> None:
    lp = DirectPolicy(input_dim=5, n_outputs=4, hidden=8).log_probs(_batch()[0])
    assert lp.shape == (64, 4)
    torch.testing.assert_close(lp.exp().sum(dim=-1), torch.ones(64))


def test_triples_to_tensors_gives_typed_columns() -> None:
    triples = [FeatureTriple(x=[0.5, 1.0], y_w=2, y_l=0), FeatureTriple(x=[-1.0, 0.0], y_w=0, y_l=1)]
    x, y_w, y_l = triples_to_tensors(triples)
    assert x.dtype == torch.float32 and x.shape == (2, 2)
    assert y_w.dtype == y_l.dtype == torch.long
    assert y_w.tolist() == [2, 0] and y_l.tolist() == [0, 1]
    with pytest.raises(ValueError, match="same input dimension"):
        triples_to_tensors([*triples, FeatureTriple(x=[1.0], y_w=0, y_l=1)])


def _gold_accuracy(model: torch.nn.Module, task_seed: int) -> float:
    task = appendix_d(seed=task_seed, n_heldout=1000)
    x, a, b = triples_to_tensors(task.expert_heldout)
    gold = task.world.expert_probs(x.numpy().astype(np.float64))
    rows = np.arange(len(a))
    gold_prefers_a = gold[rows, a.numpy()] > gold[rows, b.numpy()]
    with torch.no_grad():
        lp = model.log_probs(x).numpy()  # type: ignore[operator]
    return float(((lp[rows, a.numpy()] > lp[rows, b.numpy()]) == gold_prefers_a).mean())


def test_two_stage_beats_expert_only_on_appendix_d() -> None:
    """Paper 1's claim: proxy stage + 48-triple adapter beats learning from the 48 triples alone."""
    task = appendix_d(seed=0)
    xp, wp, lp = triples_to_tensors(task.proxy)
    xe, we, le = triples_to_tensors(task.expert)
    torch.manual_seed(0)
    two_stage = TwoStagePolicy()
    two_stage.set_stage(1)
    fit_preferences(two_stage, two_stage.proxy_parameters(), xp, wp, lp, 400, 0.02, 0, weight_decay=1e-3)
    two_stage.set_stage(2)
    fit_preferences(two_stage, two_stage.adapter_parameters(), xe, we, le, 300, 0.05, 0, anchor=0.03)
    torch.manual_seed(0)
    direct = DirectPolicy()
    fit_preferences(direct, direct.parameters(), xe, we, le, 300, 0.02, 0, weight_decay=1e-2)
    assert _gold_accuracy(two_stage, 0) > _gold_accuracy(direct, 0) + 0.03

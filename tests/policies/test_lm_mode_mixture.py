"""The sequence-level mode-mixture reading (policies/lm/mode_mixture.py): its likelihood, its stages, its centre."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from policies.lm.mode_mixture import (
    ModeMixture,
    assignment_centre,
    assignment_score,
    kmeans_modes,
    select_trainable,
)

H, D, V, B, T, R = 6, 3, 11, 5, 4, 3


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    prompt_mask = torch.ones(B, T)
    prompt_mask[0, -1] = 0
    mask = torch.ones(B, R)
    mask[1, -1] = 0
    return {"embeds": torch.randn(B, T, H, generator=g), "prompt_mask": prompt_mask,
            "hidden": torch.randn(B, R, H, generator=g), "targets": torch.randint(0, V, (B, R), generator=g),
            "mask": mask, "head_weight": torch.randn(V, H, generator=g)}


def mixture(seed: int = 0) -> ModeMixture:
    torch.manual_seed(seed)
    model = ModeMixture(H, D)
    with torch.no_grad():
        model.theta.normal_()
        model.tau.weight.normal_()
    return model


def test_log_prob_is_the_logsumexp_of_the_mode_log_probs() -> None:
    model, data = mixture(), batch()
    log_w = model.log_weights(data["embeds"], data["prompt_mask"])
    modes = []
    for k in range(D):  # each mode by hand: the base's logits plus W θ_k, summed over the response's tokens
        logits = data["hidden"] @ data["head_weight"].T + data["head_weight"] @ model.theta[k]
        token = F.log_softmax(logits, -1).gather(-1, data["targets"][..., None]).squeeze(-1)
        modes.append((token * data["mask"]).sum(-1))
    expected = torch.stack([log_w[:, k].exp() * modes[k].exp() for k in range(D)]).sum(0).log()
    torch.testing.assert_close(model.log_prob(**data), expected, rtol=1e-5, atol=1e-5)
    assert torch.allclose(log_w.exp().sum(-1), torch.ones(B))


def test_untrained_mixture_with_zero_modes_is_the_base_model() -> None:
    model, data = ModeMixture(H, D), batch()
    base = F.log_softmax(data["hidden"] @ data["head_weight"].T, -1).gather(-1, data["targets"][..., None])
    torch.testing.assert_close(model.log_prob(**data), (base.squeeze(-1) * data["mask"]).sum(-1))


def dpo_steps(model: ModeMixture, steps: int = 5) -> None:
    data, other = batch(1), batch(2)
    optimiser = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(steps):
        chosen = model.log_prob(**data)
        rejected = model.log_prob(**{**data, "targets": other["targets"]})
        loss = -F.logsigmoid(chosen - rejected).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()


def test_stage_two_moves_only_the_adapter() -> None:
    model = mixture()
    assert select_trainable(model, "expert") == ["adapter.weight", "adapter.bias"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dpo_steps(model)
    after = model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved == {"adapter.weight", "adapter.bias"}


def test_stage_one_keeps_the_adapter_at_the_identity_and_trains_tau_and_modes() -> None:
    model = mixture()
    assert set(select_trainable(model, "proxy")) == {"tau.weight", "tau.bias", "theta"}
    dpo_steps(model)
    assert torch.equal(model.adapter.weight, torch.eye(D)) and torch.equal(model.adapter.bias, torch.zeros(D))
    with pytest.raises(ValueError):
        select_trainable(model, "everything")


def test_gradient_reaches_tau_from_a_uniform_start() -> None:
    """τ̃ starts at zero (w uniform); once the modes differ, DPO's gradient on τ̃ is non-zero to first order."""
    model, data, other = ModeMixture(H, D), batch(1), batch(2)
    with torch.no_grad():
        model.theta.normal_()
    loss = -F.logsigmoid(model.log_prob(**data) - model.log_prob(**{**data, "targets": other["targets"]})).mean()
    loss.backward()
    assert model.tau.weight.grad is not None and model.tau.weight.grad.abs().sum() > 0


def test_assignment_centre_recovers_a_relabelling_and_relabels_through_the_adapter() -> None:
    score = torch.full((D, D), -5.0)
    score[0, 2], score[1, 0], score[2, 1] = 0.0, 0.0, 0.0  # the expert pairs favour sending vertex k to σ(k)
    centre = assignment_centre(score)
    model = ModeMixture(H, D)
    model.adapter.set_centre(centre, torch.zeros(D))
    model.adapter.reset()
    with torch.no_grad():
        model.tau.bias.copy_(torch.tensor([8.0, 0.0, 0.0]))  # τ̃ puts every prompt near vertex 0
    w = model.log_weights(torch.zeros(1, 1, H), torch.ones(1, 1)).exp()
    assert int(w.argmax()) == 2


def test_assignment_score_weights_each_mode_by_its_prompts() -> None:
    weights = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    chosen, rejected = torch.tensor([[0.0, 5.0], [5.0, 0.0]]), torch.zeros(2, 2)
    score = assignment_score(weights, chosen, rejected, torch.zeros(2), beta=1.0)
    assert score[0, 1] > score[0, 0] and score[1, 0] > score[1, 1]
    assert torch.equal(assignment_centre(score), torch.tensor([[0.0, 1.0], [1.0, 0.0]]))


def test_kmeans_modes_break_the_symmetry() -> None:
    g = torch.Generator().manual_seed(0)
    head = torch.randn(V, H, generator=g)
    ids = torch.cat([torch.randint(0, 3, (20, R), generator=g), torch.randint(6, 9, (20, R), generator=g)])
    theta = kmeans_modes(ids, torch.ones(40, R), head, 2, seed=0, norm=3.0)
    assert theta.shape == (2, H)
    assert not torch.allclose(theta[0], theta[1])
    assert theta.norm(dim=1).mean() == pytest.approx(3.0, rel=1e-4)

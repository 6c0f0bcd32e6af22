"""DPO / IPO / hinge objectives: hand-computed values, config checks, and parity with TRL's DPOTrainer."""

import copy
import math

import pytest
import torch

from tests.workers.lm_helpers import PAIRS, tiny_model_dir
from workers.lm.models import load_causal_lm, load_tokenizer
from workers.lm.training.data import collate_pairs, tokenize_pairs
from workers.lm.training.dpo import completion_token_logps, dpo_batch_loss
from workers.lm.training.dpo_config import DPOConfig
from workers.lm.training.objectives import (
    dpo_sigmoid_loss,
    hinge_loss,
    ipo_loss,
    nll_loss,
    preference_loss,
    sequence_logps,
)

CHOSEN, REJECTED = torch.tensor([1.0]), torch.tensor([-1.0])  # log-ratios: Δ = 2


def test_sigmoid_loss_is_minus_log_sigmoid_of_beta_delta():
    assert float(dpo_sigmoid_loss(CHOSEN, REJECTED, beta=0.1)) == pytest.approx(math.log1p(math.exp(-0.2)))


def test_ipo_loss_is_squared_distance_to_half_inverse_tau():
    assert float(ipo_loss(CHOSEN, REJECTED, beta=0.1)) == pytest.approx((2 - 5) ** 2)


def test_hinge_loss_is_zero_beyond_the_margin():
    assert float(hinge_loss(CHOSEN, REJECTED, beta=0.1)) == pytest.approx(0.8)
    assert float(hinge_loss(CHOSEN, REJECTED, beta=1.0)) == 0.0


def test_sequence_logps_sum_and_mean_count_only_masked_tokens():
    per_token = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]])
    mask = torch.tensor([[0, 1, 1], [1, 0, 0]])
    assert sequence_logps(per_token, mask, "sum").tolist() == [-5.0, -4.0]
    assert sequence_logps(per_token, mask, "mean").tolist() == [-2.5, -4.0]


def test_nll_is_the_mean_over_all_masked_chosen_tokens():
    per_token = torch.tensor([[-1.0, -2.0], [-3.0, -9.0]])
    assert float(nll_loss(per_token, torch.tensor([[1, 1], [1, 0]]))) == pytest.approx(2.0)


def test_preference_loss_reports_reward_metrics():
    loss, metrics = preference_loss("sigmoid", torch.tensor([-3.0]), torch.tensor([-6.0]), torch.tensor([-4.0]),
                                    torch.tensor([-5.0]), beta=0.5)
    assert float(loss) == pytest.approx(math.log1p(math.exp(-1.0)))
    assert metrics["rewards/margins"] == pytest.approx(1.0)
    assert metrics["rewards/accuracies"] == 1.0


def test_unknown_loss_type_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"Unknown loss type 'kto'; should be one of \['sigmoid', 'ipo', 'hinge'\]"):
        preference_loss("kto", CHOSEN, REJECTED, CHOSEN, REJECTED, beta=0.1)
    with pytest.raises(ValueError, match="Unknown loss type"):
        DPOConfig(loss_type="kto")


def test_dpo_config_checks_fields_and_rejects_unknown_keys():
    with pytest.raises(ValueError, match="beta must be > 0"):
        DPOConfig(beta=0)
    with pytest.raises(ValueError, match="grad_accum_steps must be >= 1"):
        DPOConfig(grad_accum_steps=0)
    with pytest.raises(ValueError, match=r"unknown DPOConfig keys \['lr'\]"):
        DPOConfig.from_dict({"lr": 1e-3})
    assert DPOConfig(loss_type="hinge").reduction == "mean"  # paper 2: hinge on mean log-probs
    assert DPOConfig(loss_type="ipo").reduction == "sum"


# TRL 1.16 aggregates sigmoid and hinge with the sum, IPO with the per-token mean; parity uses its choice.
TRL_CASES = [("sigmoid", "sum", 0.0), ("ipo", "mean", 0.0), ("hinge", "sum", 0.0), ("sigmoid", "sum", 0.5)]


@pytest.mark.parametrize(("loss_type", "reduction", "nll_weight"), TRL_CASES)
def test_loss_and_gradients_match_trl_on_the_same_model_and_batch(loss_type, reduction, nll_weight, tmp_path):
    from datasets import Dataset
    from trl import DPOConfig as TRLDPOConfig
    from trl import DPOTrainer

    path = tiny_model_dir()
    tokenizer = load_tokenizer(path)
    reference = load_causal_lm(path)
    policy = load_causal_lm(path)
    with torch.no_grad():  # move the policy away from the reference so the log-ratios are not zero
        generator = torch.Generator().manual_seed(1)
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    ours = copy.deepcopy(policy)

    trl_losses, weights = [loss_type], [1.0]
    if nll_weight:
        trl_losses, weights = [loss_type, "sft"], [1.0, nll_weight]
    args = TRLDPOConfig(output_dir=str(tmp_path), loss_type=trl_losses, loss_weights=weights, beta=0.1,
                        report_to=[], use_cpu=True, per_device_train_batch_size=len(PAIRS),
                        gradient_checkpointing=False, precompute_ref_log_probs=False, max_length=None,
                        bf16=False)  # TRL defaults to bf16 autocast, on CPU too
    trainer = DPOTrainer(model=policy, ref_model=copy.deepcopy(reference), args=args,
                         train_dataset=Dataset.from_list(PAIRS), processing_class=tokenizer)
    trl_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
    trl_loss = trainer.compute_loss(trainer.model, trl_batch)
    trl_loss.backward()

    config = DPOConfig(loss_type=loss_type, beta=0.1, logp_reduction=reduction, nll_weight=nll_weight,
                       max_length=10_000)
    batch = collate_pairs(tokenize_pairs(PAIRS, tokenizer), tokenizer.pad_token_id, config.max_length)
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(batch[key], trl_batch[key]), key  # same tokens, same masks
    with torch.no_grad():
        ref_chosen, ref_rejected = dpo_batch_loss_reference(reference, batch, config)
    loss, _ = dpo_batch_loss(ours, batch, ref_chosen, ref_rejected, config)
    loss.backward()

    assert float(loss.detach()) == pytest.approx(float(trl_loss.detach()), abs=1e-5)
    assert float(loss.detach()) > 0
    trl_grads = dict(trainer.model.named_parameters())
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param.grad, trl_grads[name].grad, atol=1e-5, rtol=0)


def dpo_batch_loss_reference(reference, batch, config):
    per_token, mask = completion_token_logps(reference, batch)
    return sequence_logps(per_token, mask, config.reduction).chunk(2, dim=0)


# IPO on summed log-probs has a loss ~20 and gradients ~10x larger here; its mean form is checked instead.
@pytest.mark.parametrize(("loss_type", "reduction"), [("sigmoid", "sum"), ("ipo", "mean"), ("hinge", "mean")])
def test_float32_loss_and_gradients_match_float64(loss_type, reduction):
    path = tiny_model_dir()
    tokenizer = load_tokenizer(path)
    reference, policy = load_causal_lm(path), load_causal_lm(path)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(2)
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    config = DPOConfig(loss_type=loss_type, logp_reduction=reduction, max_length=10_000, nll_weight=0.1)
    batch = collate_pairs(tokenize_pairs(PAIRS, tokenizer), tokenizer.pad_token_id, config.max_length)
    results = []
    for dtype in (torch.float32, torch.float64):
        pol, ref = copy.deepcopy(policy).to(dtype), copy.deepcopy(reference).to(dtype)
        with torch.no_grad():
            ref_chosen, ref_rejected = dpo_batch_loss_reference(ref, batch, config)
        loss, _ = dpo_batch_loss(pol, batch, ref_chosen, ref_rejected, config)
        loss.backward()
        results.append((float(loss.detach()), {n: p.grad.double() for n, p in pol.named_parameters()}))
    (loss32, grads32), (loss64, grads64) = results
    assert loss32 == pytest.approx(loss64, rel=1e-6)  # IPO losses are ~25: float32 resolves ~2e-6 there
    for name, grad in grads32.items():
        torch.testing.assert_close(grad, grads64[name], atol=1e-5, rtol=0)

"""The mode-mixture reading over a frozen tiny model (workers/lm/mode_mixture_training.py): both stages, sampling,
save and load."""

import torch

from policies.lm.mode_mixture import ModeMixture, load_mixture_dir, save_mixture_dir
from policies.lm.prompt_content import PAD
from policies.lm.simplex_bottleneck import load_causal_lm_dir
from tests.workers.lm_helpers import PAIRS, tiny_model_dir
from workers.lm import mode_mixture_training as mm
from workers.lm.mixture_features import mixture_pair_features
from workers.lm.models import load_tokenizer

RECIPE = mm.MixtureRecipe(simplex_dim=3, proxy_epochs=2, adapter_epochs=2, batch_size=4)


def _setup():
    model = load_causal_lm_dir(tiny_model_dir()).eval()
    tokenizer = load_tokenizer(tiny_model_dir())
    rows = [{**p, "prompt": f"{p['prompt']} ({i})"} for i in range(3) for p in PAIRS]
    return model, tokenizer, model.get_output_embeddings().weight.detach().float(), rows


def test_encoded_base_log_probs_match_the_model_and_stage_one_starts_there():
    model, tokenizer, head, rows = _setup()
    data = mm.encode_pairs(model, tokenizer, rows, RECIPE.max_length)
    pair = rows[0]
    ids = tokenizer(pair["prompt"] + pair["chosen"] + tokenizer.eos_token, add_special_tokens=False,
                    return_tensors="pt").input_ids
    prompt_len = len(tokenizer(pair["prompt"], add_special_tokens=False).input_ids)
    with torch.no_grad():
        logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    torch.testing.assert_close(data.base_logps[0, 0], logps[prompt_len - 1:].sum(), rtol=1e-4, atol=1e-4)
    zero = ModeMixture(head.shape[1], 3)  # Θ̃ = 0: every mode is the base, so is the mixture
    torch.testing.assert_close(mm.pair_logps(zero, data, head), data.base_logps, rtol=1e-4, atol=1e-4)


def test_stage_two_moves_only_the_adapter_and_the_base_stays_frozen(tmp_path):
    model, tokenizer, head, rows = _setup()
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    data = mm.encode_pairs(model, tokenizer, rows, RECIPE.max_length)
    stage1, losses = mm.train_proxy(data, head, RECIPE)
    assert losses and torch.equal(stage1.adapter.weight, torch.eye(3))
    stage2, _ = mm.train_adapter(stage1, data.take(slice(0, 6)), head, RECIPE)
    before, after = stage1.state_dict(), stage2.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved <= {"adapter.weight", "adapter.bias", "adapter.centre_weight", "adapter.centre_bias"}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in base_before.items())

    saved = save_mixture_dir(stage2, tmp_path / "mixture", str(tiny_model_dir()), RECIPE.to_dict())
    loaded, spec = load_mixture_dir(saved)
    assert spec["base_model"] == str(tiny_model_dir())
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in stage2.state_dict().items())
    texts = mm.sample(model, tokenizer, loaded, [r["prompt"] for r in rows[:3]], seed=0, max_new_tokens=4)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)


def test_condition_test_features_are_mode_posteriors_and_the_dpo_margin():
    model, tokenizer, head, rows = _setup()
    data = mm.encode_pairs(model, tokenizer, rows, RECIPE.max_length)
    stage1, _ = mm.train_proxy(data, head, RECIPE)
    features = mixture_pair_features(stage1, data, head, beta=0.5)
    assert features.simplex_chosen.shape == (len(rows), 3) and features.direct_chosen.shape == (len(rows), 64)
    torch.testing.assert_close(torch.from_numpy(features.simplex_chosen).exp().sum(1),
                               torch.ones(len(rows), dtype=torch.float64), rtol=1e-4, atol=1e-4)
    ratio = mm.pair_logps(stage1, data, head).detach() - data.base_logps
    torch.testing.assert_close(torch.from_numpy(features.proxy_margin).float(), 0.5 * (ratio[:, 0] - ratio[:, 1]),
                               rtol=1e-4, atol=1e-4)


def test_the_prompts_token_ids_reach_the_condition_tests_padded_and_as_cut():
    """The tests group prompts by these (policies/lm/prompt_content.py); a cut prompt keeps its end."""
    model, tokenizer, head, rows = _setup()
    data = mm.encode_pairs(model, tokenizer, rows, RECIPE.max_length)
    terms = mixture_pair_features(ModeMixture(head.shape[1], 3), data, head, beta=0.5).mixture
    assert terms is not None and terms.prompt_tokens is not None
    for row, ids in zip(rows, terms.prompt_tokens, strict=True):
        expected = tokenizer(row["prompt"], add_special_tokens=False).input_ids
        assert ids[ids != PAD].tolist() == expected
    assert (terms.prompt_tokens == PAD).any()  # prompts of unequal length are padded
    cut = mm.encode_pairs(model, tokenizer, rows[:1], max_length=6)
    kept = cut.prompt_ids[0][cut.prompt_ids[0] != PAD].tolist()
    assert kept and kept == tokenizer(rows[0]["prompt"], add_special_tokens=False).input_ids[-len(kept):]

"""Serving a chat policy whose base is not the tiny model: a release without a chat template is refused (and one
registered anyway answers 503, not 500), the prompt is tokenised without a second BOS, the bottleneck acts at the
head's input width (OPT's projection), and a mixture cuts prompts where training did (the model's context)."""

import shutil
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from tokenizers.processors import TemplateProcessing
from transformers import AutoModelForCausalLM, OPTConfig

from policies.lm import release
from policies.lm.chat import ChatPolicy, load_chat_policy, register_causal_lm
from policies.lm.mode_mixture import ModeMixture, save_mixture_dir
from policies.lm.simplex_bottleneck import CONFIG_KEY, attach_bottleneck, load_causal_lm_dir
from policies.promotion import CheckpointUnreadable
from proxyloop.http import create_app
from proxyloop.testing import isolated_settings
from tests.workers.lm_helpers import tiny_model_dir
from workers.lm.models import CHATML_TEMPLATE, build_tiny, load_tokenizer

QUESTION = [{"role": "user", "content": "What is 2 plus 3?"}]


def _without_template(out: Path) -> Path:
    base = shutil.copytree(tiny_model_dir(), out)
    tokenizer = load_tokenizer(base)
    tokenizer.chat_template = None
    (base / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer.save_pretrained(base)
    (base / "chat_template.jinja").unlink(missing_ok=True)
    return base


def test_a_model_without_a_chat_template_is_not_released_and_not_served_as_a_500(tmp_path, monkeypatch):
    """Before: released, then every /v1/chat/completions request was a 500 ("chat_template is not set")."""
    monkeypatch.setattr(release, "announce", lambda *_, **__: None)
    model_dir = _without_template(tmp_path / "gpt2-like")
    settings = isolated_settings(tmp_path / "home", api_keys="k", registry_url=str(tmp_path / "registry"),
                                 chat_policy_name="plain")
    with pytest.raises(CheckpointUnreadable, match="has no chat template"):
        release.release_causal_lm(settings, model_dir, {"run": "plain"})

    register_causal_lm(settings.registry_dir, "plain", model_dir, {"run": "plain"})  # released by other means
    with pytest.raises(FileNotFoundError, match="has no chat template"):  # the route's 503
        load_chat_policy(settings.registry_dir, "plain")
    reply = TestClient(create_app(settings)).post(
        "/v1/chat/completions", headers={"Authorization": "Bearer k"},
        json={"model": "plain@production", "messages": QUESTION, "max_tokens": 4})
    assert reply.status_code == 503 and "no chat template" in reply.text


def test_the_prompt_is_tokenised_without_a_second_bos():
    """Before: add_special_tokens=True put a Llama-style tokenizer's <s> before the template's own: <s><s>."""
    tokenizer = load_tokenizer(tiny_model_dir())
    bos = tokenizer.bos_token_id
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single=f"{tokenizer.bos_token} $A",
                                                                    special_tokens=[(tokenizer.bos_token, bos)])
    tokenizer.chat_template = "{{ bos_token }}" + CHATML_TEMPLATE
    assert tokenizer("x")["input_ids"][0] == bos  # this tokenizer adds a BOS of its own
    ids = ChatPolicy(version=None, model=None, tokenizer=tokenizer).prompt_ids(QUESTION)[0].tolist()
    assert ids[0] == bos and ids[1] != bos
    assert ids == tokenizer(tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True),
                            add_special_tokens=False)["input_ids"]


def test_the_bottleneck_acts_at_the_head_input_width_of_an_opt_with_a_projection(tmp_path):
    """Before: sized from hidden_size (64) while OPT's head reads the projected 32: a shape error at stage 1."""
    config = OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=1, num_attention_heads=4, vocab_size=100,
                       max_position_embeddings=64, word_embed_proj_dim=32, dropout=0.0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        bottleneck = attach_bottleneck(model, 3)
        torch.testing.assert_close(model(input_ids=ids).logits, before)  # Θ̃ = 0: the base
        bottleneck.theta.weight.normal_()
        after = model(input_ids=ids).logits
    assert getattr(model.config, CONFIG_KEY) == {"simplex_dim": 3, "width": 32}
    assert not torch.allclose(after, before)
    model.save_pretrained(tmp_path / "opt")
    with torch.no_grad():
        torch.testing.assert_close(load_causal_lm_dir(tmp_path / "opt")(input_ids=ids).logits, after)


def test_a_mixture_cuts_prompts_at_the_model_context_when_it_is_shorter(tmp_path):
    """Before: the recipe's max_length alone (512), while training cut at min(max_length, context) = 64."""
    base = build_tiny(tmp_path / "short", max_positions=64)
    save_mixture_dir(ModeMixture(64, 3), base, str(base), {"simplex_dim": 3, "max_length": 512})
    settings = isolated_settings(tmp_path / "home", registry_url=str(tmp_path / "registry"))
    register_causal_lm(settings.registry_dir, "short", base, {"run": "short"})
    assert load_chat_policy(settings.registry_dir, "short").prompt_cap == 64

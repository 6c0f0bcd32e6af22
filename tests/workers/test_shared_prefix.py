"""Shared-prefix rows (workers/lm/training/shared_prefix.py) compute what the usual [chosen; rejected] rows do.

Parity covers per-token log-probs at every scored position, the DPO loss (+ NLL) and the gradient of every
trainable parameter, float32 on CPU, for each decoder class the path accepts, with and without LM-head
chunks; pairs have prompts and responses of different lengths, so rows end at different places. What the
path cannot run exactly must take the usual rows.
"""

import contextlib

import pytest
import torch

from tests.workers.lm_helpers import PAIRS, tiny_model_dir
from tests.workers.test_chunked_logps import batch_of, build, gpt2_dir
from workers.lm.models import load_tokenizer
from workers.lm.training.data import collate_pairs, tokenize_pairs
from workers.lm.training.dpo import completion_token_logps, dpo_batch_loss, reference_logps
from workers.lm.training.dpo_config import DPOConfig
from workers.lm.training.shared_prefix import shared_prefix_batch, shared_prefix_parts

KINDS = ["llama", "lora", "simplex", "gpt2", "qwen2", "qwen3", "llama-eager"]
LONG = {"prompt": "a proxy judge ranks the longer reply and the expert labels the first response while the model "
                  "says it is 7 or 9 and the question stays open",
        "chosen": " It is 7, and the first response is the one the expert labels.",
        "rejected": " both drafts, the question or the short answer, the model says."}


def _qwen(kind: str):
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    config_class, model_class = (Qwen2Config, Qwen2ForCausalLM) if kind == "qwen2" else (Qwen3Config, Qwen3ForCausalLM)
    size = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 128}
    if kind == "qwen3":
        size["head_dim"] = 8
    torch.manual_seed(0)
    config = config_class(vocab_size=len(load_tokenizer(tiny_model_dir())), **size)
    config._attn_implementation = "sdpa"
    return model_class(config)


def make(kind: str):
    if kind in ("qwen2", "qwen3"):
        return _qwen(kind)
    model = build("llama" if kind == "llama-eager" else kind)
    if kind == "llama-eager":
        model.config._attn_implementation = "eager"
    return model


def step(model, batch, chunk_tokens: int, share: bool):
    """Per-token log-probs, loss and trainable gradients of one DPO step (sigmoid + NLL)."""
    config = DPOConfig(beta=0.1, nll_weight=0.5, logp_reduction="sum", max_length=10_000,
                       logps_chunk_tokens=chunk_tokens, share_prompts=share)
    per_token, mask = completion_token_logps(model, batch, chunk_tokens, share)
    reference = torch.linspace(-40.0, -10.0, batch["input_ids"].shape[0])
    loss, _ = dpo_batch_loss(model, batch, *reference.chunk(2), config)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return per_token.detach(), mask, loss.detach(), grads


def _scored(per_token, mask, width: int):
    """Scored log-probs by (row, position from the row's start): the two paths trim rows differently."""
    offset = width - 1 - mask.shape[1]
    return {(r, offset + j): per_token[r, j] for r, j in mask.nonzero().tolist()}


def assert_parity(kind: str, batch, chunk_tokens: int) -> int:
    """Shared rows and the usual rows give the same scored log-probs, loss and gradients; returns how many scored."""
    per_token, mask, loss, grads = step(make(kind), batch, chunk_tokens, share=True)
    usual_tokens, usual_mask, usual_loss, usual_grads = step(make(kind), batch, chunk_tokens, share=False)
    width = batch["input_ids"].shape[1]
    shared_scored, usual_scored = _scored(per_token, mask, width), _scored(usual_tokens, usual_mask, width)
    assert shared_scored.keys() == usual_scored.keys()
    for key, value in shared_scored.items():
        torch.testing.assert_close(value, usual_scored[key], atol=1e-5, rtol=0, msg=str(key))
    torch.testing.assert_close(loss, usual_loss, atol=1e-5, rtol=0)
    assert grads.keys() == usual_grads.keys() and grads
    for name, grad in grads.items():
        assert grad is not None and usual_grads[name] is not None, name
        torch.testing.assert_close(grad, usual_grads[name], atol=1e-5, rtol=0, msg=name)
    return len(shared_scored)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk_tokens", [0, 7])
def test_shared_prefix_log_probs_loss_and_gradients_equal_the_usual_rows(kind, chunk_tokens):
    batch = batch_of("gpt2" if kind == "gpt2" else "llama")
    assert shared_prefix_parts(make(kind)) is not None and shared_prefix_batch(batch) is not None
    assert assert_parity(kind, batch, chunk_tokens) > 7


def _place(shared, tokens: list[int]) -> tuple[int, int]:
    """The (row, offset) where a pair's tokens stand in the shared rows."""
    for row in range(shared.input_ids.shape[0]):
        ids = shared.input_ids[row].tolist()
        for start in range(len(ids) - len(tokens) + 1):
            if ids[start:start + len(tokens)] == tokens and shared.position_ids[row, start] == 0:
                return row, start
    raise AssertionError(f"{tokens} not in the shared rows")


def test_each_pair_holds_its_prompt_once_and_sees_nothing_of_another():
    tokenizer = load_tokenizer(tiny_model_dir())
    pairs = tokenize_pairs([*PAIRS, LONG], tokenizer)
    batch = collate_pairs(pairs, tokenizer.pad_token_id, 10_000)
    shared = shared_prefix_batch(batch)
    assert shared is not None
    assert shared.input_ids.shape[1] == max(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    placed = []
    for pair in pairs:
        tokens = pair.prompt_ids + pair.chosen_ids + pair.rejected_ids
        row, start = _place(shared, tokens)
        placed.append((row, start, start + len(tokens)))
        prompt_end = start + len(pair.prompt_ids)
        chosen_end, end = prompt_end + len(pair.chosen_ids), start + len(tokens)
        positions = list(range(chosen_end - start))
        positions += list(range(len(pair.prompt_ids), len(pair.prompt_ids) + len(pair.rejected_ids)))
        assert shared.position_ids[row, start:end].tolist() == positions  # the rejected one restarts
        allowed = shared.allowed[row, 0]
        assert not allowed[chosen_end:end, prompt_end:chosen_end].any()  # it never sees the chosen one
        assert allowed[chosen_end:end, start:prompt_end].all()  # but sees the whole prompt
        assert not allowed[start:end, :start].any() and not allowed[start:end, end:].any()  # nor another pair
    assert len({row for row, _, _ in placed}) < len(pairs)  # the short pairs were packed beside each other


def test_reference_log_probs_are_the_same_with_shared_prompts():
    model, pairs = build("lora"), tokenize_pairs(PAIRS, load_tokenizer(tiny_model_dir()))
    found = []
    for share in (True, False):
        config = DPOConfig(batch_size=3, max_length=10_000, share_prompts=share)
        with model.disable_adapter():
            found.append(reference_logps(model, pairs, config, 0, torch.device("cpu"), contextlib.nullcontext()))
    for shared, usual in zip(*found, strict=True):
        torch.testing.assert_close(shared, usual, atol=1e-5, rtol=0)
    assert DPOConfig().share_prompts  # on by default


def test_batches_and_models_it_cannot_run_exactly_take_the_usual_rows():
    batch = batch_of("llama")
    different = {k: v.clone() for k, v in batch.items()}
    different["input_ids"][len(PAIRS), 0] += 1  # pair 0's rejected row now has another prompt
    assert shared_prefix_batch(different) is None
    left_padded = {k: v.flip(1) for k, v in batch.items()}
    assert shared_prefix_batch(left_padded) is None
    assert shared_prefix_batch({k: v[:3] for k, v in batch.items()}) is None  # not [chosen; rejected]

    flash = build("llama")
    flash.config._attn_implementation = "flash_attention_2"  # needs no mask: it would ignore ours
    assert shared_prefix_parts(flash) is None
    subclassed = build("llama")
    subclassed.__class__ = type("OtherLlama", (type(subclassed),), {})
    assert shared_prefix_parts(subclassed) is None
    with torch.no_grad():  # and what falls back still computes the usual log-probs
        fallback, mask = completion_token_logps(subclassed, batch, 3, share_prompts=True)
        usual, usual_mask = completion_token_logps(build("llama"), batch, 3, share_prompts=False)
    assert torch.equal(mask, usual_mask)
    torch.testing.assert_close(fallback[mask.bool()], usual[mask.bool()], atol=1e-5, rtol=0)


@pytest.mark.parametrize("max_length", [4, 9, 13])
def test_truncated_rows_score_what_the_usual_rows_score(max_length):
    """Truncation keeps each row's start: some pairs lose part of a response, some all of it, some the prompt's end."""
    tokenizer = load_tokenizer(tiny_model_dir())
    batch = collate_pairs(tokenize_pairs(PAIRS, tokenizer), tokenizer.pad_token_id, max_length)
    assert shared_prefix_batch(batch) is not None
    assert_parity("llama", batch, 3)


def test_under_bf16_autocast_the_loss_and_gradients_are_close():
    batch = batch_of("llama")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, _, loss, grads = step(make("llama"), batch, 7, share=True)
        _, _, usual_loss, usual_grads = step(make("llama"), batch, 7, share=False)
    torch.testing.assert_close(loss, usual_loss, atol=2e-2, rtol=2e-2)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, usual_grads[name], atol=5e-3, rtol=5e-2, msg=name)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_short_pairs_share_a_row_beside_each_other_and_score_as_alone(kind):
    """With one long pair in the batch the short ones are packed side by side: each must see only itself."""
    tokenizer = load_tokenizer(tiny_model_dir() if kind == "llama" else gpt2_dir())
    pairs = tokenize_pairs([*PAIRS, LONG], tokenizer)
    batch = collate_pairs(pairs, tokenizer.pad_token_id, 10_000)
    shared = shared_prefix_batch(batch)
    assert shared is not None and shared.input_ids.shape[0] < len(pairs)  # fewer rows than pairs: packed
    assert assert_parity(kind, batch, 0) > 7

"""The chunked log-prob path (workers/lm/training/chunked_logps.py) computes what the plain forward does.

Chunks are smaller than the batch's scored positions (several run, the last one short), the rows are
right-padded with completions starting at different positions, and parity covers per-token log-probs,
the DPO loss (+ NLL) and the gradient of every trainable parameter, in float32 on CPU. Models the path
cannot reproduce exactly must take the plain forward.
"""

import contextlib
from functools import cache
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from policies.lm.simplex_bottleneck import attach_bottleneck
from tests.workers.lm_helpers import PAIRS, process_temp_dir, tiny_model_dir
from workers.lm.models import build_tiny, load_causal_lm, load_tokenizer
from workers.lm.training.chunked_logps import body_and_head
from workers.lm.training.data import collate_pairs, tokenize_pairs
from workers.lm.training.dpo import completion_token_logps, dpo_batch_loss, reference_logps
from workers.lm.training.dpo_config import DPOConfig

KINDS = ["llama", "lora", "simplex", "gpt2"]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


@cache
def gpt2_dir() -> Path:
    return build_tiny(process_temp_dir("proxyloop-tiny-gpt2-") / "tiny", family="gpt2", seed=0)


def _perturb(params, seed: int, scale: float = 0.05) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn(p.shape, generator=generator))


def build(kind: str):
    """The same model every call (built afresh: a deep copy would share the bottleneck's hook closure)."""
    torch.manual_seed(0)  # LoRA's and the bottleneck's initialisation
    model = load_causal_lm(gpt2_dir() if kind == "gpt2" else tiny_model_dir())
    _perturb(model.parameters(), seed=1)  # away from the random init, so every gradient is non-trivial
    if kind == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS,
                                                 task_type="CAUSAL_LM"))
        _perturb([p for n, p in model.named_parameters() if "lora_B" in n], seed=2)  # B starts at 0
    if kind == "simplex":
        bottleneck = attach_bottleneck(model, 4)
        _perturb(bottleneck.parameters(), seed=3, scale=0.3)  # Θ̃ starts at 0: the bottleneck would do nothing
    return model


def batch_of(kind: str, pairs=PAIRS):
    tokenizer = load_tokenizer(gpt2_dir() if kind == "gpt2" else tiny_model_dir())
    return collate_pairs(tokenize_pairs(pairs, tokenizer), tokenizer.pad_token_id, 10_000)


def step(model, batch, chunk_tokens: int):
    """Per-token log-probs, loss and trainable gradients of one DPO step (sigmoid + NLL)."""
    config = DPOConfig(beta=0.1, nll_weight=0.5, logp_reduction="sum", max_length=10_000,
                       logps_chunk_tokens=chunk_tokens, share_prompts=False)
    per_token, mask = completion_token_logps(model, batch, chunk_tokens, share_prompts=False)
    reference = torch.linspace(-40.0, -10.0, batch["input_ids"].shape[0])
    loss, _ = dpo_batch_loss(model, batch, *reference.chunk(2), config)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return per_token.detach(), mask, loss.detach(), grads


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk_tokens", [1, 7, 1024])
def test_chunked_log_probs_loss_and_gradients_equal_the_plain_forward(kind, chunk_tokens):
    batch = batch_of(kind)
    chunked_model = build(kind)
    assert body_and_head(chunked_model) is not None  # else this would compare the plain path with itself
    per_token, mask, loss, grads = step(chunked_model, batch, chunk_tokens)
    plain_tokens, plain_mask, plain_loss, plain_grads = step(build(kind), batch, 0)

    assert torch.equal(mask, plain_mask)
    scored = mask.bool()
    assert int(scored.sum()) > 7  # several chunks of 7, the last one short
    torch.testing.assert_close(per_token[scored], plain_tokens[scored], atol=1e-5, rtol=0)
    assert torch.all(per_token[~scored] == 0)  # never scored: the head skipped them
    torch.testing.assert_close(loss, plain_loss, atol=1e-5, rtol=0)
    assert grads.keys() == plain_grads.keys() and grads
    for name, grad in grads.items():
        assert grad is not None and plain_grads[name] is not None, name
        torch.testing.assert_close(grad, plain_grads[name], atol=1e-5, rtol=0, msg=name)
    if kind == "simplex":  # the bottleneck took part: its Θ̃ got a gradient through the chunked head
        assert grads["simplex_bottleneck.theta.weight"].abs().sum() > 0


def test_each_scored_log_prob_is_the_next_tokens_under_a_forward_of_its_row_alone():
    """Independent of both paths' shared formula: a position off by one would score another token."""
    model, batch = build("llama").eval(), batch_of("llama")
    with torch.no_grad():
        per_token, mask = completion_token_logps(model, batch, 3, share_prompts=False)
        ids, width = batch["input_ids"], batch["input_ids"].shape[1]
        offset = width - mask.shape[1]  # per_token[:, j] scores ids[:, offset + j]
        for row in range(ids.shape[0]):
            length = int(batch["attention_mask"][row].sum())
            logps = F.log_softmax(model(input_ids=ids[row:row + 1, :length]).logits[0], dim=-1)
            for j in mask[row].nonzero().flatten().tolist():
                expected = logps[offset + j - 1, ids[row, offset + j]]
                torch.testing.assert_close(per_token[row, j], expected, atol=1e-5, rtol=0)


def test_reference_log_probs_equal_the_plain_forward():
    model, pairs = build("lora"), tokenize_pairs(PAIRS, load_tokenizer(tiny_model_dir()))
    found = []
    for chunk_tokens in (5, 0):
        config = DPOConfig(batch_size=3, max_length=10_000, logps_chunk_tokens=chunk_tokens, share_prompts=False)
        with model.disable_adapter():
            found.append(reference_logps(model, pairs, config, 0, torch.device("cpu"), contextlib.nullcontext()))
    for chunked, plain in zip(*found, strict=True):
        torch.testing.assert_close(chunked, plain, atol=1e-5, rtol=0)


def test_under_bf16_autocast_the_recomputed_chunks_match_and_the_loss_is_close():
    batch = batch_of("llama")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, _, loss, grads = step(build("llama"), batch, 7)
        _, _, plain_loss, plain_grads = step(build("llama"), batch, 0)
    torch.testing.assert_close(loss, plain_loss, atol=2e-2, rtol=2e-2)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], atol=5e-3, rtol=5e-2, msg=name)


def test_chunk_size_zero_runs_the_plain_forward():
    model, batch = build("llama"), batch_of("llama")
    with torch.no_grad():
        plain, mask = completion_token_logps(model, batch, 0, share_prompts=False)
    assert torch.all(plain[~mask.bool()] != 0)  # the plain forward scores unmasked positions too
    with pytest.raises(ValueError, match="logps_chunk_tokens must be >= 0"):
        DPOConfig(logps_chunk_tokens=-1)
    assert DPOConfig().logps_chunk_tokens > 0  # chunked by default


def _falls_back(model, batch) -> None:
    assert body_and_head(model) is None
    with torch.no_grad():
        per_token, mask = completion_token_logps(model, batch, 3, share_prompts=False)
    assert torch.all(per_token[~mask.bool()] != 0)  # the plain forward's values, not the chunked path's zeros


def test_models_the_chunked_path_cannot_reproduce_take_the_plain_forward():
    from peft import PromptTuningConfig, get_peft_model

    batch = batch_of("llama")
    hooked = build("llama")
    hooked.register_forward_hook(lambda _module, _args, output: output)  # a root hook the body call would skip
    _falls_back(hooked, batch)

    subclassed = build("llama")
    subclassed.__class__ = type("ScaledLlama", (type(subclassed),), {})  # a subclass may post-process logits
    _falls_back(subclassed, batch)

    prompt_tuned = get_peft_model(build("llama"), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    assert body_and_head(prompt_tuned) is None  # virtual tokens are prepended in PeftModel.forward


def test_ddp_and_fsdp_wrapped_models_take_the_plain_forward(tmp_path):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        batch = batch_of("llama")
        _falls_back(DistributedDataParallel(build("llama")), batch)
        sharded = build("llama")
        fully_shard(sharded)
        assert body_and_head(sharded) is None
    finally:
        dist.destroy_process_group()


def _saved_logit_shapes(model, batch, chunk_tokens: int) -> list[tuple[int, ...]]:
    """Shapes of the tensors autograd keeps for backward whose last dimension is the vocabulary."""
    vocab = model.get_output_embeddings().weight.shape[0]
    shapes: list[tuple[int, ...]] = []

    def pack(tensor):
        if tensor.dim() and tensor.shape[-1] == vocab:
            shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        completion_token_logps(model, batch, chunk_tokens, share_prompts=False)
    return shapes


def test_no_full_vocabulary_logits_are_kept_for_backward():
    batch = batch_of("llama")
    assert _saved_logit_shapes(build("llama"), batch, 0)  # the probe sees the plain forward's logits
    assert _saved_logit_shapes(build("llama"), batch, 7) == []  # checkpointed: recomputed in backward

"""Completion log-probs without keeping full-vocabulary logits: the LM head runs a chunk of positions at a time.

Why: scoring a DPO batch the usual way (`model(..., logits_to_keep=K).logits`, then gather −
logsumexp) materialises logits [2B, K, V], upcasts them to float32, and autograd keeps that float32
tensor until backward. With V = 49152 that is the largest tensor of a step, larger than the model's
activations. Here the decoder body runs once; then, for each chunk of at most `chunk_tokens` scored
positions, lm_head(h) → float32 → gather − logsumexp runs under `torch.utils.checkpoint`, which keeps
only the chunk's hidden states and recomputes its logits in backward. Peak memory holds one chunk's
logits instead of all of them, for one extra LM-head matmul per trained chunk (none in `no_grad`).
Only positions the completion mask scores reach the head (prompt and padding positions never
count), so the chunked path also skips their LM-head work; those positions hold 0.

When it applies (`body_and_head`): the model must compute exactly lm_head(body(ids).last_hidden_state)
and nothing else: the transformers classes in `PLAIN_HEAD_CLASSES` (checked in their source: no
logit scaling or soft-capping), optionally under a PEFT LoRA wrapper, with no forward hooks on the
wrappers being skipped. Hooks on the head itself run as usual, which is how the simplex bottleneck
(`policies.lm.simplex_bottleneck`, a pre-hook on the output embeddings acting position by position)
is included. DDP and FSDP wrappers do their work in the root module's forward (gradient reduction,
parameter gathering), which calling inner modules would bypass: those models, and any model not
recognised, take the unchunked path, so no model silently gets a different computation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from workers.lm.training.objectives import target_logps

# Scored positions per LM-head chunk (DPOConfig.logps_chunk_tokens). A chunk's backward holds about five
# [chunk, V] float32 tensors (logits, exp, the gather's and the sum's gradients): 256 rows over a 49152-token
# vocabulary make that ~0.25 GB, 1024 rows ~1 GB. The recomputation costs the same FLOPs at any size, and a
# [256, H] × [H, V] matmul still fills a GPU, so the smaller bound wins. On CPU (2 threads, vocab 49152,
# 16 rows × 256 scored positions) one step's peak RSS was 3956 MB unchunked, 1709 MB at 1024, 1342 MB at 256.
DEFAULT_CHUNK_TOKENS = 256
# Causal LMs whose forward, in transformers 5.x, is `lm_head(slice(self.<body>(...).last_hidden_state))` and
# nothing more. A class is added after reading its forward: any logit post-processing would make the
# chunked path compute something else.
PLAIN_HEAD_CLASSES = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                                "GPT2LMHeadModel"})


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _distributed(model: nn.Module) -> bool:
    """DDP, FSDP (1 or 2) anywhere in the model: their forward logic lives in modules we would skip."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    from torch.nn.parallel import DistributedDataParallel

    return any(isinstance(m, DistributedDataParallel | FullyShardedDataParallel | FSDPModule)
               for m in model.modules())


def body_and_head(model: Any) -> tuple[nn.Module, nn.Module] | None:
    """(decoder body, output embeddings) whose composition is `model`'s forward, or None when that is not certain."""
    if not isinstance(model, nn.Module) or _distributed(model):
        return None
    skipped: list[nn.Module] = [model]
    causal: Any = model
    if hasattr(causal, "peft_config") and hasattr(causal, "get_base_model"):  # peft.PeftModel
        config = causal.active_peft_config
        if (config.is_prompt_learning or getattr(config.peft_type, "value", config.peft_type) != "LORA"
                or getattr(config, "alora_invocation_tokens", None)):
            return None  # prompt tuning and aLoRA change the inputs in PeftModel.forward: not a body + head
        skipped.append(causal.base_model)  # LoraModel: its forward calls the wrapped model's
        causal = causal.get_base_model()
    if (type(causal).__name__ not in PLAIN_HEAD_CLASSES
            or not type(causal).__module__.startswith("transformers.models.")):
        return None  # exact classes only: a subclass (or a wrapper FSDP2 or torch.compile made) may differ
    skipped.append(causal)
    body, head = causal.get_decoder(), causal.get_output_embeddings()
    if any(_hooked(m) for m in skipped) or not isinstance(head, nn.Module) or body is causal:
        return None
    return body, head


def _chunk_logps(head: nn.Module, hidden: Tensor, targets: Tensor) -> Tensor:
    return target_logps(head(hidden), targets)


def head_logps(head: nn.Module, rows: Tensor, targets: Tensor, chunk_tokens: int) -> Tensor:
    """log p(`targets` [N]) from hidden `rows` [N, H], N > 0: the head over `chunk_tokens` rows at a time under
    checkpointing while gradients are on (the reference pass has nothing to recompute for); 0 = all rows at once."""
    step = chunk_tokens if chunk_tokens > 0 else rows.shape[0]
    pieces = []
    for start in range(0, rows.shape[0], step):
        h, t = rows[start:start + step], targets[start:start + step]
        if chunk_tokens > 0 and torch.is_grad_enabled():
            pieces.append(checkpoint(_chunk_logps, head, h, t, use_reentrant=False))
        else:
            pieces.append(_chunk_logps(head, h, t))
    return torch.cat(pieces)


def chunked_token_logps(body: nn.Module, head: nn.Module, ids: Tensor, attention_mask: Tensor, scored: Tensor,
                        chunk_tokens: int) -> Tensor:
    """Log-prob of each next token [R, T-1] at the positions `scored` [R, T-1] marks (position t scores id t+1);
    0 elsewhere. `ids`, `attention_mask` [R, T] may start after the sequences' real start (the caller keeps
    the last positions only), as long as `scored` marks none of the dropped ones."""
    width = scored.shape[1] + 1
    hidden = body(input_ids=ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    hidden = hidden[:, -width:-1]  # the kept positions but the last, each predicting the next id
    where = scored.bool()
    rows, targets = hidden[where], ids[:, ids.shape[1] - width + 1:][where]  # [N, H], [N]: a host sync for N
    if not rows.shape[0]:  # nothing scored: a zero that still hangs off the graph, so backward runs as elsewhere
        return hidden[..., 0].to(torch.promote_types(hidden.dtype, torch.float32)) * 0.0
    logps = head_logps(head, rows, targets, chunk_tokens)
    return torch.zeros(scored.shape, dtype=logps.dtype, device=logps.device).masked_scatter(where, logps)

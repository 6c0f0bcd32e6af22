"""Paper 2's over-optimisation indicators for a causal-LM checkpoint on a fixed held-out prompt set.

Two views: teacher-forced (the model's next-token distributions over reference completions, one
batched forward pass) and generated (greedy continuations, scored from the same forward pass over
prompt + continuation). Values are averaged over a sequence's positions, then over the prompt set
(with the standard deviation across sequences: `_spread`). Entropy is reported renormalised over the top-k
(the default the gate uses: it isolates the shape of the head of the distribution) and raw; mass
is always the raw top-k probability.

`biases` ([prompts, V], optional) is added to the model's logits for each prompt's sequence: how a mode
mixture (policies/lm/mode_mixture.py) is read here, as its base with one mode's vocabulary bias per prompt.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from policies.indicators import topk_indicators
from policies.lm.mode_mixture import BiasLogits

TOP_K = 10
_NAMES = ("entropy", "entropy_raw", "mass")


def _spread(values: Tensor) -> float:
    """Standard deviation of per-sequence values across sequences (n − 1 in the denominator), 0.0 over one sequence:
    one prompt has no spread to measure, and the n − 1 estimator would divide by zero (NaN, and torch warns). A
    defined number keeps every key of the indicators a float, as the evaluation record and its tables read them; no
    caller decides on it (the gate reads the means), and the record's `n_indicator_prompts` says how many it is over."""
    return float(values.std()) if values.numel() > 1 else 0.0


def _padded(tokenizer: Any, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    encoded = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    width = max(len(e) for e in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, tokens in enumerate(encoded):
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = 1
    return ids, mask


@torch.no_grad()
def completion_indicators(
    model: Any, tokenizer: Any, prompts: Sequence[str], completions: Sequence[str], k: int = TOP_K,
    biases: Tensor | None = None,
) -> dict[str, float]:
    """Indicators at the completion positions of prompt+completion, computed in one batch; with no prompt (no held-out
    pair fits the model's context: workers/lm/evaluate.py) every value is NaN, not measured."""
    if not prompts:
        return {f"{name}_{stat}": math.nan for name in _NAMES for stat in ("mean", "std")}
    prompt_lengths = [len(tokenizer(p, add_special_tokens=False).input_ids) for p in prompts]
    ids, mask = _padded(tokenizer, [p + c for p, c in zip(prompts, completions, strict=True)])
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()  # [B, T-1, V] predicts ids[:, 1:]
    if biases is not None:
        logits = logits + biases[:, None, :]
    positions = torch.arange(ids.shape[1] - 1).unsqueeze(0)
    scored = (positions >= torch.tensor(prompt_lengths).unsqueeze(1) - 1) & (mask[:, 1:] == 1)  # [B, T-1]
    entropy, mass = topk_indicators(logits, k=k, renormalise=True)
    raw_entropy, _ = topk_indicators(logits, k=k, renormalise=False)
    per_sequence = {name: (values * scored).sum(1) / scored.sum(1).clamp(min=1)
                    for name, values in zip(_NAMES, (entropy, raw_entropy, mass), strict=True)}
    return {key: value for name, values in per_sequence.items()
            for key, value in ((f"{name}_mean", float(values.mean())), (f"{name}_std", _spread(values)))}


@torch.no_grad()
def generated_indicators(
    model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = 16, k: int = TOP_K,
    biases: Tensor | None = None,
) -> dict[str, float]:
    """Greedy continuations of each prompt, then the indicators over the generated positions."""
    from transformers import LogitsProcessorList

    continuations = []
    for row, prompt in enumerate(prompts):
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
        processors = LogitsProcessorList([BiasLogits(biases[row])] if biases is not None else [])
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, logits_processor=processors,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        continuations.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=False) or " ")
    return completion_indicators(model, tokenizer, prompts, continuations, k, biases)


def checkpoint_indicators(
    model: Any, tokenizer: Any, prompts: Sequence[str], completions: Sequence[str], k: int = TOP_K,
    biases: Tensor | None = None,
) -> dict[str, float]:
    """Both views, keyed `teacher_forced/...` and `generated/...` as the metrics convention asks."""
    model.eval()
    forced = completion_indicators(model, tokenizer, prompts, completions, k, biases)
    generated = generated_indicators(model, tokenizer, prompts, k=k, biases=biases)
    return {**{f"teacher_forced/{key}": v for key, v in forced.items()},
            **{f"generated/{key}": v for key, v in generated.items()}}

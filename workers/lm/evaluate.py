"""Held-out evaluation of language-model checkpoints: implicit-reward pairwise accuracy and paper 2's indicators.

A DPO policy's implicit reward of a response is β·(log π(y|x) − log π_ref(y|x)); a held-out expert
pair is ranked correctly when the chosen response's reward exceeds the rejected one's (β > 0 does
not change the ranking). The baseline is the reference's own implicit reward, zero for every
response: every pair a tie, accuracy 0.5. The base model's ranking by its raw log-probs,
log π_ref(chosen) > log π_ref(rejected), is reported beside it: a different quantity (it rewards
whatever the base model finds likely, e.g. short answers), so the gate does not compare with it.

A mode-mixture checkpoint (policies/lm/mode_mixture.py) is scored by its own log π†(y|x) = logsumexp_k(log w_k +
log π_k), against the base it sits on (its reference in stage 1, and the one model every plan's policy can be
compared with), both from one pass of the base over the pairs (`encode_pairs`). Its indicators are those of
the base with the vocabulary bias of each prompt's most likely mode, argmax_k w_k(x): serving commits to one
mode per answer, so the distribution an answer is drawn from is one mode's, and w(x) near a vertex (what stage 1
learns) makes the most likely mode the one drawn; the per-token marginal would instead average the modes'
distributions, a distribution no served answer is drawn from.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ground.schemas import CheckpointEvaluation, CheckpointRef, Evaluation
from policies.condition_statistics import group_means, mean_over_groups
from policies.lm.indicators import checkpoint_indicators
from policies.lm.lora import is_lora_dir, load_lora_dir
from policies.lm.mixture_learners import pair_groups
from policies.lm.mode_mixture import (
    ModeMixture,
    is_mixture_dir,
    kept_prompt,
    load_mixture_dir,
    model_context,
    prompt_log_weights,
    sequence_cap,
)
from workers.lm import mode_mixture_training
from workers.lm.mode_mixture_training import encode_kept_pairs
from workers.lm.models import load_causal_lm, load_tokenizer, local_model_dir
from workers.lm.plans import saved_max_length
from workers.lm.training.data import TokenizedPair, load_jsonl, tokenize_pairs
from workers.lm.training.dpo import reference_logps
from workers.lm.training.dpo_config import DPOConfig

# Sequence log-probs are sums over response tokens, as DPO's sigmoid loss uses them (paper 2).
_SCORING = DPOConfig(batch_size=16, logp_reduction="sum")
# Held-out prompts the indicators are computed on (a fixed set: the first ones): bench/gate.py's count, so the
# advisory values the gate records are the ones that bench measured (docs/benchmarks.md, issue 16).
INDICATOR_PROMPTS = 64
# Tokens an indicator row leaves free after its prompt: the generated view's 16 new tokens
# (policies/lm/indicators.py), re-tokenised after decoding, with room to spare.
INDICATOR_ROOM = 32


def _right(margins: Tensor) -> np.ndarray:
    """Per pair, 1 for a positive margin, 0 for a negative one, a half for an exact tie."""
    result: np.ndarray = ((margins > 0).double() + 0.5 * (margins == 0).double()).numpy()
    return result


def _pairwise_accuracy(margins: Tensor, groups: np.ndarray | None = None) -> float:
    """Share of pairs with a positive margin; exact ties count half; each task once (`mean_over_groups`; without
    `groups`, every pair its own task). Counted exactly (the gate compares it with settings such as 0.7, which a
    float32 mean of 7 in 10 falls short of); NaN when any margin is NaN (NaN weights: no measurement, not an accuracy
    of 0)."""
    if bool(margins.isnan().any()):
        return float("nan")
    scores = _right(margins)
    return mean_over_groups(scores, np.arange(len(scores)) if groups is None else groups)


def _task_scores(margins: Tensor, groups: np.ndarray) -> list[float] | None:
    """Per held-out task, the share of its pairs ranked right (the gate's test against a coin); None with NaN."""
    return None if bool(margins.isnan().any()) else group_means(_right(margins), groups).tolist()


def pair_logps(model: Any, pairs: Sequence[TokenizedPair], pad: int) -> tuple[Tensor, Tensor]:
    """Summed log-probs [N] of each pair's chosen and rejected response under `model` (on the CPU), each sequence cut
    to the scoring's max_length or the model's context, if shorter (`sequence_cap`)."""
    scoring = replace(_SCORING, max_length=sequence_cap(model, _SCORING.max_length))
    return reference_logps(model, pairs, scoring, pad, torch.device("cpu"), nullcontext())


def indicator_rows(rows: Sequence[dict[str, Any]], tokenizer: Any, context: int | None,
                   n: int) -> list[dict[str, Any]]:
    """The first `n` held-out rows whose prompt + chosen response, and prompt + a generated continuation, fit in the
    model's `context` (None: every row fits). Why: the indicators (policies/lm/indicators.py) run prompt + completion
    whole, in one batch, with no cap of their own, so one held-out pair past the context (the 16k-token pair that
    cost `encode_pairs` 10 GB before its cap) would fail or exhaust memory there. Skipped, not cut: cutting would
    need the text back from tokens. An ordinary snapshot's rows all fit and get the first `n` as before. None fitting
    gives none: the evaluation then records no indicator prompt and the model's context, and the gate blocks on it
    (`too_little_heldout`); raising here failed the run before training, for readings that are only advisory."""
    if context is None:
        return list(rows[:n])
    chosen: list[dict[str, Any]] = []
    for row in rows:
        if len(chosen) == n:
            break
        prompt = len(tokenizer(row["prompt"], add_special_tokens=False)["input_ids"])
        whole = len(tokenizer(row["prompt"] + row["chosen"], add_special_tokens=False)["input_ids"])
        if whole <= context and prompt + INDICATOR_ROOM <= context:
            chosen.append(row)
    return chosen


def heldout_past_context(base_model: str, heldout_path: str) -> int | None:
    """`base_model`'s context in tokens when no held-out pair fits it (`indicator_rows`), else None. Read before
    training (the config and tokenizer only, not the weights), so that a run on a base with a small context (64
    positions) says at its start, not after training, that its gate will block the release."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(local_model_dir(base_model, needs="config.json")), local_files_only=True)
    rows = load_jsonl(heldout_path, ["prompt", "chosen", "rejected"])
    context = model_context(SimpleNamespace(config=config))
    return context if rows and not indicator_rows(rows, load_tokenizer(base_model), context, 1) else None


@dataclass
class MixtureBase:
    """The base a run's mixture checkpoints share (hard links of one model), with the held-out pairs encoded by it
    once: every checkpoint is then scored on those tensors."""

    model: Any
    head: Tensor
    encoded: mode_mixture_training.EncodedPairs
    kept: list[int]  # the held-out rows `encoded` holds: those a model can tell apart at the cut (`readable_pairs`)

    @classmethod
    def load(cls, path: str, tokenizer: Any, rows: list[dict[str, Any]], max_length: int) -> MixtureBase:
        model = load_causal_lm(path).eval()
        head = model.get_output_embeddings().weight.detach().float()
        return cls(model, head, *encode_kept_pairs(model, tokenizer, rows, max_length))

    def margins(self, ratio: Tensor, n_rows: int) -> Tensor:
        """Every held-out row's margin: the mixture's where it read the pair, 0 (a tie, counted half) where no model
        can tell its responses apart, as full-weight checkpoints score such a pair; the rows keep their tasks."""
        margins = torch.zeros(n_rows, dtype=ratio.dtype)
        margins[self.kept] = ratio[:, 0] - ratio[:, 1]
        return margins


@torch.no_grad()
def mixture_scores(mixture: ModeMixture, base: MixtureBase, tokenizer: Any, prompts: Sequence[str],
                   max_length: int) -> tuple[Tensor, Tensor]:
    """A mixture checkpoint's log π† of each pair minus the base's [N, 2], and the vocabulary bias of each indicator
    prompt's most likely mode [len(prompts), V] (its prompt cut at `max_length`, as training cut it)."""
    logps = mode_mixture_training.pair_logps(mixture, base.encoded, base.head)
    modes = [int(prompt_log_weights(mixture, base.model,
                                    kept_prompt(tokenizer(p, add_special_tokens=False)["input_ids"], max_length))
                 .argmax()) for p in prompts]
    return logps - base.encoded.base_logps, mixture.mode_biases(base.head)[modes]


def evaluate_lm_checkpoints(
    base_model: str, heldout_path: str, checkpoints: Sequence[CheckpointRef],
    n_indicator_prompts: int = INDICATOR_PROMPTS,
) -> Evaluation:
    """Evaluate checkpoints (full weights, LoRA or mode mixture) on the held-out pairs; returns what the gate
    stage reads. Where no held-out pair fits the base's context the indicators are NaN (no prompt to read them on)
    and `n_indicator_prompts` is 0, with `heldout_context`: the gate blocks on that."""
    tokenizer = load_tokenizer(base_model)
    rows = load_jsonl(heldout_path, ["prompt", "chosen", "rejected"])
    pairs = tokenize_pairs(rows, tokenizer)
    groups = pair_groups(rows)  # a task: a prompt with its two responses, whichever was chosen
    pad = int(tokenizer.pad_token_id)
    reference = load_causal_lm(base_model).eval()
    ref_chosen, ref_rejected = pair_logps(reference, pairs, pad)
    baseline = _pairwise_accuracy(torch.zeros(len(pairs)), groups)  # the reference's implicit reward margins
    context = model_context(reference)
    shown = indicator_rows(rows, tokenizer, context, n_indicator_prompts)
    prompts = [r["prompt"] for r in shown]
    completions = [r["chosen"] for r in shown]
    evaluations = []
    mixture_bases: dict[str, MixtureBase] = {}  # by the base a checkpoint's mixture sits on: encoded once
    missing = [ref.path for ref in checkpoints if not Path(ref.path).is_dir()]
    if missing:  # not "prepare a base model", which is what loading a missing directory would say
        raise FileNotFoundError(f"checkpoint folders {missing[:3]} are gone (deleted or moved after training); "
                                "retrain the run to evaluate it")
    for ref in checkpoints:
        biases: Tensor | None = None
        if is_mixture_dir(ref.path):
            mixture, spec = load_mixture_dir(ref.path)
            if spec["base_model"] not in mixture_bases:
                mixture_bases[spec["base_model"]] = MixtureBase.load(ref.path, tokenizer, rows,
                                                                     saved_max_length(spec["recipe"]))
            base = mixture_bases[spec["base_model"]]
            model = base.model
            ratio, biases = mixture_scores(mixture, base, tokenizer, prompts, saved_max_length(spec["recipe"]))
            margins = base.margins(ratio, len(rows))
        else:
            model = (load_lora_dir(ref.path) if is_lora_dir(ref.path) else load_causal_lm(ref.path)).eval()
            chosen, rejected = pair_logps(model, pairs, pad)
            margins = (chosen - ref_chosen) - (rejected - ref_rejected)  # implicit reward margins / β
        indicators = checkpoint_indicators(model, tokenizer, prompts, completions, biases=biases)
        indicators["rewards/margins_mean"] = float(margins.mean())
        evaluations.append(CheckpointEvaluation(
            step=ref.step, path=ref.path, heldout_accuracy=_pairwise_accuracy(margins, groups),
            task_scores=_task_scores(margins, groups),
            topk_entropy=indicators["teacher_forced/entropy_mean"], topk_mass=indicators["teacher_forced/mass_mean"],
            indicators=indicators,
        ))
    base_mass = checkpoint_indicators(reference, tokenizer, prompts, completions)["teacher_forced/mass_mean"] \
        if prompts else None  # nothing read: no reference, rather than an unusable NaN reading
    return Evaluation(evaluations=evaluations, baseline_accuracy=baseline, n_heldout=len(pairs), language_model=True,
                      n_heldout_inputs=int(groups.max(initial=-1)) + 1, base_topk_mass=base_mass,
                      base_model_log_prob_accuracy=_pairwise_accuracy(ref_chosen - ref_rejected, groups),
                      n_indicator_prompts=len(prompts), heldout_context=context)

"""Paper 1's condition tests on a chat snapshot: the stage-1 and base models read the pairs, the tests read
the arrays (policies.lm.conditions). The body of `proxyloop.text_conditions`.

A stage-1 checkpoint that holds a mode mixture (policies/lm/mode_mixture.py) is read through its base: the
pairs are encoded once by the base (`encode_pairs`) and the mixture's features come from those tensors
(`mixture_pair_features`); any other stage-1 model is read beside the base model (`pair_features`)."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import torch

from ground.schemas import ConditionReport, TextConditionRequest
from policies.lm.condition_config import TEXT_THRESHOLDS
from policies.lm.conditions import TextPairFeatures, run_text_condition_tests
from policies.lm.mode_mixture import is_mixture_dir, load_mixture_dir
from workers.device import select_device
from workers.lm.mixture_features import mixture_pair_features, trained_fine_tune_margins
from workers.lm.mode_mixture_training import encode_pairs
from workers.lm.models import load_causal_lm, load_tokenizer
from workers.lm.pair_features import pair_features
from workers.lm.plans import MixtureRecipe
from workers.lm.training.data import load_jsonl, tokenize_pairs

PAIR_FIELDS = ["prompt", "chosen", "rejected"]
PairReader = Callable[[list[dict[str, Any]]], TextPairFeatures]


def text_condition_report(request: TextConditionRequest) -> ConditionReport:
    device = select_device(None)
    tokenizer = load_tokenizer(request.stage1_checkpoint)
    proxy_rows = load_jsonl(request.proxy_pairs, PAIR_FIELDS)
    if len(proxy_rows) > request.max_proxy_pairs:
        proxy_rows = random.Random(request.seed).sample(proxy_rows, request.max_proxy_pairs)
    expert_rows = load_jsonl(request.expert_pairs, PAIR_FIELDS)
    if is_mixture_dir(request.stage1_checkpoint):
        return _mixture_report(request, tokenizer, device, expert_rows, proxy_rows)
    features = _model_features(request, tokenizer, device)
    return run_text_condition_tests(features(expert_rows), features(proxy_rows), request.snapshot_id,
                                    request.n_expert, request.n_proxy, seed=request.seed)


def _mixture_report(request: TextConditionRequest, tokenizer: Any, device: torch.device,
                    expert_rows: list[dict[str, Any]], proxy_rows: list[dict[str, Any]]) -> ConditionReport:
    """A mixture stage 1: its base (the checkpoint's own model files) encodes the rows once, and its fine_tune is
    trained on the tests' folds (`trained_fine_tune_margins`) with the run's recipe."""
    mixture, spec = load_mixture_dir(request.stage1_checkpoint)
    base = load_causal_lm(request.stage1_checkpoint, device)
    head = base.get_output_embeddings().weight.detach().float().cpu()
    recipe = MixtureRecipe(**{**spec["recipe"], "seed": request.seed})  # the run's recipe, as stage 1 saved it
    expert = encode_pairs(base, tokenizer, expert_rows, recipe.max_length)  # cut as stage 1's pairs were
    enough = len(expert) >= TEXT_THRESHOLDS.min_expert_pairs  # below it the tests do not weigh fine_tune
    trained = trained_fine_tune_margins(mixture, expert, head, recipe, request.seed) if enough else None
    return run_text_condition_tests(
        mixture_pair_features(mixture, expert, head, request.beta),
        mixture_pair_features(mixture, encode_pairs(base, tokenizer, proxy_rows, recipe.max_length), head,
                              request.beta),
        request.snapshot_id, request.n_expert, request.n_proxy, seed=request.seed, trained_margins=trained)


def _model_features(request: TextConditionRequest, tokenizer: Any, device: torch.device) -> PairReader:
    """Features of rows under a stage-1 model that is a causal LM of its own, read beside the base model."""
    stage1 = load_causal_lm(request.stage1_checkpoint, device)
    base = load_causal_lm(request.base_model, device)
    pad = int(tokenizer.pad_token_id)

    def features(rows: list[dict[str, Any]]) -> TextPairFeatures:
        return pair_features(stage1, base, tokenize_pairs(rows, tokenizer), pad, request.beta, device=device)

    return features

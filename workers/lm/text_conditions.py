"""Paper 1's condition tests on a chat snapshot: the stage-1 and base models read the pairs, the tests read
the arrays (policies.lm.conditions). The body of `proxyloop.text_conditions`."""

from __future__ import annotations

import random

from ground.schemas import ConditionReport, TextConditionRequest
from policies.lm.conditions import TextPairFeatures, run_text_condition_tests
from workers.device import select_device
from workers.lm.models import load_causal_lm, load_tokenizer
from workers.lm.pair_features import pair_features
from workers.lm.training.data import load_jsonl, tokenize_pairs

PAIR_FIELDS = ["prompt", "chosen", "rejected"]


def text_condition_report(request: TextConditionRequest) -> ConditionReport:
    device = select_device(None)
    tokenizer = load_tokenizer(request.stage1_checkpoint)
    stage1 = load_causal_lm(request.stage1_checkpoint, device)
    base = load_causal_lm(request.base_model, device)
    proxy_rows = load_jsonl(request.proxy_pairs, PAIR_FIELDS)
    if len(proxy_rows) > request.max_proxy_pairs:
        proxy_rows = random.Random(request.seed).sample(proxy_rows, request.max_proxy_pairs)
    pad = int(tokenizer.pad_token_id)

    def features(rows: list[dict[str, str]]) -> TextPairFeatures:
        return pair_features(stage1, base, tokenize_pairs(rows, tokenizer), pad, request.beta, device=device)

    expert = features(load_jsonl(request.expert_pairs, PAIR_FIELDS))
    return run_text_condition_tests(expert, features(proxy_rows), request.snapshot_id, request.n_expert,
                                    request.n_proxy, seed=request.seed)

"""Checkpoint evaluation: held-out expert accuracy and the output distribution's indicators.

The baseline is an expert-only learner on the same expert training split: a release must not
be worse than simply ignoring the proxy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ground.schemas import CheckpointEvaluation, CheckpointRef, FeatureTriple
from policies.condition_statistics import group_means, input_groups
from policies.features.fit_recipe import EXPERT_ONLY
from policies.features.fitting import fit_preferences
from policies.features.model import DirectPolicy, pairwise_accuracy, ranked_right, triples_to_tensors
from policies.features.simplex_adapter import answered_mask
from policies.indicators import DEFAULT_TOP_K, topk_indicators
from policies.loader import load_policy_dir
from policies.plan_choice import CHANCE_ACCURACY


def heldout_inputs(heldout: Sequence[FeatureTriple]) -> int:
    """How many distinct inputs the held-out triples have: copies of one task (several annotators) count once. As
    float32, as the accuracies group them: inputs equal there are one task in both counts."""
    return int(input_groups(triples_to_tensors(heldout)[0].numpy()).max(initial=-1)) + 1 if heldout else 0


def heldout_accuracy(model: Any, heldout: Sequence[FeatureTriple]) -> float:
    """Held-out accuracy with each distinct input counted once (`pairwise_accuracy` over `input_groups`)."""
    x, y_w, y_l = triples_to_tensors(heldout)
    return pairwise_accuracy(model, x, y_w, y_l, groups=input_groups(x.numpy()))


def task_scores(model: Any, heldout: Sequence[FeatureTriple]) -> list[float] | None:
    """Per distinct held-out input, the share of its triples ranked right, ties half (the gate's test against a coin,
    `policies.gate_chance`, whose label flip leaves a tie a tie: two outputs no training triple used tie at
    UNUSED_LOGIT); None when a margin is NaN (no ranking to test)."""
    x, y_w, y_l = triples_to_tensors(heldout)
    right = ranked_right(model, x, y_w, y_l, tie=0.5)
    return None if np.isnan(right).any() else group_means(right, input_groups(x.numpy())).tolist()


@torch.no_grad()
def evaluate_checkpoint(ref: CheckpointRef, heldout: Sequence[FeatureTriple]) -> CheckpointEvaluation:
    model: Any = load_policy_dir(ref.path)
    x, _, _ = triples_to_tensors(heldout)
    logits = model.logits(x)  # type: ignore[operator]
    entropy, mass = topk_indicators(logits)
    answerable = int(answered_mask(logits).any(dim=0).sum())  # ids no training triple used are never answers
    return CheckpointEvaluation(
        step=ref.step, path=ref.path, heldout_accuracy=heldout_accuracy(model, heldout),
        task_scores=task_scores(model, heldout), topk_entropy=float(entropy.mean()),
        # With no more outputs than k the top-k holds every output: its mass is 1 by construction, not a reading.
        topk_mass=float(mass.mean()) if answerable > DEFAULT_TOP_K else None,
    )


def expert_only_baseline(
    expert_train: Sequence[FeatureTriple], heldout: Sequence[FeatureTriple], n_outputs: int, seed: int
) -> float:
    """Held-out accuracy of the expert-only learner, fitted with the recipe the condition tests use; with no expert
    triple to learn from it is a coin's."""
    if not expert_train:
        return CHANCE_ACCURACY
    torch.manual_seed(seed)
    model = DirectPolicy(input_dim=len(expert_train[0].x), n_outputs=n_outputs)
    x, y_w, y_l = triples_to_tensors(expert_train)
    fit_preferences(model, list(model.parameters()), x, y_w, y_l, steps=EXPERT_ONLY.steps, lr=EXPERT_ONLY.lr,
                    seed=seed, weight_decay=EXPERT_ONLY.weight_decay)
    return heldout_accuracy(model, heldout)

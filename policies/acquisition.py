"""Expert-label acquisition: which open task an expert should label next (issue 17).

Under paper 1's conditions only the small adapter π̄† is learned from experts, so an expert label is
worth most where the adapters the expert labels so far still allow disagree about the answer.
Every score here is about one open task, a pair (x, y_a, y_b) or (prompt, response_a, response_b)
without its label, through p = P(a preferred over b) = σ(margin), margin = log π(a) − log π(b).

- `ensemble` (feature triples, enough expert labels): BALD, the mutual information between the
  expert's answer and the ensemble member, over adapters refitted on bootstrap resamples of the
  expert triples: H(mean p_k) − mean H(p_k). It is high where the members disagree, and low where
  they agree, however close to ½ they agree (a coin-flip pair teaches nothing about the adapter).
- `relabellings` (feature triples, too few labels for a bootstrap): BALD over the adapters stage 2
  chooses its centre among (`simplex_adapter.relabelled_centres`: the proxy itself and each
  relabelling of its outputs) plus the current policy: the proxy–adapter disagreement, over every
  adapter the first labels can still pick. Pairs where the proxy is confident and a relabelling
  would answer otherwise are the ones that settle the centre; coin-flip pairs settle nothing.
- `relabelling_posterior` (text pairs, a mode-mixture stage 1): stage 2 is a relabelling of the D modes,
  so the adapters the labels still allow are the relabellings of high posterior (the labels' likelihood,
  the one stage 2 maximises); greedy BatchBALD over draws from it (`relabelling_scores`; Label Studio's chat
  tasks: `mixture_scores`, pre-annotated by stage 2's refit on the labels so far). With no label the
  draws come from stage 2's keep prior, and the score picks the pairs the modes disagree on most confidently; once a
  prompt's modes are pinned down, its pairs drop, and a batch spreads over the modes still free.
- `proxy_disagreement` (text pairs, cheap fallback: one policy and its proxy): H(mean(p_proxy,
  p_policy)), high where the proxy and the current policy disagree or the policy is unsure.
- `margin` (cheapest: one policy only): H(p_policy), the policy's margin uncertainty, largest at
  p = ½ (equivalently, smallest |σ(margin) − ½|).

This module holds what every family shares (the information measures, `rank`, `text_scores`); the feature
family's scores are in policies/features/acquisition.py, the mode mixture's in policies/lm/acquisition.py. The
text family gets margins, or a mixture's terms, from the caller (models run in workers, none here).
Scores are in nats, in [0, log 2]; `rank` orders tasks by them, ties broken by task id.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

FloatArray = NDArray[np.float64]
Method = Literal["ensemble", "relabellings", "relabelling_posterior", "proxy_disagreement", "margin"]
MAX_SCORE = math.log(2.0)  # the largest score any method gives (nats)


class AcquisitionError(ValueError):
    """Input an acquisition score cannot be computed from; the message says what was wrong."""


@dataclass(frozen=True)
class AcquisitionScores:
    """Scores of the open tasks, in the order given, and what the current policy prefers on each."""

    scores: FloatArray  # [N] nats, higher = ask an expert sooner
    prob_a: FloatArray  # [N] the current policy's P(a preferred over b): the pre-annotation
    method: Method
    n_labels: int  # expert labels the scores were computed from

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def preferred(self) -> list[Literal["a", "b"]]:
        """The current policy's choice per task (a on an exact tie)."""
        return ["a" if p >= 0.5 else "b" for p in self.prob_a]


def _vector(name: str, values: ArrayLike, n: int | None = None) -> FloatArray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise AcquisitionError(f"{name} must be one-dimensional (one value per open task), got shape {array.shape}")
    if n is not None and array.shape[0] != n:
        raise AcquisitionError(f"{name} has {array.shape[0]} values for {n} open tasks")
    if not np.isfinite(array).all():
        bad = np.flatnonzero(~np.isfinite(array))[:5].tolist()
        raise AcquisitionError(f"{name} has NaN or infinite values at positions {bad}")
    return array


def preference_probs(margins: ArrayLike) -> FloatArray:
    """σ(margin), elementwise, stable for large |margin|."""
    m = np.asarray(margins, dtype=np.float64)
    result: FloatArray = np.exp(-np.logaddexp(0.0, -m))
    return result


def binary_entropy(p: ArrayLike) -> FloatArray:
    """H(p) in nats, 0 at p ∈ {0, 1}, log 2 at p = ½."""
    q = np.clip(np.asarray(p, dtype=np.float64), 1e-12, 1 - 1e-12)
    result: FloatArray = -(q * np.log(q) + (1 - q) * np.log1p(-q))
    return result


def mixture_entropy(probs: ArrayLike) -> FloatArray:
    """H(mean_k p_k) over axis 0 of [K, N]: total uncertainty of the members' mixture."""
    p = np.asarray(probs, dtype=np.float64)
    return binary_entropy(p.mean(axis=0))


def bald(probs: ArrayLike) -> FloatArray:
    """H(mean_k p_k) − mean_k H(p_k) over axis 0 of [K, N]: the members' disagreement (≥ 0)."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] < 2:
        raise AcquisitionError(f"bald needs probabilities of shape [members >= 2, tasks], got {p.shape}")
    result: FloatArray = np.maximum(mixture_entropy(p) - binary_entropy(p).mean(axis=0), 0.0)
    return result


def batch_bald(probs: ArrayLike, batch: int) -> FloatArray:
    """Greedy BatchBALD (Kirsch et al., 2019) over members' P(a) [K, N]: the mutual information between the
    member and a whole batch's answers, grown one task at a time. A task scores its gain when it joined the
    batch (the first: plain BALD); the rest score their gain given the whole batch, below every task in it
    (the information is submodular), so `rank` lists the batch first. Unlike top-`batch` BALD, a batch does not
    repeat one question: a task whose answer the batch already predicts (the same open mode) gains little."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] < 2 or not 1 <= batch <= 10:
        raise AcquisitionError(f"batch_bald needs [members >= 2, tasks] and 1 <= batch <= 10, got {p.shape}, {batch}")
    own = binary_entropy(p).mean(axis=0)  # E_m H(y_i | m)

    def gains(joint: FloatArray) -> FloatArray:  # joint [K, patterns]: P(the batch's answers | member)
        with_task = np.vstack([joint.T @ p, joint.T @ (1 - p)]) / p.shape[0]  # [2 × patterns, N]
        batch_entropy = -(joint.mean(axis=0) * np.log(np.clip(joint.mean(axis=0), 1e-300, None))).sum()
        result: FloatArray = -(with_task * np.log(np.clip(with_task, 1e-300, None))).sum(axis=0) - batch_entropy - own
        return result

    joint: FloatArray = np.ones((p.shape[0], 1))
    scores, taken = np.zeros(p.shape[1]), np.zeros(p.shape[1], dtype=bool)
    for _ in range(min(batch, p.shape[1])):
        gain = gains(joint)
        best = int(np.argmax(np.where(taken, -np.inf, gain)))
        scores[best], taken[best] = max(float(gain[best]), 0.0), True
        joint = np.hstack([joint * p[:, best, None], joint * (1 - p[:, best, None])])
    scores[~taken] = np.maximum(gains(joint)[~taken], 0.0)
    return scores


def rank(scores: ArrayLike, task_ids: Sequence[int | str] | None = None) -> list[int | str]:
    """Task ids from the highest score down; equal scores in ascending id order, so the order is
    reproducible. Without ids, positions 0..N−1 stand for them."""
    s = _vector("scores", scores)
    ids: list[int | str] = list(range(s.shape[0])) if task_ids is None else list(task_ids)
    if len(ids) != s.shape[0]:
        raise AcquisitionError(f"{len(ids)} task ids for {s.shape[0]} scores")
    if len(set(ids)) != len(ids):
        raise AcquisitionError("task ids must be unique")
    # Round so float noise between equal scores does not decide the order; then id breaks ties.
    keyed = sorted(zip(np.round(s, 12).tolist(), ids, strict=True), key=lambda pair: pair[1])
    return [task for _, task in sorted(keyed, key=lambda pair: -pair[0])]


def text_scores(
    policy_margin: ArrayLike,
    proxy_margin: ArrayLike | None = None,
    ensemble_margins: ArrayLike | None = None,
    n_labels: int = 0,
) -> AcquisitionScores:
    """Scores for text pairs from margins a worker computed: log π(a) − log π(b) of the current
    policy [N], of the proxy [N] (optional), of ensemble members [K, N] (optional, K >= 2).

    With members: BALD over them. Else with the proxy: proxy–policy disagreement. Else: margin
    uncertainty of the policy alone."""
    policy = _vector("policy_margin", policy_margin)
    n = policy.shape[0]
    prob_a = preference_probs(policy)
    if ensemble_margins is not None:
        members = np.asarray(ensemble_margins, dtype=np.float64)
        if members.ndim != 2 or members.shape[1] != n or members.shape[0] < 2:
            raise AcquisitionError(f"ensemble_margins must have shape [members >= 2, {n}], got {members.shape}")
        if not np.isfinite(members).all():
            raise AcquisitionError("ensemble_margins has NaN or infinite values")
        return AcquisitionScores(bald(preference_probs(members)), prob_a, "ensemble", n_labels)
    if proxy_margin is not None:
        proxy = preference_probs(_vector("proxy_margin", proxy_margin, n))
        return AcquisitionScores(mixture_entropy(np.stack([proxy, prob_a])), prob_a, "proxy_disagreement", n_labels)
    return AcquisitionScores(binary_entropy(prob_a), prob_a, "margin", n_labels)

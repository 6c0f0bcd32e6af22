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
  tasks: `mixture_scores`, pre-annotated by stage 2's refit on the labels so far). With no label every
  relabelling is open, and the score picks the pairs the modes disagree on most confidently; once a
  prompt's modes are pinned down, its pairs drop, and a batch spreads over the modes still free.
- `proxy_disagreement` (text pairs, cheap fallback: one policy and its proxy): H(mean(p_proxy,
  p_policy)), high where the proxy and the current policy disagree or the policy is unsure.
- `margin` (cheapest: one policy only): H(p_policy), the policy's margin uncertainty, largest at
  p = ½ (equivalently, smallest |σ(margin) − ½|).

The text family gets margins, or a mixture's terms, from the caller (models run in workers, none here).
Scores are in nats, in [0, log 2]; `rank` orders tasks by them, ties broken by task id.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray

from ground.schemas import FeatureTriple
from policies.features.fit_recipe import ADAPTER_STAGE, FitRecipe
from policies.features.fitting import fit_adapter
from policies.features.model import TwoStagePolicy, triples_to_tensors
from policies.features.simplex_adapter import relabelled_centres
from policies.lm.mixture_learners import (
    MixtureTerms,
    best_relabelling,
    fit_relabelling,
    keep_bonus,
    relabelled_margin,
    relabelling_score,
)

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


@dataclass(frozen=True)
class RelabellingConfig:
    """How `relabelling_scores` samples relabellings from their posterior (defaults: bench/acquisition.py's tuning)."""

    members: int = 128  # relabellings drawn; their disagreement (BatchBALD) is the score
    batch: int = 5  # labels expected before the next refresh: the top `batch` tasks are a BatchBALD batch
    temperature: float = 3.0  # λ in P(perm | labels) ∝ exp(λ · log-likelihood): > 1, the expert is surer than the modes
    seed: int = 0

    def __post_init__(self) -> None:
        if self.members < 2 or self.temperature <= 0 or not 1 <= self.batch <= 10:
            raise AcquisitionError(f"need members >= 2, temperature > 0, 1 <= batch <= 10, got {self!r}")


def relabelling_samples(labelled: MixtureTerms, config: RelabellingConfig = RelabellingConfig()) -> NDArray[np.int64]:
    """[members, D] relabellings drawn from their posterior given the expert pairs `labelled` (chosen first). The
    log-likelihood of perm is fit_relabelling's, Σ_k score[k, perm[k]] (score[k, j] = Σ_i w_k(x_i) log σ(mode j's
    margin)), and its prior fit_relabelling's keep prior (`keep_bonus`), so the posterior's mode is stage 2's fit.
    Perturb-and-MAP draws: `best_relabelling` of λ·score + keep bonus plus Gumbel noise per entry (no enumeration
    of D! relabellings). Without labels: draws from the keep prior alone (most modes kept, a few moved)."""
    score = relabelling_score(labelled)
    prior = keep_bonus(score.shape[0])
    rng = np.random.default_rng(config.seed)
    draws = [best_relabelling(config.temperature * score + prior + rng.gumbel(size=score.shape))
             for _ in range(config.members)]
    return np.stack(draws).astype(np.int64)


def relabelling_scores(
    labelled: MixtureTerms, open_pairs: MixtureTerms, perm: ArrayLike, config: RelabellingConfig = RelabellingConfig()
) -> AcquisitionScores:
    """Scores for open text pairs (a as chosen) under a mode-mixture stage 1, whose stage 2 is a relabelling
    `perm` of its D modes (policies/lm/mixture_learners.py): greedy BatchBALD (`batch_bald`) over relabellings drawn
    from their posterior given the expert pairs so far (`relabelling_samples`), each pair's margins those of the
    mixture relabelled (`relabelled_margin`). A pair scores high where relabellings the labels still allow send
    its prompt's modes to modes that answer it differently, confidently: before any label, the pairs the modes
    disagree on most; later, pairs whose prompt's modes no label has pinned down. `prob_a`: the mixture at `perm`."""
    if labelled.log_weights.shape[1] != open_pairs.log_weights.shape[1]:
        raise AcquisitionError("labelled and open pairs come from mixtures with different numbers of modes")
    members = relabelling_samples(labelled, config)
    margins = np.stack([relabelled_margin(open_pairs, m) for m in members])
    prob_a = preference_probs(relabelled_margin(open_pairs, np.asarray(perm, dtype=int)))
    n_labels = len(labelled.base_chosen)
    return AcquisitionScores(
        batch_bald(preference_probs(margins), config.batch), prob_a, "relabelling_posterior", n_labels
    )


def mixture_scores(
    labelled: MixtureTerms, open_pairs: MixtureTerms, config: RelabellingConfig = RelabellingConfig()
) -> AcquisitionScores:
    """The chat family's scores (flows/acquisition_chat.py): `relabelling_scores` at the relabelling stage 2 fits on
    the expert pairs so far (`fit_relabelling`; with none, the identity: stage 1 as is). `prob_a`, the pre-annotation,
    is that relabelled mixture's P(a over b): what a two_stage refit on these labels would answer."""
    dim = open_pairs.log_weights.shape[1]
    perm = fit_relabelling(labelled) if len(labelled.base_chosen) else np.arange(dim)
    return relabelling_scores(labelled, open_pairs, perm, config)


# Feature triples: the stage-2 model and its bootstrap ensemble.


@dataclass(frozen=True)
class EnsembleConfig:
    """How `feature_scores` builds its bootstrap ensemble of adapters."""

    size: int = 5  # adapters, each fitted on a bootstrap resample of the expert triples
    min_labels: int = 5  # with fewer expert triples: disagreement over the proxy's relabellings instead
    seed: int = 0
    # Stage 2's recipe with its fixed prior: cross-validating the prior per member would cost 30
    # fits each, and the members only need to span what the labels leave open.
    recipe: FitRecipe = ADAPTER_STAGE

    def __post_init__(self) -> None:
        if self.size < 2:
            raise AcquisitionError(f"EnsembleConfig.size must be >= 2 (disagreement needs 2 members), got {self.size}")
        if self.min_labels < 2:
            raise AcquisitionError(f"EnsembleConfig.min_labels must be >= 2, got {self.min_labels}")


def _pairs(x: ArrayLike, y_a: ArrayLike, y_b: ArrayLike, config: TwoStagePolicy) -> tuple[torch.Tensor, ...]:
    xs = np.asarray(x, dtype=np.float64)
    dim, n_outputs = config.config.input_dim, config.config.n_outputs
    if xs.ndim != 2 or xs.shape[1] != dim:
        raise AcquisitionError(f"x must have shape [tasks, {dim}] for this policy, got {xs.shape}")
    if not np.isfinite(xs).all():
        raise AcquisitionError("x has NaN or infinite values")
    ya, yb = np.asarray(y_a), np.asarray(y_b)
    for name, y in (("y_a", ya), ("y_b", yb)):
        if y.shape != (xs.shape[0],) or not np.issubdtype(y.dtype, np.integer):
            raise AcquisitionError(f"{name} must be {xs.shape[0]} integer output ids, got {y.dtype} of shape {y.shape}")
        if y.size and (y.min() < 0 or y.max() >= n_outputs):
            raise AcquisitionError(f"{name} has output ids outside 0..{n_outputs - 1}")
    if (ya == yb).any():
        same = np.flatnonzero(ya == yb)[:5].tolist()
        raise AcquisitionError(f"y_a equals y_b at positions {same}: nothing to compare")
    return (
        torch.tensor(xs, dtype=torch.float32),
        torch.tensor(ya, dtype=torch.long),
        torch.tensor(yb, dtype=torch.long),
    )


def _margins(stack: TwoStagePolicy, log_s: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor) -> FloatArray:
    with torch.no_grad():
        log_p = torch.log_softmax(stack.head(stack.adapter(log_s)), dim=-1)
        margin = log_p.gather(1, y_a.view(-1, 1)) - log_p.gather(1, y_b.view(-1, 1))
    result: FloatArray = margin.squeeze(1).double().cpu().numpy()
    return result


def relabelling_probs(stack: TwoStagePolicy, log_s: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor) -> FloatArray:
    """P(a over b) [K, N] under each centre stage 2 can start from (the proxy first, then every
    relabelling of the frozen head's outputs), as `fitting.choose_centre` scores them."""
    gain, offset = stack.head_affine()
    rows = []
    with torch.no_grad():
        for weight, bias in relabelled_centres(gain, offset):
            log_p = torch.log_softmax((log_s @ weight.T + bias) @ gain.T + offset, dim=-1)
            margin = (log_p.gather(1, y_a.view(-1, 1)) - log_p.gather(1, y_b.view(-1, 1))).squeeze(1)
            rows.append(preference_probs(margin.double().cpu().numpy()))
    return np.stack(rows)


def adapter_ensemble(
    stack: TwoStagePolicy,
    expert: Sequence[FeatureTriple],
    config: EnsembleConfig = EnsembleConfig(),
) -> list[TwoStagePolicy]:
    """`config.size` copies of the stack, each adapter refitted (stage 2) on a bootstrap resample of
    the expert triples; the stack itself is left as it was."""
    if len(expert) < 2:
        raise AcquisitionError(f"a bootstrap ensemble needs at least 2 expert triples, got {len(expert)}")
    x, y_w, y_l = triples_to_tensors(expert)
    rng = np.random.default_rng(config.seed)
    members = []
    for k in range(config.size):
        rows = torch.as_tensor(rng.integers(0, len(expert), size=len(expert)))
        member = copy.deepcopy(stack)
        fit_adapter(member, x[rows], y_w[rows], y_l[rows], config.seed + k, config.recipe)
        members.append(member.eval())
    return members


def feature_scores(
    stack: TwoStagePolicy,
    expert: Sequence[FeatureTriple],
    x: ArrayLike,
    y_a: ArrayLike,
    y_b: ArrayLike,
    config: EnsembleConfig = EnsembleConfig(),
) -> AcquisitionScores:
    """Scores for open feature tasks (x [N, d], output ids y_a, y_b [N]) under the current two-stage
    policy `stack` and the expert triples labelled so far.

    With at least `config.min_labels` expert triples: BALD over a bootstrap ensemble of adapters
    (`adapter_ensemble`). With fewer: BALD over the proxy, its relabellings and the current policy
    (`relabelling_probs`), the proxy–adapter disagreement no label can yet rule out. `prob_a` is
    always the stack's own preference, as served."""
    if not isinstance(stack, TwoStagePolicy):
        raise AcquisitionError(f"feature_scores needs a TwoStagePolicy, got {type(stack).__name__}")
    xs, ya, yb = _pairs(x, y_a, y_b, stack)
    n_labels = len(expert)
    if xs.shape[0] == 0:
        empty = np.zeros(0)
        return AcquisitionScores(
            empty, empty, "ensemble" if n_labels >= config.min_labels else "relabellings", n_labels
        )
    stack.eval()
    with torch.no_grad():
        log_s = stack.log_embed(xs)  # τ̃ is shared by every member: embed once
    prob_a = preference_probs(_margins(stack, log_s, ya, yb))
    if n_labels < config.min_labels:
        probs = np.vstack([relabelling_probs(stack, log_s, ya, yb), prob_a[None, :]])
        return AcquisitionScores(bald(probs), prob_a, "relabellings", n_labels)
    members = adapter_ensemble(stack, expert, config)
    probs = np.stack([preference_probs(_margins(m, log_s, ya, yb)) for m in members])
    return AcquisitionScores(bald(probs), prob_a, "ensemble", n_labels)

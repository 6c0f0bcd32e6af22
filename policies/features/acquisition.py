"""Acquisition scores for feature triples (`ensemble` and `relabellings`, policies/acquisition.py): the stage-2
model, its bootstrap ensemble of adapters, and before enough labels the centres stage 2 can still start from."""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import ArrayLike

from ground.schemas import FeatureTriple
from policies.acquisition import AcquisitionError, AcquisitionScores, FloatArray, bald, preference_probs
from policies.features.fit_recipe import FitRecipe
from policies.features.fitting import fit_adapter
from policies.features.model import TwoStagePolicy, triples_to_tensors
from policies.features.recipe import TWO_STAGE, TwoStageRecipe, cross_validated_adapter_stage
from policies.features.simplex_adapter import answered_mask, relabelled_centres

log = logging.getLogger("proxyloop.policies.features")


@dataclass(frozen=True)
class EnsembleConfig:
    """How `feature_scores` builds its bootstrap ensemble of adapters."""

    size: int = 5  # adapters, each fitted on a bootstrap resample of the expert triples
    min_labels: int = 5  # with fewer expert triples: disagreement over the proxy's relabellings instead
    seed: int = 0
    recipe: TwoStageRecipe = TWO_STAGE  # the members' stage 2: its adapter stage, and the grid its prior is picked from
    # Members fitted at the prior the worker's stage 2 picks on all the labels (`cross_validated_adapter_stage`, once,
    # not per member), so they spread as much as the policy the expert gets can still move; False: the adapter
    # stage's fixed prior. bench/acquisition.py, tuning seeds 0-5: labels_ratio 1.36 at the fixed prior, 2.87 at the
    # chosen one.
    cv_prior: bool = True

    def __post_init__(self) -> None:
        if self.size < 2:
            raise AcquisitionError(f"EnsembleConfig.size must be >= 2 (disagreement needs 2 members), got {self.size}")
        if self.min_labels < 2:
            raise AcquisitionError(f"EnsembleConfig.min_labels must be >= 2, got {self.min_labels}")

    def adapter_stage(self, stack: TwoStagePolicy, x: torch.Tensor, y_w: torch.Tensor, y_l: torch.Tensor) -> FitRecipe:
        """The stage-2 fit on these expert triples: at the prior the worker's refit (`fit_two_stage_adapter` at seed
        0) cross-validates, or without `cv_prior` at the adapter stage's fixed prior; the stack is left as it was."""
        if not self.cv_prior:
            return self.recipe.adapter_stage
        return cross_validated_adapter_stage(stack, x, y_w, y_l, 0, self.recipe)


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


def usable_triples(stack: TwoStagePolicy, expert: Sequence[FeatureTriple]) -> list[FeatureTriple]:
    """The expert triples this release can be scored against: x of its input dimension, y_w and y_l among its outputs.

    The rest are dropped with one warning that says how many and why, not refused: a label for an output a newer
    policy will have (or from a feature set of another dimension) is legitimate training data that just does not fit
    this release's input or head, and one such label must not stop every open task's score. Both
    paths of `feature_scores` count only these, so the method (ensemble or relabellings) and `n_labels` follow the
    labels the scores were computed from."""
    dim = stack.config.input_dim
    answered = set(answered_outputs(stack))
    wrong_dim = [t for t in expert if len(t.x) != dim]
    unknown = [t for t in expert if len(t.x) == dim and not {t.y_w, t.y_l} <= answered]
    reasons = []
    if wrong_dim:
        reasons.append(f"{len(wrong_dim)} with x of dimension {sorted({len(t.x) for t in wrong_dim})} (the policy "
                       f"reads {dim})")
    if unknown:
        reasons.append(f"{len(unknown)} naming an output the policy does not answer (it answers "
                       f"{sorted(answered)[:12]}; kept for a newer release's training)")
    if reasons:
        log.warning("%d of %d expert triples not used to score against this policy: %s",
                    len(wrong_dim) + len(unknown), len(expert), "; ".join(reasons))
    return [t for t in expert if len(t.x) == dim and {t.y_w, t.y_l} <= answered]


def answered_outputs(stack: TwoStagePolicy) -> list[int]:
    """The output ids the policy answers: all of 0..n_outputs-1 but those its training never saw (a policy saved over
    ids by name, `outputs.widened`, gives them probability 0). A triple naming one would enter the adapter's refit with
    a loss near 1e4 nats."""
    _, offset = stack.head_affine()
    return [int(y) for y in torch.nonzero(answered_mask(offset)).flatten()]


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
    the expert triples, at the cross-validated prior (`EnsembleConfig.cv_prior`); the stack is left as it was.
    Triples the stack cannot read are dropped first (`usable_triples`)."""
    expert = usable_triples(stack, expert)
    if len(expert) < 2:
        raise AcquisitionError(f"a bootstrap ensemble needs at least 2 expert triples, got {len(expert)}")
    x, y_w, y_l = triples_to_tensors(expert)
    recipe = config.adapter_stage(stack, x, y_w, y_l)
    rng = np.random.default_rng(config.seed)
    members = []
    for k in range(config.size):
        rows = torch.as_tensor(rng.integers(0, len(expert), size=len(expert)))
        member = copy.deepcopy(stack)
        fit_adapter(member, x[rows], y_w[rows], y_l[rows], config.seed + k, recipe)
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
    always the stack's own preference, as served. Expert triples the stack cannot read (another input dimension,
    an output it does not have) are dropped with a warning before either path counts them (`usable_triples`).

    A task naming an output no training triple used (a policy saved over ids by name gives it probability 0, so
    every member agrees and BALD reads ~0) scores ln 2, the most one answer can tell: the policy has no evidence
    about that output, only a placeholder, and its first label is what the next retrain needs."""
    if not isinstance(stack, TwoStagePolicy):
        raise AcquisitionError(f"feature_scores needs a TwoStagePolicy, got {type(stack).__name__}")
    xs, ya, yb = _pairs(x, y_a, y_b, stack)
    expert = usable_triples(stack, expert)
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
        return AcquisitionScores(_unseen_first(stack, bald(probs), ya, yb), prob_a, "relabellings", n_labels)
    members = adapter_ensemble(stack, expert, config)
    probs = np.stack([preference_probs(_margins(m, log_s, ya, yb)) for m in members])
    return AcquisitionScores(_unseen_first(stack, bald(probs), ya, yb), prob_a, "ensemble", n_labels)


def _unseen_first(stack: TwoStagePolicy, scores: FloatArray, y_a: torch.Tensor, y_b: torch.Tensor) -> FloatArray:
    """`scores` with tasks naming an output the policy never saw raised to ln 2 (see `feature_scores`)."""
    answered = answered_mask(stack.head_affine()[1])
    unseen = (~answered[y_a] | ~answered[y_b]).numpy()
    if unseen.any():
        log.info("%d open tasks name an output this policy never saw: scored ln 2, first in the queue",
                 int(unseen.sum()))
    return np.where(unseen, np.log(2.0), scores)

"""Acquisition scores for text pairs on a mode-mixture stage 1 (`relabelling_posterior`, policies/acquisition.py):
stage 2 is a relabelling of the D modes (policies/lm/mixture_learners.py), so the adapters the expert labels still
allow are the relabellings of high posterior, and a pair's score is the information its answer carries about them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from policies.acquisition import AcquisitionError, AcquisitionScores, batch_bald, preference_probs
from policies.lm.mixture_learners import (
    MixtureTerms,
    best_relabelling,
    fit_relabelling,
    keep_bonus,
    relabelled_margin,
    relabelling_score,
)


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

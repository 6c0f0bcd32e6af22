"""The expert-side learners of the text condition tests when stage 1 is a mode mixture (policies/lm/mode_mixture.py).

A mixture's stage 2 is known exactly: the adapter re-maps the prompt's mode weights w(x), so the two_stage
learner here is that policy itself, not a linear stand-in: a relabelling P of the D modes fitted on the
training folds (the assignment that `assignment_centre` finds, searched exhaustively up to 8 modes) and
scored on held-out pairs with the mixture's own implicit reward

    s = β · [(log Σ_j (Pw)_j π_j(chosen) − log Σ_j (Pw)_j π_j(rejected)) − (log π_0(chosen) − log π_0(rejected))].

Paper 1's shared-level-set condition says the expert's preference is a function of the proxy's simplex
point. The direct path that tests it reads the prompt *around* τ̃: a Bradley–Terry learner on the
two_stage score (prior weight 1) plus every product of a principal component of the prompt's pooled
embedding (what τ̃ reads, before τ̃ squashes it onto the simplex) with a mode's implicit-reward margin
(prior 0). When the expert separates prompts the proxy merges (two themes on one mode), those products
fit what no relabelling can, and the held-out gain is the violation. The same learner stands for
fine_tune (every mixture weight refitted on expert pairs can re-learn what τ̃ merged); expert_only
reads the prompt components times the base model's response features, with no proxy term.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, fields
from functools import cache

import numpy as np

from ground.schemas import ConditionCheck
from policies.condition_statistics import binomial_tail
from policies.lm.bradley_terry import log_sigmoid
from policies.lm.condition_config import TextConditionThresholds

MAX_EXHAUSTIVE_MODES = 8  # 8! = 40 320 relabellings searched exhaustively; greedy above


@dataclass(frozen=True)
class MixtureTerms:
    """What a mode-mixture stage 1 says about n pairs, beyond `TextPairFeatures`: log w(x) [n, D] at the identity
    adapter, each mode's sequence log-prob of the chosen and rejected response [n, D], the base model's [n],
    and the prompt's pooled code [n, P] (τ̃'s input)."""

    log_weights: np.ndarray
    mode_chosen: np.ndarray
    mode_rejected: np.ndarray
    base_chosen: np.ndarray
    base_rejected: np.ndarray
    prompt_code: np.ndarray
    beta: float  # stage 1's DPO β: the implicit reward's scale

    def __post_init__(self) -> None:
        for f in fields(self)[:-1]:
            array = np.asarray(getattr(self, f.name), dtype=np.float64)
            if not np.isfinite(array).all():
                raise ValueError(f"MixtureTerms.{f.name} has non-finite values")
            object.__setattr__(self, f.name, array)
        n, d = self.log_weights.shape
        if self.mode_chosen.shape != (n, d) or self.mode_rejected.shape != (n, d):
            raise ValueError(f"mode log-probs must be [n, D] = [{n}, {d}], got {self.mode_chosen.shape} and "
                             f"{self.mode_rejected.shape}")
        if self.base_chosen.shape != (n,) or self.base_rejected.shape != (n,) or self.prompt_code.ndim != 2 \
                or len(self.prompt_code) != n:
            raise ValueError(f"base log-probs must be [n] and prompt_code [n, P] with n = {n}")

    def take(self, index: np.ndarray | slice) -> MixtureTerms:
        return MixtureTerms(self.log_weights[index], self.mode_chosen[index], self.mode_rejected[index],
                            self.base_chosen[index], self.base_rejected[index], self.prompt_code[index], self.beta)

    @property
    def base_margin(self) -> np.ndarray:
        return np.asarray(self.base_chosen - self.base_rejected)

    def best_mode_lift(self) -> np.ndarray:
        """How much the mode that likes the chosen response most raises its log-prob over the base, [n]: the
        response is in the proxy's image (some vertex of the simplex, after any relabelling, produces it) when
        some mode lifts it as the modes lift what the proxy chooses."""
        return np.asarray(self.mode_chosen.max(axis=1) - self.base_chosen)

    def mode_margins(self) -> np.ndarray:
        """Each mode's implicit-reward margin β(Δ log π_k − Δ log π_0), [n, D]."""
        return np.asarray(self.beta * ((self.mode_chosen - self.mode_rejected) - self.base_margin[:, None]))


@cache
def _permutations(dim: int) -> np.ndarray:
    return np.array(list(itertools.permutations(range(dim))))


def best_relabelling(score: np.ndarray) -> np.ndarray:
    """perm[k] = the mode vertex k is sent to, maximising Σ_k score[k, perm[k]]: exhaustive up to
    MAX_EXHAUSTIVE_MODES modes, greedy (largest entries first) above."""
    dim = score.shape[0]
    if dim <= MAX_EXHAUSTIVE_MODES:
        perms = _permutations(dim)
        return np.asarray(perms[int(score[np.arange(dim)[None, :], perms].sum(1).argmax())])
    perm, taken = np.full(dim, -1), set()
    for k in sorted(range(dim), key=lambda k: -float(score[k].max())):
        perm[k] = max((j for j in range(dim) if j not in taken), key=lambda j: float(score[k, j]))
        taken.add(int(perm[k]))
    return perm


def _logsumexp(x: np.ndarray) -> np.ndarray:
    top = x.max(axis=1, keepdims=True)
    return np.asarray((top + np.log(np.exp(x - top).sum(axis=1, keepdims=True)))[:, 0])


def fit_relabelling(terms: MixtureTerms) -> np.ndarray:
    """The relabelling the expert pairs favour: score[k, j] = Σ_i w_k(x_i) log σ(mode j's margin on pair i)."""
    return best_relabelling(np.exp(terms.log_weights).T @ log_sigmoid(terms.mode_margins()))


def relabelled_margin(terms: MixtureTerms, perm: np.ndarray) -> np.ndarray:
    """The two-stage mixture's implicit-reward margin with the adapter at relabelling `perm`."""
    log_w = np.full_like(terms.log_weights, -np.inf)
    log_w[:, perm] = terms.log_weights
    chosen = _logsumexp(log_w + terms.mode_chosen)
    rejected = _logsumexp(log_w + terms.mode_rejected)
    return np.asarray(terms.beta * ((chosen - rejected) - terms.base_margin))


def _prompt_features(expert: np.ndarray, proxy: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The top `count` principal components of the proxy prompts' codes, for expert and proxy rows."""
    mean = proxy.mean(axis=0)
    _, singular, vt = np.linalg.svd(proxy - mean, full_matrices=False)
    components = vt[: min(count, int((singular > 1e-9 * singular.max(initial=1.0)).sum()))]
    return (expert - mean) @ components.T, (proxy - mean) @ components.T


def _crossed(prompt: np.ndarray, response: np.ndarray) -> np.ndarray:
    """Every product of a prompt feature [n, P] with a response-difference feature [n, R]: [n, P·R]."""
    return np.asarray((prompt[:, :, None] * response[:, None, :]).reshape(len(prompt), -1))


def _unit_rms(expert: np.ndarray, proxy: np.ndarray) -> np.ndarray:
    rms = np.sqrt((proxy**2).mean(axis=0))
    return np.asarray(expert / np.where(rms > 1e-12, rms, 1.0))


Design = tuple[np.ndarray, np.ndarray]  # a Bradley–Terry learner's feature differences [n, p] and prior centre [p]


def _swapped_margins(terms: MixtureTerms) -> np.ndarray:
    """Option j per pair: the mixture with the prompt's top mode and mode j swapped in w(x), [n, D] (the
    relabelling a prompt-by-prompt adapter would make: comparable with two_stage's, unlike a pure mode)."""
    n, dim = terms.log_weights.shape
    rows, top = np.arange(n), terms.log_weights.argmax(axis=1)
    out = np.empty((n, dim))
    for j in range(dim):
        log_w = terms.log_weights.copy()
        log_w[rows, j], log_w[rows, top] = terms.log_weights[rows, top], terms.log_weights[rows, j]
        out[:, j] = terms.beta * ((_logsumexp(log_w + terms.mode_chosen) - _logsumexp(log_w + terms.mode_rejected))
                                  - terms.base_margin)
    return out


def neighbour_modes(terms: MixtureTerms, two_stage: np.ndarray, train: np.ndarray, neighbours: int) -> np.ndarray:
    """The direct path: for each pair, the swapped mixture (or two_stage's) that best fits the `neighbours` training
    pairs whose prompts are nearest to its own (Euclidean, prompt codes), and that option's margin. Unlike a
    relabelling it can send two prompts with one simplex point to different modes."""
    options = np.hstack([_swapped_margins(terms), two_stage[:, None]])  # [n, D + 1]
    fit = log_sigmoid(options[train])
    codes = terms.prompt_code
    distance = ((codes[:, None, :] - codes[None, train, :]) ** 2).sum(-1)  # [n, |train|]
    nearest = np.argsort(distance, axis=1, kind="stable")[:, :neighbours]
    best = fit[nearest].sum(axis=1).argmax(axis=1)
    return np.asarray(options[np.arange(len(options)), best])


def mixture_designs(
    expert: MixtureTerms, proxy: MixtureTerms, direct_expert: np.ndarray, direct_proxy: np.ndarray, prompt_count: int,
    neighbours: int, train: np.ndarray,
) -> tuple[dict[str, Design], dict[str, np.ndarray]]:
    """The learners of one cross-validation fold (`train`: the expert pairs fitted on): a Bradley–Terry design for
    expert_only, and the margins of two_stage (its relabelling fitted on `train`) and of the direct path (the
    neighbour-mode learner, also fine_tune's stand-in). `direct_*`: the base's response-feature differences."""
    two_stage = relabelled_margin(expert, fit_relabelling(expert.take(train)))
    prompt_expert, prompt_proxy = _prompt_features(expert.prompt_code, proxy.prompt_code, prompt_count)
    direct = _unit_rms(_crossed(prompt_expert, direct_expert), _crossed(prompt_proxy, direct_proxy))
    return ({"expert_only": (direct, np.zeros(direct.shape[1]))},
            {"two_stage": two_stage, "direct": neighbour_modes(expert, two_stage, train, neighbours)})


def mixture_image_containment(expert: MixtureTerms, proxy: MixtureTerms, t: TextConditionThresholds) -> ConditionCheck:
    """A mixture's image is what its modes produce: an expert-chosen response is outside when no mode lifts it
    over the base as much as the `image_quantile` of proxy-chosen responses are lifted (the low tail). A
    relabelling re-maps prompts to modes, so a response some mode produces is inside whatever the prompt; one
    the proxy never taught any mode to produce is not. Same binomial test as the feature points'."""
    lift, reference = expert.best_mode_lift(), proxy.best_mode_lift()
    cutoff = float(np.quantile(reference, 1 - t.image_quantile))
    outside = int((lift < cutoff).sum())
    share = outside / len(lift)
    p = binomial_tail(outside, len(lift), t.max_outside_share)
    return ConditionCheck(
        name="image_containment", passed=bool(p >= t.alpha), statistic=share, threshold=t.max_outside_share,
        detail=f"{outside} of {len(lift)} expert-chosen responses ({share:.1%}) are lifted over the base by their best "
        f"mode less than {1 - t.image_quantile:.0%} of {len(reference)} proxy-chosen ones are ({cutoff:.3g} nats); "
        f"binomial p={p:.3g} against {t.max_outside_share:.0%}; pass unless the share is significantly (p < "
        f"{t.alpha}) above {t.max_outside_share:.0%}",
    )

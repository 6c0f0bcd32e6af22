"""The expert-side learners of the text condition tests when stage 1 is a mode mixture (policies/lm/mode_mixture.py).

A mixture's stage 2 is known exactly: the adapter re-maps the prompt's mode weights w(x), so the two_stage
learner here is that policy itself, not a linear stand-in: a relabelling P of the D modes fitted on the
training folds (the assignment that `assignment_centre` finds, searched exhaustively up to 8 modes) and
scored on held-out pairs with the mixture's own implicit reward

    s = β · [(log Σ_j (Pw)_j π_j(chosen) − log Σ_j (Pw)_j π_j(rejected)) − (log π_0(chosen) − log π_0(rejected))].

Paper 1's shared-level-set condition says the expert's preference is a function of the proxy's simplex
point. The direct path that tests it reads the prompt *around* τ̃: for each pair, the relabelling (the
prompt's top mode swapped with another, or two_stage's) that best fits the training pairs whose prompts ask about
the same thing (TF-IDF of their tokens, `prompt_content`; without tokens, the nearest pooled codes τ̃ reads).
When the expert separates prompts the proxy merges (two themes on one mode), it fits what no single relabelling
can, and the held-out gain is the violation. It also stands for fine_tune unless the caller trains that plan on the
folds;
expert_only reads products of the prompt's principal components with the base model's response features,
with no proxy term.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from functools import cache

import numpy as np

from ground.schemas import ConditionCheck
from policies.condition_statistics import binomial_tail
from policies.lm.bradley_terry import log_sigmoid
from policies.lm.condition_config import TextConditionThresholds
from policies.lm.prompt_content import tfidf_similarity

MAX_EXHAUSTIVE_MODES = 8  # 8! = 40 320 relabellings searched exhaustively; greedy above
# Prior of stage 2's relabelling: each mode keeps its own vertex with this mass, the rest spread evenly over the
# D - 1 others (the feature family's rule, fitting.choose_centre: half the mass on keeping the proxy's labels).
# Without it a mode that few expert pairs reach is sent wherever their faint weights tip it, and on a proxy
# whose modes are already right (a tempered judge) 5-20 expert pairs make the policy worse than stage 1.
KEEP_MASS = 0.5


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
    # [n] which pairs are copies of one another (`pair_groups`: same prompt and responses), so the tests'
    # folds keep them together; None: every pair distinct.
    groups: np.ndarray | None = None
    # [n, T] the prompt's token ids as cut, padded with prompt_content.PAD: what the direct path groups prompts by
    # (`prompt_content.tfidf_similarity`); None: by prompt_code.
    prompt_tokens: np.ndarray | None = None

    def __post_init__(self) -> None:
        for name in ("groups", "prompt_tokens"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=np.int64))
        for f in [f for f in fields(self) if f.name not in ("beta", "groups", "prompt_tokens")]:
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
        if self.groups is not None and self.groups.shape != (n,):
            raise ValueError(f"groups must be [n] = [{n}], got {self.groups.shape}")
        if self.prompt_tokens is not None and (self.prompt_tokens.ndim != 2 or len(self.prompt_tokens) != n):
            raise ValueError(f"prompt_tokens must be [n, T] with n = {n}, got {self.prompt_tokens.shape}")
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"MixtureTerms.beta (stage 1's DPO β) must be a positive number, got {self.beta}")

    def take(self, index: np.ndarray | slice) -> MixtureTerms:
        return MixtureTerms(self.log_weights[index], self.mode_chosen[index], self.mode_rejected[index],
                            self.base_chosen[index], self.base_rejected[index], self.prompt_code[index], self.beta,
                            None if self.groups is None else self.groups[index],
                            None if self.prompt_tokens is None else self.prompt_tokens[index])

    def oriented(self, sign: np.ndarray) -> MixtureTerms:
        """These pairs, read a vs b, turned chosen first by labels `sign` [n] (+1: a was chosen, −1: b was)."""
        flip = np.asarray(sign) < 0
        column = flip[:, None]
        return MixtureTerms(self.log_weights, np.where(column, self.mode_rejected, self.mode_chosen),
                            np.where(column, self.mode_chosen, self.mode_rejected),
                            np.where(flip, self.base_rejected, self.base_chosen),
                            np.where(flip, self.base_chosen, self.base_rejected), self.prompt_code, self.beta,
                            self.groups, self.prompt_tokens)

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


def pair_groups(rows: Sequence[Mapping[str, str]]) -> np.ndarray:
    """Per pair row ({"prompt", "chosen", "rejected"}), its copy group (`MixtureTerms.groups`): one prompt with one
    unordered pair of responses is one group whoever labelled it and whichever way, numbered by first appearance
    (all distinct: 0..n-1)."""
    seen: dict[tuple[str, frozenset[str]], int] = {}
    keys = [(row["prompt"], frozenset((row["chosen"], row["rejected"]))) for row in rows]
    return np.array([seen.setdefault(key, len(seen)) for key in keys], dtype=np.int64)


@cache
def _permutations(dim: int) -> np.ndarray:
    return np.array(list(itertools.permutations(range(dim))))


def check_matching_terms(expert: MixtureTerms | None, proxy: MixtureTerms | None) -> None:
    """Expert and proxy terms come from one stage-1 mixture (the same modes D, prompt code width P and β), or
    neither side has any: a mixture on one side only would be silently ignored."""
    if (expert is None) != (proxy is None):
        raise ValueError("mixture terms must be given for both the expert and the proxy pairs or for neither "
                         f"(expert: {expert is not None}, proxy: {proxy is not None})")
    if expert is not None and proxy is not None:
        mine = (expert.log_weights.shape[1], expert.prompt_code.shape[1], expert.beta)
        theirs = (proxy.log_weights.shape[1], proxy.prompt_code.shape[1], proxy.beta)
        if mine != theirs:
            raise ValueError(f"expert and proxy mixture terms disagree on (modes D, prompt code width P, β): {mine} "
                             f"vs {theirs}; both must be read by one stage-1 mixture")

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


def relabelling_score(terms: MixtureTerms) -> np.ndarray:
    """score[k, j] = Σ_i w_k(x_i) log σ(mode j's margin on pair i) [D, D]: how well sending mode k's prompts to
    mode j fits the expert pairs; a relabelling's log-likelihood is Σ_k score[k, perm[k]]."""
    return np.asarray(np.exp(terms.log_weights).T @ log_sigmoid(terms.mode_margins()))


def keep_bonus(dim: int) -> np.ndarray:
    """[D, D] log prior odds (up to a constant) of sending mode k to vertex j: log((D − 1)·m / (1 − m)) on the
    diagonal (m = KEEP_MASS), 0 elsewhere; added to a relabelling score, its best is the MAP relabelling."""
    if dim < 2:  # one mode: nothing to relabel
        return np.zeros((dim, dim))
    return np.eye(dim) * float(np.log((dim - 1) * KEEP_MASS / (1 - KEEP_MASS)))


def fit_relabelling(terms: MixtureTerms) -> np.ndarray:
    """The relabelling the expert pairs favour under the keep prior (`relabelling_score` + `keep_bonus`, best)."""
    score = relabelling_score(terms)
    return best_relabelling(score + keep_bonus(score.shape[0]))


def relabelled_margin(terms: MixtureTerms, perm: np.ndarray) -> np.ndarray:
    """The two-stage mixture's implicit-reward margin with the adapter at relabelling `perm`."""
    log_w = np.full_like(terms.log_weights, -np.inf)
    log_w[:, perm] = terms.log_weights
    return _mixture_margin(terms, log_w)


def _mixture_margin(terms: MixtureTerms, log_w: np.ndarray) -> np.ndarray:
    """The implicit-reward margin against the base of the mixture with mode weights log_w [n, D]."""
    chosen = np.logaddexp.reduce(log_w + terms.mode_chosen, axis=1)
    rejected = np.logaddexp.reduce(log_w + terms.mode_rejected, axis=1)
    return np.asarray(terms.beta * ((chosen - rejected) - terms.base_margin))


def principal_components(rows: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The mean of `rows` and its top `count` principal directions [≤ count, p] (fewer when the rows span fewer)."""
    mean = rows.mean(axis=0)
    _, singular, vt = np.linalg.svd(rows - mean, full_matrices=False)
    return mean, vt[: min(count, int((singular > 1e-9 * singular.max(initial=1.0)).sum()))]


def unit_rms(expert: np.ndarray, proxy: np.ndarray) -> np.ndarray:
    """`expert`'s columns scaled by the RMS of `proxy`'s (the proxy pairs set the scale: one prior fits all)."""
    rms = np.sqrt((proxy**2).mean(axis=0))
    return np.asarray(expert / np.where(rms > 1e-12, rms, 1.0))


def _crossed(prompt: np.ndarray, response: np.ndarray) -> np.ndarray:
    """Every product of a prompt feature [n, P] with a response-difference feature [n, R]: [n, P·R]."""
    return np.asarray((prompt[:, :, None] * response[:, None, :]).reshape(len(prompt), -1))


Design = tuple[np.ndarray, np.ndarray]  # a Bradley–Terry learner's feature differences [n, p] and prior centre [p]


def swapped_margins(terms: MixtureTerms) -> np.ndarray:
    """Option j per pair: the mixture with the prompt's top mode and mode j swapped in w(x), [n, D] (the
    relabelling a prompt-by-prompt adapter would make: comparable with two_stage's, unlike a pure mode)."""
    n, dim = terms.log_weights.shape
    rows, top = np.arange(n), terms.log_weights.argmax(axis=1)
    out = np.empty((n, dim))
    for j in range(dim):
        log_w = terms.log_weights.copy()
        log_w[rows, j], log_w[rows, top] = terms.log_weights[rows, top], terms.log_weights[rows, j]
        out[:, j] = _mixture_margin(terms, log_w)
    return out


@dataclass(frozen=True)
class PromptCloseness:
    """How alike each expert pair's prompt is to each other's, `score` [n, n] (higher: closer), and which training
    pairs the direct path fits a pair's mode on: every one at least `floor` close, and its `least` closest of those
    above `unrelated`; a pair with none is fitted on every training pair (alike to nothing, nothing is its group)."""

    score: np.ndarray
    least: int
    floor: float = math.inf
    unrelated: float = -math.inf
    by_tokens: bool = False  # TF-IDF of the prompts' tokens (else prompt codes)


def prompt_closeness(expert: MixtureTerms, proxy: MixtureTerms, t: TextConditionThresholds) -> PromptCloseness:
    """By TF-IDF over the prompts' tokens (`prompt_content`, IDF over the proxy prompts) when both sides carry them:
    every training pair at least `neighbour_similarity` alike, and `min_neighbour_pairs` at least; else the
    `neighbour_pairs` nearest prompt codes (Euclidean)."""
    if expert.prompt_tokens is not None and proxy.prompt_tokens is not None:
        similarity = tfidf_similarity(expert.prompt_tokens, proxy.prompt_tokens)
        return PromptCloseness(similarity, t.min_neighbour_pairs, t.neighbour_similarity, 0.0, by_tokens=True)
    codes = expert.prompt_code
    squared = (codes**2).sum(axis=1)  # |a - b|² without the [n, n, P] difference tensor
    return PromptCloseness(2 * codes @ codes.T - squared[:, None] - squared[None, :], t.neighbour_pairs)


def neighbour_modes(swapped: np.ndarray, two_stage: np.ndarray, train: np.ndarray,
                    closeness: PromptCloseness) -> np.ndarray:
    """The direct path: for each pair, the swapped mixture (`swapped_margins`) or two_stage's that best fits the
    training pairs whose prompts are close to its own (`closeness`), and that option's margin. Unlike a
    relabelling it can send two prompts with one simplex point to different modes."""
    options = np.hstack([swapped, two_stage[:, None]])  # [n, D + 1]
    fit = log_sigmoid(options[train])
    score = closeness.score[:, train]
    related = score > closeness.unrelated
    near = (score >= closeness.floor) & related
    nearest = np.argsort(-score, axis=1, kind="stable")[:, :closeness.least]
    rows = np.arange(len(score))[:, None]
    near[rows, nearest] |= related[rows, nearest]
    near[~near.any(axis=1)] = True
    best = (near.astype(np.float64) @ fit).argmax(axis=1)
    return np.asarray(options[np.arange(len(options)), best])


def expert_only_design(expert: MixtureTerms, proxy: MixtureTerms, direct_expert: np.ndarray,
                       direct_proxy: np.ndarray, prompt_count: int) -> Design:
    """expert_only's Bradley–Terry design: products of the prompt's principal components with the base's
    response-feature differences (`direct_*`), centred on 0 (no proxy term)."""
    mean, components = principal_components(proxy.prompt_code, prompt_count)
    prompt_expert, prompt_proxy = (expert.prompt_code - mean) @ components.T, (proxy.prompt_code - mean) @ components.T
    direct = unit_rms(_crossed(prompt_expert, direct_expert), _crossed(prompt_proxy, direct_proxy))
    return direct, np.zeros(direct.shape[1])


def fold_margins(terms: MixtureTerms, swapped: np.ndarray, closeness: PromptCloseness,
                 train: np.ndarray) -> dict[str, np.ndarray]:
    """Every pair's margin under two_stage (its relabelling fitted on the expert pairs `train`) and under the direct
    path (`neighbour_modes` over `train`); `swapped` is `swapped_margins(terms)`, which no fold changes."""
    two_stage = relabelled_margin(terms, fit_relabelling(terms.take(train)))
    return {"two_stage": two_stage, "direct": neighbour_modes(swapped, two_stage, train, closeness)}


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

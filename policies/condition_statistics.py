"""The statistics behind the condition tests, as pure functions of arrays (see policies/features/conditions.py).

Each takes model outputs (log-probabilities or log-ratios) or per-triple scores and returns a
number; the thresholds and the fitting of the models that produce those outputs live in
policies/features/conditions.py, so each statistic can be checked on hand-built cases with known answers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Bootstrap:
    """A mean with its percentile bootstrap interval and one-sided p-value for "mean > 0"."""

    mean: float
    low: float  # 2.5% quantile of the bootstrap means
    high: float  # 97.5% quantile
    p_not_positive: float  # share of bootstrap means <= 0

    def text(self) -> str:
        return f"{self.mean:+.3f} (95% bootstrap [{self.low:+.3f}, {self.high:+.3f}], p={self.p_not_positive:.3f})"


def bootstrap_mean(values: np.ndarray, rng: np.random.Generator, resamples: int = 2000) -> Bootstrap:
    """Percentile bootstrap of the mean of `values` [N] (e.g. per-triple log-likelihood differences)."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or len(values) == 0:
        raise ValueError(f"bootstrap_mean needs a non-empty 1-d array, got shape {values.shape}")
    idx = rng.integers(0, len(values), size=(resamples, len(values)))
    means = values[idx].mean(axis=1)
    return Bootstrap(
        mean=float(values.mean()),
        low=float(np.quantile(means, 0.025)),
        high=float(np.quantile(means, 0.975)),
        p_not_positive=float((means <= 0).mean()),
    )


def input_groups(rows: np.ndarray) -> np.ndarray:
    """Per row, its group: a row equal to an earlier one joins that row's group. Groups are numbered in order of
    first appearance, so rows that are all distinct get 0..n-1 (and `grouped_folds` the folds it always gave)."""
    rows = np.asarray(rows)
    if len(rows) == 0:
        return np.zeros(0, dtype=np.int64)
    rows = rows.reshape(len(rows), -1)
    _, first, inverse = np.unique(rows, axis=0, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    return rank[inverse.ravel()]


def group_means(scores: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Per group (in group-id order, `input_groups`' numbering), the mean of its rows' scores: a task's share right
    over the labels several annotators gave it."""
    scores, groups = np.asarray(scores, dtype=np.float64), np.asarray(groups, dtype=np.int64)
    if scores.shape != groups.shape or scores.ndim != 1 or len(scores) == 0:
        raise ValueError(f"group means need scores and groups of one non-empty length, got {scores.shape} and "
                         f"{groups.shape}")
    sizes = np.bincount(groups)
    used = sizes > 0
    means: np.ndarray = np.bincount(groups, weights=scores)[used] / sizes[used]
    return means


def mean_over_groups(scores: np.ndarray, groups: np.ndarray) -> float:
    """The mean of each group's mean score: a task counts once however many annotators labelled it (40 copies of one
    held-out input were 40 agreeing votes on one coin, and the gate released a noise proxy on them). With every group
    one row, the plain mean, summed as a count over n (the gate compares 7 of 10 with a 0.7 floor)."""
    means = group_means(scores, groups)
    if len(means) == len(scores):
        return float(np.asarray(scores, dtype=np.float64).sum()) / len(scores)
    return float(means.mean())


def grouped_folds(order: np.ndarray, groups: np.ndarray, folds: int) -> list[np.ndarray]:
    """Cross-validation folds that never split a group: the groups in `order` (a permutation of the group ids)
    cut into `folds` runs as np.array_split cuts them. Two annotators labelling the same task give the same input
    twice; in two folds, one copy would score the other and a learner that memorises inputs (fine_tune,
    expert_only) would look near-perfect held out (the audit's case: expert_only planned at 0.825 against the
    proxy's 0.931). With every group one row these are np.array_split(order, folds) exactly."""
    members = np.argsort(groups, kind="stable")
    starts = np.searchsorted(groups[members], np.arange(len(order) + 1))
    by_group = [members[starts[g]:starts[g + 1]] for g in range(len(order))]
    return [np.concatenate([by_group[g] for g in part]) for part in np.array_split(order, min(folds, len(order)))]


def seeded_grouped_folds(rows: np.ndarray, seed: int, folds: int) -> list[np.ndarray]:
    """`grouped_folds` over the copy groups of `rows` (`input_groups`), the groups in numpy's order for `seed`: the
    condition tests' folds in both families (features by input, text pairs by copy group)."""
    groups = input_groups(rows)
    return grouped_folds(np.random.default_rng(seed).permutation(int(groups.max(initial=-1)) + 1), groups, folds)


def log_ratios(log_probs: np.ndarray) -> np.ndarray:
    """Centred log-probabilities [N, Y]: Euclidean distance between rows is the Aitchison distance
    between the output distributions, a metric on the open simplex."""
    result: np.ndarray = log_probs - log_probs.mean(axis=-1, keepdims=True)
    return result


def encoding_dimension(z: np.ndarray, variance_share: float) -> tuple[int, np.ndarray]:
    """Principal components of the rows of z [N, k] needed to explain `variance_share` of their
    variance, and the cumulative explained shares. 0 when the rows are all equal."""
    z = z - z.mean(axis=0)
    variances = np.linalg.svd(z, compute_uv=False) ** 2
    total = variances.sum()
    if total <= 1e-12 * max(1.0, float(np.abs(z).max(initial=0.0)) ** 2):
        return 0, np.zeros_like(variances)
    explained = np.cumsum(variances) / total
    return int(np.searchsorted(explained, variance_share - 1e-12) + 1), explained


def favourite_shares(log_probs: np.ndarray) -> np.ndarray:
    """Share of inputs on which each output is the most likely one: [N, Y] -> [Y]."""
    favourite = log_probs.argmax(axis=-1)
    shares: np.ndarray = np.bincount(favourite, minlength=log_probs.shape[-1]) / len(favourite)
    return shares


def preferred_outputs(shares: np.ndarray, min_share: float) -> set[int]:
    """Outputs that are the favourite on at least `min_share` of inputs."""
    return {int(y) for y in np.flatnonzero(shares >= min_share)}


def coverage(expert_preferred: set[int], proxy_preferred: set[int]) -> float:
    """Share of the expert's preferred outputs the proxy also prefers somewhere (1.0 if none)."""
    if not expert_preferred:
        return 1.0  # nothing the expert prefers can be missing from the proxy's image
    return len(expert_preferred & proxy_preferred) / len(expert_preferred)


def distance_ratios(
    expert_z: np.ndarray, proxy_z: np.ndarray, i: np.ndarray, j: np.ndarray, proxy_floor_quantile: float = 0.0
) -> np.ndarray:
    """d_expert(x_i, x_j) / d_proxy(x_i, x_j) per pair, on log-ratio rows [N, Y] of each model.

    Pairs the proxy cannot tell apart but the expert can give huge ratios: that is the point. With
    `proxy_floor_quantile` q > 0 only pairs whose proxy distance is at least its q-quantile count:
    a fitted proxy model's outputs carry estimation error of roughly fixed size, so on pairs it
    barely separates the ratio measures that error, not the proxy. A proxy that merges all inputs
    still gives huge ratios (every distance is then at the floor)."""
    d_expert = np.linalg.norm(expert_z[i] - expert_z[j], axis=1)
    d_proxy = np.linalg.norm(proxy_z[i] - proxy_z[j], axis=1)
    kept = d_proxy >= np.quantile(d_proxy, proxy_floor_quantile)
    ratios: np.ndarray = d_expert[kept] / np.maximum(d_proxy[kept], 1e-6)
    return ratios


def relaxation_constant(ratios: np.ndarray, quantile: float) -> float:
    """L estimate: a high quantile of the distance ratios (L is a worst case; the quantile keeps a
    few outlying pairs from deciding it)."""
    return float(np.quantile(ratios, quantile))


def relaxation_interval(ratios: np.ndarray, quantile: float, rng: np.random.Generator,
                        resamples: int = 500) -> tuple[float, float, float]:
    """(L estimate, 95% bootstrap interval of it): similarity passes unless the whole interval is above the bound."""
    resampled = ratios[rng.integers(0, len(ratios), size=(resamples, len(ratios)))]
    low, high = np.quantile(np.quantile(resampled, quantile, axis=1), [0.025, 0.975])
    return relaxation_constant(ratios, quantile), float(low), float(high)


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    return min(1.0, sum(math.exp(math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1)
                                 + j * math.log(p) + (n - j) * math.log1p(-p)) for j in range(k, n + 1)))

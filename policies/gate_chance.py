"""Does the gate's pick rank held-out expert pairs better than a coin would, allowing for the pick itself?

The gate releases the best of several checkpoints scored on the same held-out tasks. On a handful of tasks the best
of eight coin-level checkpoints clears any fixed floor most of the time (the text audit: a pure-noise proxy released
in 8 of 24 runs at 15-24 expert labels). The null here is "the policy's rankings carry no information about the
expert's": every held-out task's label is then as likely one way as the other, and flipping it turns each
checkpoint's share right on that task, s, into 1 - s, for every checkpoint at once. The p-value is the share of such
flips under which the best checkpoint scores at least what the pick scored (Westfall and Young's max statistic):
checkpoints that agree cost nothing, checkpoints that disagree pay for the choice among them. All 2**n flips are
counted for n up to `EXACT_UP_TO` tasks, a seeded sample of them above.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

EXACT_UP_TO = 12  # 4096 flips
SAMPLED_FLIPS = 4000
TIE = 1e-9  # accuracies are means of halves over tasks: equal ones can differ by rounding


@dataclass(frozen=True)
class ChanceTest:
    p_value: float
    best: float  # the best checkpoint's held-out accuracy over tasks
    n_tasks: int
    n_checkpoints: int
    exact: bool

    def text(self) -> str:
        how = (f"all {2 ** self.n_tasks} label flips" if self.exact
               else f"the labels as given and {SAMPLED_FLIPS} sampled flips")
        return (f"p = {self.p_value:.4f} that the best of {self.n_checkpoints} checkpoints scores {self.best:.3f} or "
                f"more on {self.n_tasks} held-out tasks if its rankings carried no information ({how})")


def _flips(n: int, seed: int) -> tuple[np.ndarray, bool]:
    """[F, n] booleans, True where a task's label is flipped: every pattern for small n, else a seeded sample (with
    the observed labels, no flip, first, so the p-value is never 0)."""
    if n <= EXACT_UP_TO:
        return ((np.arange(2**n)[:, None] >> np.arange(n)[None, :]) & 1).astype(bool), True
    sampled = np.random.default_rng(seed).integers(0, 2, size=(SAMPLED_FLIPS, n)).astype(bool)
    return np.vstack([np.zeros((1, n), dtype=bool), sampled]), False


def chance_test(task_scores: Sequence[Sequence[float]], seed: int = 0) -> ChanceTest:
    """`task_scores` [checkpoints][tasks]: each checkpoint's share right on each held-out task (ties half), the
    tasks in one order for all. Returns the max-statistic p-value under label flips."""
    scores = np.asarray(task_scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[0] == 0 or scores.shape[1] == 0:
        raise ValueError(f"chance_test needs scores [checkpoints, tasks] of each at least one, got {scores.shape}")
    if not np.isfinite(scores).all() or (scores < 0).any() or (scores > 1).any():
        raise ValueError("task scores are shares right on a task, in [0, 1]")
    n = scores.shape[1]
    flips, exact = _flips(n, seed)
    best = float(scores.mean(axis=1).max())
    # A flip turns s into 1 - s, adding 1 - 2s to the checkpoint's total: means under every flip [F, checkpoints].
    means = (scores.sum(axis=1)[None, :] + flips.astype(np.float64) @ (1.0 - 2.0 * scores).T) / n
    at_least = int((means.max(axis=1) >= best - TIE).sum())
    return ChanceTest(p_value=at_least / len(flips), best=best, n_tasks=n, n_checkpoints=scores.shape[0], exact=exact)

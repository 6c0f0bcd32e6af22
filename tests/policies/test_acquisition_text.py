"""The text family's posterior ensemble (policies.acquisition.logistic_posterior_margins): pairs along a
direction no label has touched outrank pairs the labels already settle, and ranked order beats random."""

from __future__ import annotations

import numpy as np
import pytest

from policies.acquisition import AcquisitionError, logistic_posterior_margins, rank, text_scores
from policies.lm.conditions import fit_bradley_terry


def test_untouched_directions_score_above_settled_ones() -> None:
    rng = np.random.default_rng(0)
    labelled = np.zeros((40, 2))
    labelled[:, 0] = np.abs(rng.normal(1.0, 0.3, 40))  # every label along feature 0, all saying "a"
    open_pairs = np.array([[1.0, 0.0], [0.0, 1.0]])
    policy, members = logistic_posterior_margins(labelled, open_pairs, precision=2.0, size=64, seed=0)
    assert members.shape == (64, 2) and policy.shape == (2,)
    assert policy[0] > 1.0 and policy[1] == pytest.approx(0.0, abs=1e-9)
    scores = text_scores(policy, ensemble_margins=members, n_labels=40)
    assert rank(scores.scores) == [1, 0]  # the unlabelled direction first
    # Without labels the posterior is the prior: every direction is open.
    prior_policy, prior_members = logistic_posterior_margins(np.zeros((0, 2)), open_pairs, 2.0, 8, 0)
    assert prior_policy.tolist() == [0.0, 0.0] and prior_members.std() > 0.1


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"precision": 0.0}, "precision > 0"), ({"size": 1}, "size >= 2"),
])
def test_posterior_margins_refuse_bad_settings(kwargs: dict[str, float], message: str) -> None:
    args = {"z_labelled": np.ones((2, 2)), "z_open": np.ones((3, 2)), "precision": 1.0, "size": 4, "seed": 0}
    with pytest.raises(AcquisitionError, match=message):
        logistic_posterior_margins(**{**args, **kwargs})  # type: ignore[arg-type]
    with pytest.raises(AcquisitionError, match="NaN"):
        logistic_posterior_margins(np.full((2, 2), np.nan), np.ones((3, 2)), 1.0, 4, 0)


def test_ranked_order_reaches_the_target_with_fewer_labels_than_random() -> None:
    """Eight themes, each with its own preference direction; the pool is dominated by one theme, so
    random order spends most labels where the adapter is already sure. Target: the accuracy random
    order reaches with 60 labels (mean of 3 orders); batches of 5, refitted after each."""
    rng = np.random.default_rng(1)
    themes, dim = 8, 3
    truth = rng.normal(0.0, 3.0, (themes, dim))

    def draw(n: int, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        theme = rng.choice(themes, n, p=weights)
        diff = rng.normal(0.0, 1.0, (n, dim))
        z = np.zeros((n, themes * dim))
        for i, t in enumerate(theme):
            z[i, t * dim:(t + 1) * dim] = diff[i]
        return z, np.einsum("nd,nd->n", diff, truth[theme])

    skew = np.array([0.65] + [0.05] * 7)
    pool, pool_gold = draw(600, skew)
    labels = np.where(rng.random(600) < 1 / (1 + np.exp(-pool_gold)), 1.0, -1.0)
    test, test_gold = draw(2000, np.full(themes, 1 / themes))

    def accuracy(chosen: list[int]) -> float:
        w = fit_bradley_terry(pool[chosen] * labels[chosen, None], np.zeros(pool.shape[1]), 2.0)
        return float(np.mean(np.sign(test @ w) == np.sign(test_gold)))

    sizes = range(5, 65, 5)
    curves = [{n: accuracy(np.random.default_rng(r).permutation(600)[:n].tolist()) for n in sizes} for r in range(3)]
    target = float(np.mean([c[60] for c in curves]))
    chosen: list[int] = []
    while len(chosen) < 60:
        taken = set(chosen)
        open_tasks = [i for i in range(600) if i not in taken]
        policy, members = logistic_posterior_margins(pool[chosen] * labels[chosen, None], pool[open_tasks], 2.0, 16,
                                                     len(chosen))
        scores = text_scores(policy, ensemble_margins=members)
        chosen += [open_tasks[int(i)] for i in rank(scores.scores)[:5]]
        if accuracy(chosen) >= target:
            break
    assert len(chosen) <= 30, (len(chosen), target, curves)

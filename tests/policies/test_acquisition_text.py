"""The text family's score on a mode-mixture stage 1 (policies.lm.acquisition.relabelling_scores, batch_bald): pairs
whose prompt's mode no label has pinned down outrank pairs already settled, batches do not repeat one question, and
ranked order reaches the right relabelling with fewer labels than random order (and than a constant score). The chat
tasks' score (mixture_scores) pre-annotates the side stage 2's refit on the labels so far prefers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from policies.acquisition import AcquisitionError, bald, batch_bald, preference_probs, rank
from policies.lm.acquisition import RelabellingConfig, mixture_scores, relabelling_samples, relabelling_scores
from policies.lm.mixture_learners import MixtureTerms, fit_relabelling, relabelled_margin

LIFT = 3.0  # how much mode j raises the log-prob of a response on topic j


def terms(modes: np.ndarray, chosen: np.ndarray, rejected: np.ndarray, dim: int) -> MixtureTerms:
    """Pairs whose prompt sits on mode `modes[i]` (w = 0.97 there), chosen and rejected responses on topics
    `chosen[i]`, `rejected[i]`; mode j lifts responses on topic j by LIFT nats over the base."""
    n = len(modes)
    weights = np.full((n, dim), 0.03 / (dim - 1))
    weights[np.arange(n), modes] = 0.97
    lifts = LIFT * np.eye(dim)
    return MixtureTerms(
        np.log(weights), lifts[chosen], lifts[rejected], np.zeros(n), np.zeros(n), np.eye(dim)[modes], beta=0.5
    )


def expert_pairs(modes: np.ndarray, perm: np.ndarray, dim: int, rng: np.random.Generator) -> MixtureTerms:
    """Expert-labelled pairs, chosen first: the expert wants topic perm[k] on mode k's prompts."""
    other = (perm[modes] + rng.integers(1, dim, len(modes))) % dim
    return terms(modes, perm[modes], other, dim)


def test_unpinned_modes_score_above_pinned_ones() -> None:
    rng, dim = np.random.default_rng(0), 4
    truth = np.array([2, 0, 3, 1])
    labelled = expert_pairs(np.repeat([0, 1], 10), truth, dim, rng)  # modes 0 and 1 pinned, 2 and 3 still open
    modes = np.repeat([0, 1, 2, 3], 6)
    first = rng.integers(0, dim, len(modes))
    open_pairs = terms(modes, first, (first + rng.integers(1, dim, len(modes))) % dim, dim)
    result = relabelling_scores(labelled, open_pairs, fit_relabelling(labelled), RelabellingConfig(seed=1, batch=1))
    assert result.method == "relabelling_posterior" and result.n_labels == 20
    scores = result.scores
    pinned, free = scores[modes < 2], scores[modes >= 2]
    assert free.mean() > 5 * pinned.mean() and pinned.max() < 0.05  # a constant score fails here
    assert set(modes[[int(i) for i in rank(scores)[:6]]]) <= {2, 3}


def test_cold_start_picks_the_pairs_the_modes_disagree_on() -> None:
    dim = 4
    modes = np.array([0, 0, 1, 1])
    topics = np.array([[0, 1], [2, 2], [3, 0], [1, 1]])  # pairs 1 and 3: both responses on one topic
    open_pairs = terms(modes, topics[:, 0], topics[:, 1], dim)
    empty = open_pairs.take(np.arange(0))
    samples = relabelling_samples(empty, RelabellingConfig(members=64))
    assert samples.shape == (64, dim) and all(sorted(s) == list(range(dim)) for s in samples.tolist())
    # No label: the keep prior's draws, spread over many relabellings, each mode kept about half the time
    assert len({tuple(s) for s in samples.tolist()}) > 10
    assert 0.3 < float((samples == np.arange(dim)).mean()) < 0.7
    scores = relabelling_scores(empty, open_pairs, np.arange(dim), RelabellingConfig(batch=1)).scores
    assert min(scores[0], scores[2]) > 0.05 and max(scores[1], scores[3]) < 1e-6


def test_batch_bald_does_not_repeat_a_question() -> None:
    probs = np.array([[0.99, 0.99, 0.9], [0.99, 0.99, 0.1], [0.01, 0.01, 0.9], [0.01, 0.01, 0.1]])
    assert rank(bald(probs))[:2] == [0, 1]  # top-2 BALD asks the same question twice
    scores = batch_bald(probs, 2)
    assert rank(scores)[:2] == [0, 2]
    assert scores[0] == pytest.approx(bald(probs)[0]) and scores[1] < 0.05 < 0.3 < scores[2]
    entropy = -(0.99 * math.log(0.99) + 0.01 * math.log(0.01))
    assert scores[0] == pytest.approx(math.log(2) - entropy)  # the first of a batch scores its plain BALD


def test_chat_tasks_the_labels_leave_open_outrank_those_the_refit_explains_and_show_its_choice() -> None:
    """mixture_scores, as the refresh scores Label Studio's chat tasks: the expert has pinned modes 0 and 1; open
    pairs on them are settled, and the pre-annotation is the side the refitted relabelling prefers (the expert's
    topic, as a or as b); pairs on modes 2 and 3, whose relabelling the labels leave open, are asked first."""
    rng, dim = np.random.default_rng(3), 4
    truth = np.array([2, 0, 3, 1])  # the expert wants topic truth[k] on mode k's prompts
    labelled = expert_pairs(np.repeat([0, 1], 8), truth, dim, rng)
    pinned = np.array([0, 1, 0, 1])
    wanted, other = truth[pinned], (truth[pinned] + np.array([1, 2, 3, 1])) % dim
    # Tasks 0-3: the expert's topic as a; 4-7: as b; 8-9: modes 2 and 3 between the topics left for them (1 and 3).
    modes = np.concatenate([pinned, pinned, [2, 3]])
    open_pairs = terms(modes, np.concatenate([wanted, other, [1, 3]]), np.concatenate([other, wanted, [3, 1]]), dim)
    result = mixture_scores(labelled, open_pairs, RelabellingConfig(seed=2))
    assert result.method == "relabelling_posterior" and result.n_labels == 16
    assert result.scores[8:].min() > 5 * result.scores[:8].max()
    assert set(rank(result.scores)[:2]) == {8, 9}
    assert result.preferred()[:8] == ["a"] * 4 + ["b"] * 4
    refit = relabelled_margin(open_pairs, fit_relabelling(labelled))
    np.testing.assert_allclose(result.prob_a, preference_probs(refit))


def test_before_any_expert_label_chat_tasks_show_stage_one_as_is() -> None:
    """No label: the relabelling is the identity, so each pair's pre-annotation is what its prompt's mode lifts."""
    open_pairs = terms(np.array([0, 1, 2]), np.array([0, 0, 1]), np.array([3, 1, 2]), 4)
    result = mixture_scores(open_pairs.take(np.arange(0)), open_pairs)
    assert result.preferred() == ["a", "b", "b"] and result.n_labels == 0
    np.testing.assert_allclose(result.prob_a, preference_probs(relabelled_margin(open_pairs, np.arange(4))))


def loop_labels(order: str, seed: int) -> int:
    """Labels (batches of 5, refitted after each) until the fitted relabelling is the expert's. The pool is
    dominated by mode 0 and lists its pairs first, so a constant score (pool order) is a bad order."""
    rng, dim, n = np.random.default_rng(seed), 6, 300
    truth = rng.permutation(dim)
    modes = np.sort(rng.choice(dim, n, p=[0.75] + [0.05] * 5))
    first = rng.integers(0, dim, n)
    second = (first + rng.integers(1, dim, n)) % dim
    pool = terms(modes, first, second, dim)
    coin = np.where(rng.random(n) < 0.5, 1.0, -1.0)  # neither response on the wanted topic: a coin flip
    sign = np.where(truth[modes] == first, 1.0, np.where(truth[modes] == second, -1.0, coin))
    permutation = rng.permutation(n).tolist()
    labelled: list[int] = []
    while len(labelled) < n:
        rows = np.asarray(labelled, dtype=int)
        seen = pool.take(rows).oriented(sign[rows])
        if labelled and np.array_equal(fit_relabelling(seen), truth):
            return len(labelled)
        taken = set(labelled)
        open_tasks = [i for i in range(n) if i not in taken]
        if order == "random":
            labelled += [i for i in permutation if i not in taken][:5]
            continue
        scores: np.ndarray = np.zeros(len(open_tasks))  # "constant": every pair ties, pool order decides
        if order == "ranked":
            perm = fit_relabelling(seen) if labelled else np.arange(dim)
            config = RelabellingConfig(members=64, temperature=3.0, seed=len(labelled))
            scores = relabelling_scores(seen, pool.take(np.asarray(open_tasks)), perm, config).scores
        labelled += [open_tasks[int(i)] for i in rank(scores)[:5]]
    return n


def test_ranked_order_pins_the_relabelling_with_fewer_labels_than_random_or_a_constant_score() -> None:
    ranked = [loop_labels("ranked", s) for s in range(3)]
    random = [loop_labels("random", s) for s in range(3)]
    constant = [loop_labels("constant", s) for s in range(3)]
    assert np.mean(ranked) * 2 <= np.mean(random), (ranked, random)
    assert np.mean(ranked) * 2 <= np.mean(constant), (ranked, constant)


def test_bad_settings_and_inputs_are_refused() -> None:
    for kwargs in ({"members": 1}, {"temperature": 0.0}, {"batch": 0}, {"batch": 11}):
        with pytest.raises(AcquisitionError, match="members >= 2"):
            RelabellingConfig(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(AcquisitionError, match="batch_bald needs"):
        batch_bald(np.ones((1, 3)) * 0.5, 2)
    three = terms(np.array([0]), np.array([0]), np.array([1]), 3)
    four = terms(np.array([0]), np.array([0]), np.array([1]), 4)
    with pytest.raises(AcquisitionError, match="different numbers of modes"):
        relabelling_scores(three, four, np.arange(4))

"""Copies of one expert pair (annotators labelling the same task) in the text condition tests and the gate's split:
the cross-validation folds and the held-out set keep every copy of a pair on one side, and with every pair distinct
they are exactly what they were (no bench figure moves)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from ground.schemas import PairwiseText
from ingest.text_snapshot import copy_groups, split_heldout
from policies.lm.conditions import MixtureTerms, TextPairFeatures, cross_validation_folds, run_text_condition_tests
from policies.lm.mixture_learners import pair_groups

D, CODE = 4, 6


def _old_folds(n: int, seed: int, folds: int = 6) -> list[np.ndarray]:
    """The folds before grouping: a plain permutation cut in `folds` runs."""
    return list(np.array_split(np.random.default_rng(seed).permutation(n), min(folds, n)))


@pytest.mark.parametrize("n", [12, 13, 30, 61])
@pytest.mark.parametrize("seed", [0, 1, 7])
def test_folds_of_distinct_pairs_are_the_folds_of_a_plain_permutation(n: int, seed: int) -> None:
    got = cross_validation_folds(np.arange(n), seed)
    want = _old_folds(n, seed)
    assert len(got) == len(want)
    for mine, theirs in zip(got, want, strict=True):
        np.testing.assert_array_equal(mine, theirs)


def test_copies_of_a_pair_share_one_fold_and_every_pair_is_held_out_once() -> None:
    groups = np.repeat(np.arange(16), 3)[np.random.default_rng(3).permutation(48)]
    folds = cross_validation_folds(groups, 0)
    assert sorted(np.concatenate(folds).tolist()) == list(range(48))
    for fold in folds:
        train = np.setdiff1d(np.arange(48), fold)
        assert not set(groups[fold]) & set(groups[train])


def test_pair_groups_join_copies_whichever_response_was_chosen() -> None:
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "b", "rejected": "a"},
            {"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a", "rejected": "c"},
            {"prompt": "p", "chosen": "a", "rejected": "b"}]
    assert pair_groups(rows).tolist() == [0, 0, 1, 2, 0]
    assert pair_groups(rows[2:4]).tolist() == [0, 1]  # distinct rows: 0..n-1


def _item(i: int, choice: str = "a") -> PairwiseText:
    return PairwiseText(prompt=f"question {i}?", response_a=f"answer {i}", response_b=f"other {i}", choice=choice)


def test_no_held_out_pair_of_the_gate_has_a_copy_in_training_and_distinct_pairs_split_as_before() -> None:
    distinct = [_item(i) for i in range(16)]
    copies = [p for p in distinct for _ in range(3)]  # three annotators, one after another
    copies[1] = copies[1].model_copy(update={"choice": "b"})  # a disagreeing copy is still a copy
    rounds = [p for _ in range(3) for p in distinct]  # rounds of labelling
    for items in (copies, rounds):
        train, held = split_heldout(items)
        assert len(train) + len(held) == len(items) and held and train
        key = {(p.prompt, frozenset((p.response_a, p.response_b))) for p in train}
        assert not [p for p in held if (p.prompt, frozenset((p.response_a, p.response_b))) in key]
    assert copy_groups([_item(0), _item(0, "b"), _item(1)]) == [0, 0, 1]
    train, held = split_heldout(distinct)  # every pair distinct: every third held out, as the store always split
    assert held == distinct[0::3] and train == [t for i, t in enumerate(distinct) if i % 3]


def test_the_gates_held_out_pairs_are_on_prompts_training_never_saw() -> None:
    """Several pairs of responses per prompt (how chat preference data comes): a held-out pair on a training prompt
    scored the gate on what was trained on. With too few prompts to split, pairs still never straddle the split."""
    many = [PairwiseText(prompt=f"question {i % 7}?", response_a=f"answer {i}", response_b=f"other {i}", choice="a")
            for i in range(45)]
    train, held = split_heldout(many)
    assert len(train) + len(held) == 45 and train and held
    assert not {p.prompt for p in held} & {p.prompt for p in train}
    skewed = [p.model_copy(update={"prompt": "question 0?" if i < 100 else f"question {1 + i % 6}?"})
              for i, p in enumerate(many * 3)][:112]  # one prompt holds 100 of 112 pairs
    train, held = split_heldout(skewed)
    assert len(train) == 100 and len(held) == 12 and not {p.prompt for p in held} & {p.prompt for p in train}
    few = [p.model_copy(update={"prompt": f"question {i % 2}?"}) for i, p in enumerate(many[:12])]
    train, held = split_heldout(few)
    assert train and held and len(train) + len(held) == 12
    key = {(p.prompt, p.response_a) for p in train}
    assert not [p for p in held if (p.prompt, p.response_a) in key]


def _features(rng: np.random.Generator, n: int, groups: np.ndarray | None = None) -> TextPairFeatures:
    """Pairs whose labels are coin flips that no feature predicts: only memorising a pair can score them."""
    log_w = np.log(rng.dirichlet(np.ones(D), n))
    chosen, rejected = rng.normal(-10.0, 1.0, (n, D)), rng.normal(-10.0, 1.0, (n, D))
    terms = MixtureTerms(log_w, chosen, rejected, rng.normal(-10.0, 1.0, n), rng.normal(-10.0, 1.0, n),
                         rng.normal(0.0, 1.0, (n, CODE)), 0.5, groups)
    simplex = {name: (log_w + m) - np.logaddexp.reduce(log_w + m, axis=1)[:, None]
               for name, m in (("chosen", chosen), ("rejected", rejected))}
    return TextPairFeatures(simplex["chosen"], simplex["rejected"], rng.normal(0.0, 1.0, (n, 8)),
                            rng.normal(0.0, 1.0, (n, 8)), rng.normal(0.0, 0.3, n), mixture=terms)


def _copies(features: TextPairFeatures, index: np.ndarray, groups: np.ndarray | None) -> TextPairFeatures:
    terms = features.mixture
    assert terms is not None
    arrays = {f.name: getattr(features, f.name)[index] for f in dataclasses.fields(features) if f.name != "mixture"}
    return TextPairFeatures(**arrays, mixture=dataclasses.replace(terms.take(index), groups=groups))


def test_held_out_scores_of_copied_pairs_are_not_read_off_their_copies() -> None:
    """15 distinct pairs labelled 3 times: read as distinct pairs, a copy in the training folds lets expert_only read
    its held-out label off it and the plan flips to expert_only (the audit's case); grouped, it scores no better than
    the other plans on labels nothing predicts."""
    rng = np.random.default_rng(0)
    proxy = _features(rng, 300)
    distinct = _features(rng, 15)
    index = np.repeat(np.arange(15), 3)
    grouped = run_text_condition_tests(_copies(distinct, index, index), proxy, "s", n_expert=45, n_proxy=300)
    leaky = run_text_condition_tests(_copies(distinct, index, None), proxy, "s", n_expert=45, n_proxy=300)
    assert grouped.checks[0].passed  # 45 pairs, 15 distinct: the conditions are tested
    assert leaky.heldout_log_likelihood["expert_only"] > grouped.heldout_log_likelihood["expert_only"] + 0.1
    assert leaky.plan == "expert_only" and grouped.plan != "expert_only"
    assert grouped.heldout_log_likelihood["expert_only"] < -0.693  # a coin's


def test_too_few_distinct_pairs_leave_the_conditions_undecided_however_many_copies() -> None:
    rng = np.random.default_rng(1)
    proxy = _features(rng, 300)
    index = np.repeat(np.arange(10), 4)
    report = run_text_condition_tests(_copies(_features(rng, 10), index, index), proxy, "s", n_expert=40, n_proxy=300)
    assert not report.checks[0].passed and "10 distinct" in report.checks[0].detail
    assert report.heldout_log_likelihood == {}

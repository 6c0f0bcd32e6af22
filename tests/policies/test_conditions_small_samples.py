"""The condition tests and the plan on few, repeated or degenerate expert labels: the sample-size rules, the
12-29-triple adapter band, grouped folds and ties (most found by audits with inputs from outside the benches)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from ground.schemas import FeatureTriple
from ingest.synthetic import appendix_d
from ingest.synthetic_families import appendix_d_family, draw_triples
from policies.features import cross_validation
from policies.features.condition_config import THRESHOLDS
from policies.features.conditions import run_condition_tests
from policies.features.fitting import fit_stage1
from policies.features.model import TwoStagePolicy, triples_to_tensors
from policies.features.recipe import TWO_STAGE
from policies.plan_choice import SMALL_SAMPLE
from tests.policies.test_conditions import _check


@pytest.mark.parametrize("n_proxy", [0, 50])
def test_enough_expert_triples_and_too_few_proxy_ones_plan_expert_only(n_proxy: int) -> None:
    """No proxy model can be built or tested, but the expert triples are enough to learn from: the plan was
    `refuse`, its reason "too few expert triples", which the passed sample-size check contradicted."""
    task = appendix_d(n_proxy=n_proxy, n_expert=60, seed=0)
    report = run_condition_tests(task.expert, task.proxy, "snap")
    assert [c.name for c in report.checks if c.passed] == ["expert_sample_size"]
    assert report.plan == "expert_only" and "enough expert data to learn from alone" in report.reasons[-1]


def test_a_label_given_twice_stays_in_one_fold_and_does_not_sway_the_plan() -> None:
    """Two annotators on one task give the same triple twice. Split over two folds, one copy scored the other and
    the learners that memorise inputs looked near-perfect held out: expert_only was planned (held-out -0.19 against
    -1.24 on the triples once); with copies kept in one fold the plan is the single copy's."""
    task = appendix_d(n_proxy=3000, n_expert=30, seed=1)
    once = run_condition_tests(task.expert, task.proxy, "snap")
    twice = run_condition_tests(task.expert + task.expert, task.proxy, "snap")
    assert once.plan == twice.plan == "two_stage"
    assert twice.heldout_log_likelihood["expert_only"] == pytest.approx(once.heldout_log_likelihood["expert_only"],
                                                                        abs=0.05)


def test_forty_copies_of_one_triple_are_too_few_distinct_inputs_to_test() -> None:
    """Grouped folds put every copy in one fold, leaving nothing to train on: the full path crashed in torch."""
    task = appendix_d(n_proxy=3000, n_expert=30, seed=1)
    report = run_condition_tests([task.expert[0]] * 40, task.proxy, "snap")
    size = _check(report, "expert_sample_size")
    assert not size.passed and "40 expert triples on 1 distinct inputs" in size.detail
    assert report.heldout_log_likelihood == {} and report.plan in ("proxy_as_is", "refuse")


def test_labels_every_plan_fits_almost_perfectly_tie_instead_of_failing_a_check() -> None:
    """Every triple "1 over 0": the plans differ by 1e-4 nats with no spread (p = 0). That failed shared level
    sets, blocked two_stage and chose fine_tune for a 0.0002-nat lead; below TIE_NATS it is a tie."""
    task = appendix_d(n_proxy=600, n_expert=60, seed=0)
    proxy, expert = ([FeatureTriple(x=t.x, y_w=1, y_l=0) for t in triples] for triples in (task.proxy, task.expert))
    report = run_condition_tests(expert, proxy, "one-pair", seed=0)
    assert _check(report, "shared_level_sets").passed
    assert report.plan in ("proxy_as_is", "two_stage")


def _permuted_family(n_expert: int) -> tuple[list[FeatureTriple], list[FeatureTriple]]:
    """The audit's world: the Appendix D family's permuted proxy (seed 101), which agrees with 65% of the first 20
    expert triples yet ranks 0.63 of gold pairs right as is, where its adapter ranks 0.94."""
    world, rng = appendix_d_family(101, "permuted"), np.random.default_rng(102)
    proxy = draw_triples(world, 3000, False, rng)
    return draw_triples(world, n_expert, True, rng), proxy


@pytest.mark.parametrize("world", ["appendix_d", "family_permuted"])
def test_between_the_adapter_and_expert_minimums_a_relabelled_proxy_plans_its_adapter(world: str) -> None:
    """Audit: below min_expert_triples only the proxy's agreement was weighed, so a relabelled proxy was served as is
    (family_permuted: 65% agreement, gold 0.63) or refused (appendix_d: 35%), where the adapter's gold is 0.94. From
    min_adapter_triples the adapter alone is cross-validated against it, as in the text family."""
    if world == "appendix_d":
        task = appendix_d(n_proxy=3000, n_expert=20, seed=1)  # its proxy ranks outputs in a relabelled order
        expert, proxy = task.expert, task.proxy
    else:
        expert, proxy = _permuted_family(20)
    report = run_condition_tests(expert, proxy, "few")
    assert not _check(report, "expert_sample_size").passed and "undecided" in _check(report, "end_to_end").detail
    assert report.plan == "two_stage" and "the adapter alone, cross-validated on the 20" in report.reasons[-1]
    assert set(report.heldout_log_likelihood) == set(SMALL_SAMPLE)


@pytest.mark.parametrize("seed", [1, 2])
def test_between_the_minimums_a_proxy_that_is_the_expert_is_still_served(seed: int) -> None:
    """Expert triples drawn from the proxy itself: the proxy as is, or its adapter when that scores above it
    (it nests the proxy), never a refusal."""
    task = appendix_d(n_proxy=3020, seed=seed)
    report = run_condition_tests(task.proxy[:20], task.proxy[20:], "same", seed=seed)
    assert report.plan in ("proxy_as_is", "two_stage")
    if report.plan == "proxy_as_is":  # the adapter was weighed and lost: the reason says so, not "too few to fit"
        assert "cross-validated on the few there are, does not score above it" in report.reasons[-1]


def test_below_the_adapter_minimum_only_the_proxys_agreement_is_weighed() -> None:
    """One triple short of min_adapter_triples, or one input however often given (a single fold trains on
    nothing), the rule is what it was before the adapter band: the band emptied gives the same report."""
    task = appendix_d(n_proxy=3000, n_expert=THRESHOLDS.min_adapter_triples, seed=1)
    no_band = replace(THRESHOLDS, min_adapter_triples=THRESHOLDS.min_expert_triples)
    for expert in (task.expert[:-1], [task.expert[0]] * THRESHOLDS.min_adapter_triples):
        report = run_condition_tests(expert, task.proxy, "few")
        assert report.heldout_log_likelihood == {} and report.plan == "refuse"  # the relabelled proxy disagrees
        assert report == run_condition_tests(expert, task.proxy, "few", thresholds=no_band)


def test_the_small_sample_cross_validation_fits_only_the_adapter_on_the_same_folds(
        monkeypatch: pytest.MonkeyPatch) -> None:
    expert, proxy = _permuted_family(20)
    xp, wp, lp = triples_to_tensors(proxy)
    xe, we, le = triples_to_tensors(expert)
    torch.manual_seed(0)
    stack = TwoStagePolicy(TWO_STAGE.config(xp.shape[1], 3))  # the permuted proxy has three outputs
    fit_stage1(stack, xp, wp, lp, 0, replace(TWO_STAGE.proxy_stage, steps=100))
    stack.freeze_proxy()
    full = cross_validation.cross_validate(stack, xe, we, le, seed=0)
    for other in ("_fit_augmented", "_fit_fine_tune", "fit_direct"):
        monkeypatch.setattr(cross_validation, other, lambda *_: pytest.fail("fitted a learner not asked for"))
    small = cross_validation.cross_validate(stack, xe, we, le, seed=0, learners=SMALL_SAMPLE)
    assert set(small.ll) == set(small.correct) == set(SMALL_SAMPLE)
    for name in SMALL_SAMPLE:
        np.testing.assert_array_equal(small.ll[name], full.ll[name])
        np.testing.assert_array_equal(small.correct[name], full.correct[name])


def test_a_negative_seed_is_refused_clearly() -> None:
    """numpy's bare "expected non-negative integer" came from deep inside before."""
    task = appendix_d(n_proxy=10, n_expert=2, seed=0)
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        run_condition_tests(task.expert, task.proxy, "snap", seed=-1)

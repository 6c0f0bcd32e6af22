"""Specification of the condition tests and the plan rule on synthetic worlds with known truth."""

from __future__ import annotations

import pytest
import torch

from ingest.conditions import CHECK_NAMES, MIN_EXPERT_TRIPLES, choose_plan, run_condition_tests
from ingest.schemas import ConditionCheck, ConditionReport
from ingest.synthetic import appendix_d


def _report(variant: str, seed: int, n_expert: int = 48) -> ConditionReport:
    task = appendix_d(n_proxy=3000, n_expert=n_expert, seed=seed, variant=variant)
    return run_condition_tests(task.expert, task.proxy, f"{variant}-{seed}", seed=seed, n_outputs=task.n_outputs)


def _check(report: ConditionReport, name: str) -> ConditionCheck:
    return next(c for c in report.checks if c.name == name)


def test_ok_world_passes_every_check_and_plans_two_stage() -> None:
    report = _report("ok", seed=1)
    assert [c.name for c in report.checks] == list(CHECK_NAMES)
    assert all(c.passed for c in report.checks), [c.detail for c in report.checks if not c.passed]
    assert report.plan == "two_stage"
    assert (report.n_expert, report.n_proxy, report.snapshot_id) == (48, 3000, "ok-1")
    assert "p=" in _check(report, "shared_level_sets").detail
    assert "bootstrap" in _check(report, "similarity_preserved").detail


def test_merged_level_sets_fail_and_block_two_stage() -> None:
    report = _report("merged_level_sets", seed=0)
    assert not _check(report, "shared_level_sets").passed
    assert report.plan != "two_stage"
    assert any(r.startswith("shared_level_sets failed") for r in report.reasons)


@pytest.mark.parametrize(
    ("variant", "broken"),
    [
        ("missing_image", "image_containment"),
        ("high_dim", "low_dimensional_encoding"),
        ("large_L", "similarity_preserved"),
    ],
)
def test_each_broken_condition_is_caught_by_its_own_check(variant: str, broken: str) -> None:
    report = _report(variant, seed=0)
    assert not _check(report, broken).passed
    assert report.plan == "expert_only"


def test_five_expert_labels_are_too_few_to_decide() -> None:
    report = _report("ok", seed=1, n_expert=5)
    size = _check(report, "expert_sample_size")
    assert not size.passed and size.statistic == 5 and size.threshold == MIN_EXPERT_TRIPLES
    assert "too little expert data" in size.detail
    assert "undecided" in _check(report, "shared_level_sets").detail
    # The ok world's proxy ranks outputs in a relabelled order, so it disagrees with the experts.
    assert report.plan == "refuse"


def test_condition_tests_are_deterministic_and_leave_torch_state_alone() -> None:
    threads = torch.get_num_threads()
    torch.manual_seed(5)
    expected = torch.rand(2)
    torch.manual_seed(5)
    first = _report("ok", seed=2, n_expert=6)
    assert torch.get_num_threads() == threads
    torch.testing.assert_close(torch.rand(2), expected)
    assert first == _report("ok", seed=2, n_expert=6)


def test_output_ids_beyond_n_outputs_are_refused() -> None:
    task = appendix_d(n_proxy=10, n_expert=2, seed=0)
    with pytest.raises(ValueError, match="out of range for n_outputs=2"):
        run_condition_tests(task.expert, task.proxy, "s", n_outputs=2)


def _checks(failing: frozenset[str] = frozenset(), n_expert: int = 48) -> list[ConditionCheck]:
    return [
        ConditionCheck(
            name=name,
            passed=name not in failing and (name != "expert_sample_size" or n_expert >= MIN_EXPERT_TRIPLES),
            statistic=0.0,
            threshold=0.0,
            detail="",
        )
        for name in CHECK_NAMES
    ]


def test_plan_rule() -> None:
    assert choose_plan(_checks(), 0.4, proxy_matches=False)[0] == "two_stage"
    assert choose_plan(_checks(), 0.9, proxy_matches=True)[0] == "proxy_as_is"
    assert choose_plan(_checks(frozenset({"end_to_end"})), 0.4, proxy_matches=False)[0] == "expert_only"
    assert choose_plan(_checks(n_expert=5), 0.8, proxy_matches=False)[0] == "proxy_as_is"
    assert choose_plan(_checks(n_expert=5), 0.2, proxy_matches=False)[0] == "refuse"
    assert (
        choose_plan(_checks(frozenset({"low_dimensional_encoding"}), n_expert=5), 0.8, proxy_matches=False)[0]
        == "refuse"
    )

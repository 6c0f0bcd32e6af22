"""Which outputs a feature fit uses (policies/features/outputs.py): a stray proxy output id is dropped with its
triples; proxy outputs the expert never gives but many proxy triples use (`more_outputs`) are kept."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from ground.schemas import FeatureTriple
from ingest.synthetic import appendix_d
from ingest.synthetic_families import appendix_d_family, draw_triples
from policies.features.conditions import run_condition_tests
from policies.features.outputs import STRAY_FLOOR, is_stray, output_support, stray_floor

STRAY = FeatureTriple(x=[0.1] * 5, y_w=7, y_l=1)


def test_one_stray_proxy_event_is_dropped_with_a_warning_naming_its_id_and_count(caplog):
    task = appendix_d(n_proxy=400, n_expert=36, seed=0)
    proxy = [*task.proxy[:200], STRAY, *task.proxy[200:]]
    with caplog.at_level(logging.WARNING, logger="proxyloop.policies.features"):
        support = output_support(task.expert, proxy)
    assert support.n_outputs == 3 and support.proxy == task.proxy
    assert support.dropped_ids == (7,) and support.n_dropped == 1
    assert "dropping 1 of 401 proxy triples" in caplog.text and "[7]" in caplog.text and "from 3 to 8" in caplog.text


def test_clean_labels_are_left_as_they_are_without_a_warning(caplog):
    task = appendix_d(n_proxy=400, n_expert=36, seed=0)
    with caplog.at_level(logging.WARNING, logger="proxyloop.policies.features"):
        support = output_support(task.expert, task.proxy)
    assert support.n_outputs == 3 and support.proxy == task.proxy and support.dropped_ids == ()
    assert not caplog.text


def test_more_outputs_proxies_keep_the_outputs_the_expert_never_gives():
    world = appendix_d_family(101, "more_outputs")
    rng = np.random.default_rng(0)
    proxy, expert = draw_triples(world, 2000, False, rng), draw_triples(world, 35, True, rng)
    assert max(max(t.y_w, t.y_l) for t in expert) <= 2
    support = output_support(expert, proxy)
    assert support.n_outputs == 6 and support.proxy == proxy and support.dropped_ids == ()


def test_an_output_an_expert_uses_is_never_dropped():
    task = appendix_d(n_proxy=400, n_expert=36, seed=0)
    expert = [*task.expert, FeatureTriple(x=[0.0] * 5, y_w=7, y_l=0)]
    support = output_support(expert, [*task.proxy, STRAY])
    assert support.n_outputs == 8 and support.dropped_ids == () and len(support.proxy) == 401


@pytest.mark.parametrize(("uses", "n_proxy", "stray"), [
    (4, 400, True), (5, 400, False),  # the floor of 5 triples
    (9, 10_000, True), (10, 10_000, False),  # 0.1% of a large snapshot
    (3, 40, False), (2, 40, True),  # never more than 5% of a small one
])
def test_the_stray_rule(uses, n_proxy, stray):
    assert stray_floor(400) == STRAY_FLOOR and stray_floor(10_000) == 10
    assert is_stray(uses, n_proxy) is stray


def test_the_condition_tests_fit_on_the_same_triples_with_or_without_the_stray_event():
    task = appendix_d(n_proxy=400, n_expert=36, seed=0)
    clean = run_condition_tests(task.expert, task.proxy, "s", seed=0)
    stray = run_condition_tests(task.expert, [*task.proxy, STRAY], "s", seed=0)
    assert stray.n_proxy == 401 and stray.plan == clean.plan
    assert stray.checks == clean.checks and stray.heldout_log_likelihood == clean.heldout_log_likelihood


def test_a_caller_that_names_n_outputs_declares_y_and_nothing_is_dropped():
    task = appendix_d(n_proxy=400, n_expert=36, seed=0)
    with pytest.raises(ValueError, match="out of range for n_outputs=3"):
        run_condition_tests(task.expert, [*task.proxy, STRAY], "s", n_outputs=3)

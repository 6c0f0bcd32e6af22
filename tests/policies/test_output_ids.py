"""Output ids are names, not positions (policies/features/outputs.py): the condition tests and the worker fit the ids
a snapshot uses as 0..K-1, so {1, 2, 3} (paper 1's own Y) or {7, 40, 99} give the verdicts and the policy that
{0, 1, 2} gives; what is saved answers over the ids by name, and an id no triple used is never an answer."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from ground.schemas import FeatureTriple, TrainingRequest
from ingest.synthetic import appendix_d
from policies.features.acquisition import answered_outputs, feature_scores, usable_triples
from policies.features.conditions import run_condition_tests
from policies.features.fitting import fit_stage1
from policies.features.model import DirectPolicy, TwoStageConfig, TwoStagePolicy, triples_to_tensors
from policies.features.outputs import output_support, widened
from policies.features.recipe import TWO_STAGE
from policies.loader import load_policy_dir
from workers.features.tasks import train_feature_policy

pytestmark = pytest.mark.usefixtures("one_thread")


def renamed(triples: list[FeatureTriple], names: tuple[int, ...]) -> list[FeatureTriple]:
    return [t.model_copy(update={"y_w": names[t.y_w], "y_l": names[t.y_l]}) for t in triples]


def test_renaming_the_outputs_changes_no_verdict_and_the_report_names_the_ids():
    task = appendix_d(n_proxy=1000, n_expert=40, seed=100)
    plain = run_condition_tests(task.expert, task.proxy, "s")
    names = (7, 40, 99)
    named = run_condition_tests(renamed(task.expert, names), renamed(task.proxy, names), "s")
    assert named.plan == plain.plan
    assert [(c.name, c.passed, c.statistic) for c in named.checks] == [(c.name, c.passed, c.statistic)
                                                                        for c in plain.checks]
    assert named.heldout_log_likelihood == plain.heldout_log_likelihood
    image = next(c for c in named.checks if c.name == "image_containment")
    assert "[7, 40, 99]" in image.detail


def test_the_support_renames_ids_to_indices_and_back():
    triples = [FeatureTriple(x=[0.0], y_w=40, y_l=7), FeatureTriple(x=[1.0], y_w=99, y_l=40)]
    support = output_support(triples, [])
    assert support.ids == (7, 40, 99) and support.n_outputs == 100 and support.n_fitted == 3
    assert [(t.y_w, t.y_l) for t in support.dense(triples)] == [(1, 0), (2, 1)]
    assert output_support([], []).ids == (0, 1) and output_support([], []).n_outputs == 2  # two outputs at least


@pytest.mark.parametrize("model", [TwoStagePolicy(TwoStageConfig(input_dim=2, n_outputs=3)), DirectPolicy(2, 3, 8)])
def test_a_widened_model_answers_the_used_ids_as_the_fitted_one_and_never_an_unused_one(model):
    support = output_support([FeatureTriple(x=[0.0, 0.0], y_w=1, y_l=3), FeatureTriple(x=[0.0, 0.0], y_w=6, y_l=1)],
                             [])
    wide = widened(model, support)
    x = torch.randn(64, 2)
    with torch.no_grad():
        narrow_lp, wide_lp = model.log_probs(x), wide.log_probs(x)
    assert wide_lp.shape == (64, 7)
    assert torch.allclose(wide_lp[:, [1, 3, 6]], narrow_lp, atol=1e-5)
    assert torch.isfinite(wide_lp).all() and wide_lp[:, [0, 2, 4, 5]].exp().max() == 0.0
    plain = [FeatureTriple(x=[0.0, 0.0], y_w=0, y_l=1), FeatureTriple(x=[0.0, 0.0], y_w=2, y_l=1)]
    assert widened(model, output_support(plain, [])) is model
    with pytest.raises(ValueError, match="3 outputs"):
        widened(model, output_support(plain[:1], []))


def test_the_worker_trains_renamed_outputs_as_the_plain_ones_and_saves_them_by_name(tmp_path):
    task = appendix_d(n_proxy=400, n_expert=36, seed=0)
    names = (1, 2, 3)
    x = torch.tensor([t.x for t in task.expert_heldout[:50]])
    answers = {}
    for label, mapping in (("plain", (0, 1, 2)), ("named", names)):
        request = TrainingRequest(run_id=label, snapshot_id="s", store_url="sqlite://", plan="two_stage",
                                  output_dir=str(tmp_path / label), stage1_epochs=20, stage2_epochs=10,
                                  checkpoint_every=10)
        result = train_feature_policy(request, renamed(task.proxy, mapping), renamed(task.expert[:24], mapping),
                                      torch.device("cpu"), "w", lambda _: None)
        final = Path(result.checkpoints[-1].path)
        assert json.loads((final / "config.json").read_text())["model"]["n_outputs"] == mapping[-1] + 1
        with torch.no_grad():
            answers[label] = load_policy_dir(final).log_probs(x)  # type: ignore[operator]
    assert torch.allclose(answers["named"][:, 1:], answers["plain"], atol=1e-5)
    assert answers["named"][:, 0].exp().max() == 0.0  # id 0 names nothing: never an answer


def test_acquisition_scores_of_a_policy_saved_by_name_are_those_of_the_fitted_one():
    """Before any label the scores weigh the relabellings of the policy's outputs: an id no triple used is not one."""
    task = appendix_d(n_proxy=400, n_expert=0, seed=0)
    torch.manual_seed(0)
    stack = TwoStagePolicy(TwoStageConfig(input_dim=5, n_outputs=3))
    fit_stage1(stack, *triples_to_tensors(task.proxy), 0, TWO_STAGE.proxy_stage)
    names = (1, 2, 3)
    wide = widened(stack, output_support([], renamed(task.proxy, names)))
    tasks = task.expert_heldout[:20]
    x = np.array([t.x for t in tasks])
    y_a, y_b = np.array([t.y_w for t in tasks]), np.array([t.y_l for t in tasks])
    fitted = feature_scores(stack, [], x, y_a, y_b)
    saved = feature_scores(wide, [], x, np.array(names)[y_a], np.array(names)[y_b])
    assert fitted.method == saved.method == "relabellings"
    np.testing.assert_allclose(saved.scores, fitted.scores, atol=1e-6)
    np.testing.assert_allclose(saved.prob_a, fitted.prob_a, atol=1e-6)


def test_labels_naming_an_output_the_saved_policy_never_answers_are_not_scored_against_it(caplog):
    """Id 0 of a policy saved over {1, 2, 3}: probability 0, so a label naming it would enter the adapter's refit with
    a loss near 1e4 nats; it is left out with the warning labels of a newer release's outputs get."""
    stack = TwoStagePolicy(TwoStageConfig(input_dim=2, n_outputs=3))
    wide = widened(stack, output_support([FeatureTriple(x=[0.0, 0.0], y_w=1, y_l=2),
                                          FeatureTriple(x=[0.0, 0.0], y_w=3, y_l=1)], []))
    assert answered_outputs(wide) == [1, 2, 3]
    labels = [FeatureTriple(x=[0.1, 0.2], y_w=1, y_l=3), FeatureTriple(x=[0.3, 0.4], y_w=0, y_l=2)]
    with caplog.at_level(logging.WARNING, logger="proxyloop.policies.features"):
        assert usable_triples(wide, labels) == labels[:1]
    assert "1 naming an output the policy does not answer (it answers [1, 2, 3]" in caplog.text

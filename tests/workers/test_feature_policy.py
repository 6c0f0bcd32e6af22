import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from ground.schemas import TrainingRequest
from ingest.synthetic import appendix_d
from policies.features.fitting import fit_stage1
from policies.features.model import TwoStagePolicy, triples_to_tensors
from policies.features.recipe import TWO_STAGE, fit_two_stage_adapter, resolve_recipe
from policies.loader import load_policy_dir
from workers.features.evaluate import evaluate_checkpoint
from workers.features.tasks import expert_steps, train_feature_policy

pytestmark = pytest.mark.usefixtures("one_thread")


def _request(tmp_path, plan, **kw):
    return TrainingRequest(run_id="r1", snapshot_id="s", store_url="sqlite://", plan=plan, output_dir=str(tmp_path),
                           stage1_epochs=60, stage2_epochs=40, checkpoint_every=20, **kw)


def test_two_stage_checkpoints_change_only_the_adapter_after_stage_one(tmp_path):
    task = appendix_d(n_proxy=400, n_expert=30, seed=1)
    progress = []
    result = train_feature_policy(_request(tmp_path, "two_stage"), task.proxy, task.expert, torch.device("cpu"),
                                  "w", progress.append)
    assert [c.step for c in result.checkpoints] == [0, 20, 40]
    after_proxy = load_file(f"{result.checkpoints[0].path}/model.safetensors")
    final = load_file(f"{result.checkpoints[-1].path}/model.safetensors")
    changed = {k for k in final if not torch.equal(final[k], after_proxy[k])}
    assert changed and all(k.startswith("adapter.") for k in changed)
    assert {p["stage"] for p in progress} == {"proxy", "expert"}
    assert result.device == "cpu"


def test_expert_only_plan_trains_a_direct_policy_that_loads_back(tmp_path):
    task = appendix_d(n_proxy=10, n_expert=30, seed=2)
    result = train_feature_policy(_request(tmp_path, "expert_only"), task.proxy, task.expert, torch.device("cpu"),
                                  "w", lambda _: None)
    assert [c.step for c in result.checkpoints] == [20, 40]
    model = load_policy_dir(result.checkpoints[-1].path)
    assert model.log_probs(torch.zeros(2, 5)).shape == (2, 3)
    evaluation = evaluate_checkpoint(result.checkpoints[-1], task.expert_heldout)
    assert evaluation.topk_mass is None  # 3 outputs ≤ k: the top-k mass would be 1 whatever the policy
    assert 0 < evaluation.topk_entropy <= 1.6


def test_same_seed_gives_the_same_weights(tmp_path):
    task = appendix_d(n_proxy=200, n_expert=20, seed=3)
    runs = [train_feature_policy(_request(tmp_path / str(i), "two_stage"), task.proxy, task.expert,
                                 torch.device("cpu"), "w", lambda _: None) for i in range(2)]
    a, b = (load_file(f"{r.checkpoints[-1].path}/model.safetensors") for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_stage_run_follows_the_recipe_the_condition_tests_score(tmp_path):
    """Worker weights equal a hand-run of the bench's recipe (policies.features.recipe): stage 1, then the
    adapter with its prior chosen by cross-validation on the expert triples, bagged and distilled on the proxy
    triples' inputs."""
    task = appendix_d(n_proxy=300, n_expert=30, seed=4)
    result = train_feature_policy(_request(tmp_path, "two_stage"), task.proxy, task.expert, torch.device("cpu"),
                                  "w", lambda _: None)
    torch.manual_seed(0)
    short = replace(TWO_STAGE, proxy_stage=replace(TWO_STAGE.proxy_stage, steps=60),
                    adapter_stage=replace(TWO_STAGE.adapter_stage, steps=40))
    model = TwoStagePolicy(short.config(5, 3))
    proxy = triples_to_tensors(task.proxy)
    fit_stage1(model, *proxy, 0, short.proxy_stage)
    fit_two_stage_adapter(model, *triples_to_tensors(task.expert), 0, short, unlabelled=proxy[0])
    final = load_file(f"{result.checkpoints[-1].path}/model.safetensors")
    for name, value in model.state_dict().items():
        torch.testing.assert_close(final[name], value)


def test_fine_tune_moves_every_weight_from_the_stage_one_checkpoint(tmp_path):
    task = appendix_d(n_proxy=300, n_expert=30, seed=5)
    result = train_feature_policy(_request(tmp_path, "fine_tune"), task.proxy, task.expert, torch.device("cpu"),
                                  "w", lambda _: None)
    assert [c.step for c in result.checkpoints] == [0, 20, 40]
    after_proxy = load_file(f"{result.checkpoints[0].path}/model.safetensors")
    final = load_file(f"{result.checkpoints[-1].path}/model.safetensors")
    # Buffers, not weights: the adapter's centre, and the input scaling fitted once in stage 1.
    weights = [k for k in final if ".centre_" not in k and not k.startswith("inputs.")]
    assert len(weights) == len(final) - 5
    assert all(not torch.equal(final[k], after_proxy[k]) for k in weights)


def test_curve_records_every_step_of_both_stages(tmp_path):
    task = appendix_d(n_proxy=200, n_expert=30, seed=6)
    train_feature_policy(_request(tmp_path, "two_stage"), task.proxy, task.expert, torch.device("cpu"), "w",
                         lambda _: None)
    curve = json.loads((tmp_path / "curve.json").read_text())
    assert [c["step"] for c in curve if c["stage"] == "proxy"] == list(range(1, 61))
    assert [c["step"] for c in curve if c["stage"] == "expert"] == list(range(1, 41))


def test_a_plain_training_request_runs_exactly_the_recipe_the_bench_reports(tmp_path):
    """What flows/retrain.py sends (no step counts, no adapter size) resolves to bench/appendix_d.py's recipe."""
    from bench.appendix_d import RECIPE

    plain = TrainingRequest(run_id="r", snapshot_id="s", store_url="sqlite://", plan="two_stage",
                            output_dir=str(tmp_path), seed=0)
    assert RECIPE is TWO_STAGE
    assert resolve_recipe(plain) == RECIPE
    assert expert_steps("two_stage", plain, resolve_recipe(plain)) == RECIPE.adapter_stage.steps
    assert RECIPE.proxy_stage.steps == 600 and RECIPE.adapter_stage.steps == 300 and RECIPE.simplex_dim == 3
    shortened = resolve_recipe(_request(tmp_path, "two_stage"))
    assert shortened.proxy_stage.steps == 60 and shortened.adapter_stage.steps == 40
    assert replace(shortened, proxy_stage=RECIPE.proxy_stage, adapter_stage=RECIPE.adapter_stage) == RECIPE

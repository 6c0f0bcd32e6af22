"""The plan decides what a chat retrain trains on after stage 1, and from which model."""

import pytest

from flows.chat import chat_recipe
from ground.settings import Settings
from workers.lm.plans import LMRecipe, plan_request, recipe_request
from workers.lm.training.dpo_config import DPOConfig

PATHS = {"run_id": "r", "base_model": "/models/base", "stage1_checkpoint": "/runs/r/stage1/checkpoint-000040",
         "expert_pairs": "/runs/r/data/expert.jsonl", "output_dir": "/runs/r/lm"}


def test_each_plan_trains_the_right_part_of_the_right_model_on_the_expert_pairs():
    recipe = LMRecipe()
    two_stage = plan_request("two_stage", recipe, **PATHS)
    fine_tune = plan_request("fine_tune", recipe, **PATHS)
    expert_only = plan_request("expert_only", recipe, **PATHS)
    assert two_stage is not None and fine_tune is not None and expert_only is not None
    assert {r.dataset for r in (two_stage, fine_tune, expert_only)} == {PATHS["expert_pairs"]}
    assert two_stage.base_model == fine_tune.base_model == PATHS["stage1_checkpoint"]
    assert expert_only.base_model == PATHS["base_model"]  # no proxy data at all
    assert DPOConfig.from_dict(two_stage.config).train_parts == "adapter"
    assert DPOConfig.from_dict(fine_tune.config).train_parts == "all"
    assert DPOConfig.from_dict(two_stage.config).learning_rate == recipe.adapter_learning_rate
    assert plan_request("proxy_as_is", recipe, **PATHS) is None  # the stage-1 model is the policy
    with pytest.raises(ValueError, match="refuse"):
        plan_request("refuse", recipe, **PATHS)


def test_stage_1_adds_the_bottleneck_and_trains_on_the_proxy_pairs():
    recipe = LMRecipe(simplex_dim=6)
    stage1 = recipe_request("stage1", recipe, run_id="r-stage1", base_model="/models/base",
                            dataset="/runs/r/data/proxy.jsonl", output_dir="/runs/r/stage1")
    config = DPOConfig.from_dict(stage1.config)
    assert (config.simplex_dim, config.train_parts, stage1.dataset) == (6, "all", "/runs/r/data/proxy.jsonl")
    pooled = DPOConfig.from_dict(recipe_request("pooled", recipe, run_id="p", base_model="/m", dataset="/d",
                                                output_dir="/o").config)
    assert pooled.simplex_dim == 0


def test_the_flow_uses_the_bench_recipe_unless_settings_override_it():
    bottleneck = {"chat_reading": "bottleneck"}
    assert chat_recipe(Settings(training_seed=3, **bottleneck)) == LMRecipe(seed=3)
    assert chat_recipe(Settings(chat_recipe={"proxy_learning_rate": 1e-5}, **bottleneck)).proxy_learning_rate == 1e-5
    with pytest.raises(ValueError, match="unknown keys"):
        chat_recipe(Settings(chat_recipe={"learning_rat": 1e-5}, **bottleneck))

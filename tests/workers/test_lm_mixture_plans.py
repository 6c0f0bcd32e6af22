"""Under the mode-mixture reading (the chat flow's default) each plan's request carries the right mixture stage;
expert_only and pooled stay full-model DPO of the base with LMRecipe's settings."""

import pytest

from flows.chat import chat_recipe
from ground.settings import Settings
from workers.lm.mixture_run import parse_mixture_config
from workers.lm.plans import LMRecipe, MixtureRecipe, plan_request, reading_recipe, recipe_request
from workers.lm.training.dpo_config import DPOConfig

PATHS = {"run_id": "r", "base_model": "/models/base", "stage1_checkpoint": "/runs/r/stage1/checkpoint-000040",
         "expert_pairs": "/runs/r/data/expert.jsonl", "output_dir": "/runs/r/lm"}


def test_each_mixture_plan_trains_its_stage_from_the_right_model():
    recipe = MixtureRecipe(seed=4)
    stage1 = recipe_request("stage1", recipe, run_id="r-stage1", base_model="/models/base",
                            dataset="/runs/r/data/proxy.jsonl", output_dir="/runs/r/stage1")
    assert parse_mixture_config(stage1.config) == ("proxy", recipe)
    assert (stage1.base_model, stage1.dataset) == ("/models/base", "/runs/r/data/proxy.jsonl")
    assert plan_request("proxy_as_is", recipe, **PATHS) is None
    for plan, stage in (("two_stage", "adapter"), ("fine_tune", "all")):
        request = plan_request(plan, recipe, **PATHS)
        assert request is not None and parse_mixture_config(request.config) == (stage, recipe)
        assert (request.base_model, request.dataset) == (PATHS["stage1_checkpoint"], PATHS["expert_pairs"])
    with pytest.raises(ValueError, match="refuse"):
        plan_request("refuse", recipe, **PATHS)


def test_expert_only_and_pooled_are_the_full_model_dpo_they_are_in_the_bottleneck_reading():
    recipe = MixtureRecipe(seed=4)
    expert_only = plan_request("expert_only", recipe, **PATHS)
    assert expert_only is not None and expert_only.base_model == PATHS["base_model"]
    assert expert_only.config == plan_request("expert_only", LMRecipe(seed=4), **PATHS).config
    config = DPOConfig.from_dict(expert_only.config)  # a plain DPO config: no reading, no bottleneck
    assert (config.simplex_dim, config.train_parts, config.learning_rate) == (0, "all", LMRecipe.expert_learning_rate)
    pooled = recipe_request("pooled", recipe, run_id="p", base_model="/m", dataset="/d", output_dir="/o")
    assert DPOConfig.from_dict(pooled.config).simplex_dim == 0


def test_the_flow_reads_the_mixture_by_default_and_validates_overrides_against_its_recipe():
    assert chat_recipe(Settings(training_seed=3)) == MixtureRecipe(seed=3)
    assert chat_recipe(Settings(chat_recipe={"adapter_epochs": 4})).adapter_epochs == 4
    with pytest.raises(ValueError, match="PROXYLOOP_CHAT_RECIPE: unknown keys"):
        chat_recipe(Settings(chat_recipe={"stage1_parts": "bottleneck"}))  # a bottleneck key
    assert isinstance(chat_recipe(Settings(chat_reading="bottleneck")), LMRecipe)


@pytest.mark.parametrize("reading", ["mixture", "bottleneck"])
@pytest.mark.parametrize("overrides, message", [
    ({"beta": "high"}, "beta must be a finite number"), ({"proxy_epochs": -3}, "proxy_epochs must be positive"),
    ({"batch_size": 0}, "batch_size must be positive"), ({"simplex_dim": 1}, "simplex_dim must be at least 2"),
    ({"batch_size": 8.5}, "batch_size must be an integer"), ({"beta": float("nan")}, "finite"),
])
def test_a_recipe_override_the_worker_could_not_use_is_refused_when_read(reading, overrides, message) -> None:
    """PROXYLOOP_CHAT_RECIPE values like these passed every check and reached the worker's config unchanged."""
    with pytest.raises(ValueError, match=message):
        reading_recipe(reading, overrides)
    assert reading_recipe(reading, {"seed": 0, "checkpoint_every": 0, "beta": 1}).beta == 1

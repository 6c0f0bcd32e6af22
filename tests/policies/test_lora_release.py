"""A LoRA run is released as its adapter plus a checked reference to its base, and served by the
OpenAI-compatible endpoint; merged and unmerged serving compute the same model."""

import json
import shutil
from pathlib import Path

import openai
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from ground.schemas import LMTrainingRequest
from ingest.bus import ensure_topics
from policies.lm.chat import load_chat_policy
from policies.lm.lora import BASE_REFERENCE, load_lora_dir
from policies.lm.release import release_causal_lm
from policies.lm.simplex_bottleneck import load_causal_lm_dir
from proxyloop.http import create_app
from tests.workers.lm_helpers import tiny_model_dir, write_pairs
from workers.lm.training.run import run_lm_training

pytestmark = pytest.mark.integration

LORA = {"lora_r": 4, "learning_rate": 5e-2, "batch_size": 4, "max_steps": 4, "max_length": 64}


def test_a_lora_run_is_released_with_its_base_reference_and_served(service_settings, kafka, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir(), base)  # the test's own base, so it can change it below
    data = write_pairs(tmp_path / "pairs.jsonl", 8)
    run = run_lm_training(LMTrainingRequest(run_id="lora", method="dpo", base_model=str(base), dataset=str(data),
                                            output_dir=str(tmp_path / "run"), config=LORA), lambda _: None)
    settings = service_settings.model_copy(update={
        "registry_url": str(tmp_path / "registry"), "topic_policy_released": "released-lora", "api_keys": "k",
        "chat_policy_name": "lora-chat"})
    ensure_topics(settings)
    version = release_causal_lm(settings, Path(run["checkpoints"][-1]), {"run": "lora"})

    model_dir = Path(version.path) / "model"
    assert (model_dir / "adapter_model.safetensors").exists()
    assert not (model_dir / "model.safetensors").exists()  # the adapter is released, not a copy of the base
    assert json.loads((model_dir / BASE_REFERENCE).read_text())["path"] == str(base)

    http = TestClient(create_app(settings))
    client = openai.OpenAI(base_url=f"{http.base_url}/v1", api_key="k", http_client=http, max_retries=0)
    completion = client.chat.completions.create(model="lora-chat@production", max_tokens=6, temperature=0,
                                                messages=[{"role": "user", "content": "What is 2 plus 3?"}])
    assert completion.model == "lora-chat@1" and completion.usage.completion_tokens > 0

    ids = torch.tensor([[1, 5, 9, 14, 3]])
    with torch.no_grad():
        merged = load_chat_policy(settings.registry_dir, "lora-chat", merge_lora=True).model(input_ids=ids).logits
        unmerged = load_chat_policy(settings.registry_dir, "lora-chat", merge_lora=False).model(input_ids=ids).logits
        plain_base = load_causal_lm_dir(base)(input_ids=ids).logits
    assert torch.allclose(merged, unmerged, atol=1e-5)
    assert not torch.allclose(merged, plain_base, atol=1e-4)  # the adapter is applied

    weights = load_file(str(base / "model.safetensors"))
    save_file({k: v + 0.01 for k, v in weights.items()}, str(base / "model.safetensors"))  # another base
    with pytest.raises(ValueError, match="not the one the adapter"):
        load_lora_dir(model_dir)

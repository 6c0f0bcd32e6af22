"""A mode-mixture checkpoint is released like any other (without its optimiser state) and served: each request
draws its mode with its own generator, so a seeded request gives the same text twice, also through the
OpenAI-compatible endpoint."""

from pathlib import Path

import openai
import torch
from fastapi.testclient import TestClient

from policies.lm import release
from policies.lm.chat import load_chat_policy
from policies.lm.decoding import Sampling
from policies.lm.mode_mixture import SPEC_FILE, WEIGHTS_FILE, kept_prompt, prompt_log_weights
from proxyloop.http import create_app
from proxyloop.testing import isolated_settings
from tests.workers.lm_helpers import tiny_model_dir, write_pairs
from workers.lm.plans import MixtureRecipe, recipe_request
from workers.lm.training.run import run_lm_training

QUESTION = [{"role": "user", "content": "What is 2 plus 3?"}]


def test_a_released_mixture_streams_and_a_seeded_request_repeats(tmp_path, monkeypatch):
    monkeypatch.setattr(release, "announce", lambda *_, **__: None)  # Kafka's part is tested with the bottleneck
    recipe = MixtureRecipe(simplex_dim=3, batch_size=4, proxy_epochs=2, checkpoint_every=2)
    request = recipe_request("stage1", recipe, run_id="mix", base_model=str(tiny_model_dir()),
                             dataset=str(write_pairs(tmp_path / "pairs.jsonl", 8)), output_dir=tmp_path / "mix")
    checkpoint = Path(run_lm_training(request, lambda _: None)["checkpoints"][-1])
    assert (checkpoint / "optimizer.safetensors").exists() and (checkpoint / "state.json").exists()
    settings = isolated_settings(tmp_path / "home", api_keys="k", registry_url=str(tmp_path / "registry"),
                                 chat_policy_name="mix-chat")
    version = release.release_causal_lm(settings, checkpoint, {"run": "mix"})

    model_dir = Path(version.path) / "model"
    assert (model_dir / WEIGHTS_FILE).exists() and (model_dir / SPEC_FILE).exists()
    assert (model_dir / "model.safetensors").exists() and (model_dir / "tokenizer.json").exists()
    assert not {p.name for p in model_dir.iterdir()} & release.TRAINING_ONLY

    policy = load_chat_policy(settings.registry_dir, "mix-chat")
    assert policy.mixture is not None and policy.mode_biases is not None and policy.mode_biases.shape[0] == 3
    greedy = policy.mode_bias(QUESTION, 0.0, None)
    assert greedy is not None and any(torch.equal(greedy, row) for row in policy.mode_biases)
    # w(x) reads a long prompt cut as training cut it (its end, at the recipe's max_length), not whole
    assert policy.prompt_cap == recipe.max_length
    long = [{"role": "user", "content": "What is 2 plus 3? " * 200}]
    text_ids = policy.tokenizer(policy.tokenizer.apply_chat_template(long, tokenize=False, add_generation_prompt=True),
                                add_special_tokens=False)["input_ids"]
    assert len(text_ids) > recipe.max_length
    cut = prompt_log_weights(policy.mixture, policy.model, kept_prompt(text_ids, recipe.max_length))
    assert torch.equal(policy.mode_bias(long, 0.0, None), policy.mode_biases[int(cut.argmax())])

    def text(seed):
        return "".join(piece.text for piece in policy.generate(QUESTION, Sampling(max_tokens=8, temperature=1.0,
                                                                                    seed=seed)))

    assert text(5) == text(5)
    assert len({text(seed) for seed in range(6)}) > 1  # sampling: the seed matters

    http = TestClient(create_app(settings))
    client = openai.OpenAI(base_url=f"{http.base_url}/v1", api_key="k", http_client=http, max_retries=0)
    answers = [client.chat.completions.create(model="mix-chat@production", messages=QUESTION, max_tokens=8,
                                              temperature=1.0, seed=11) for _ in range(2)]
    assert answers[0].model == "mix-chat@1" and answers[0].usage.completion_tokens > 0
    assert answers[0].choices[0].message.content == answers[1].choices[0].message.content == text(11)

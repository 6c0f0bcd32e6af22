"""Chat runs on a base other than the tiny model: the run's start refuses a base whose tokenizer cannot serve what
the run trains (no chat template, a template other than ChatML, ChatML markers that are not single tokens), and the
mixture reading refuses a head it does not model (a bias, a logit scaling or soft-cap)."""

import shutil

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, GraniteConfig, PhiConfig, PreTrainedTokenizerFast

from tests.workers.lm_helpers import PAIRS, tiny_model_dir
from workers.lm.base_model import ensure_chat_base_model
from workers.lm.mode_mixture_training import encode_pairs
from workers.lm.models import CHATML_TEMPLATE, ModelNotPrepared, default_corpus, load_tokenizer

LLAMA2_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
                   "[INST] {{ message['content'] }} [/INST]{% else %} {{ message['content'] }} {{ eos_token }}"
                   "{% endif %}{% endfor %}")
# SmolLM2-Instruct's template: ChatML with a default system turn when the request has none
SMOLLM2_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                    "{% endif %}")


def _base_with(out, tokenizer):
    """The tiny model's directory with `tokenizer` instead of its own (the check reads the tokenizer only)."""
    base = shutil.copytree(tiny_model_dir(), out)
    (base / "chat_template.jinja").unlink()
    tokenizer.save_pretrained(base)
    return base


def _tiny_tokenizer(template):
    tokenizer = load_tokenizer(tiny_model_dir())
    tokenizer.chat_template = template
    return tokenizer


def test_a_base_without_a_chat_template_is_refused_when_the_run_starts(tmp_path):
    """Before: it trained, evaluated and released, then every chat request was a 500."""
    base = _base_with(tmp_path / "gpt2-like", _tiny_tokenizer(None))
    assert not load_tokenizer(base).chat_template
    with pytest.raises(ModelNotPrepared, match="has no chat template.*ChatML"):
        ensure_chat_base_model(str(base), tmp_path / "models")


def test_a_base_whose_template_is_not_chatml_is_refused(tmp_path):
    """Before: a Llama-2-template base was trained on ChatML prompts and served [INST] ones."""
    base = _base_with(tmp_path / "llama2-like", _tiny_tokenizer(LLAMA2_TEMPLATE))
    with pytest.raises(ModelNotPrepared, match=r"renders a user turn as '<\|endoftext\|>\[INST\].*train on ChatML"):
        ensure_chat_base_model(str(base), tmp_path / "models")


def test_a_chatml_template_without_the_markers_as_single_tokens_is_refused(tmp_path):
    """Before: <|im_end|> as ten tokens was learnt as text, never stopped at, and leaked into replies."""
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(default_corpus(), trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>")
    tokenizer.chat_template = CHATML_TEMPLATE
    base = _base_with(tmp_path / "gpt2-chatml-text", tokenizer)
    with pytest.raises(ModelNotPrepared, match=r"\['<\|im_start\|>', '<\|im_end\|>'\] are not single tokens"):
        ensure_chat_base_model(str(base), tmp_path / "models")


def test_chatml_bases_pass_with_or_without_a_default_system_turn(tmp_path):
    assert ensure_chat_base_model(str(tiny_model_dir()), tmp_path) == tiny_model_dir()
    smollm2_like = _base_with(tmp_path / "smollm2-like", _tiny_tokenizer(SMOLLM2_TEMPLATE))
    assert ensure_chat_base_model(str(smollm2_like), tmp_path) == smollm2_like


def _small(config_class, **extra):
    tokenizer = load_tokenizer(tiny_model_dir())
    config = config_class(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                          num_key_value_heads=2, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                          max_position_embeddings=128, **extra)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval(), tokenizer


def test_the_mixture_refuses_a_head_bias_it_does_not_model():
    """Before: stage 1, the tests and the evaluation scored hidden @ W.T while serving added Phi's head bias."""
    model, tokenizer = _small(PhiConfig)
    with torch.no_grad():
        model.get_output_embeddings().bias.zero_()
    assert len(encode_pairs(model, tokenizer, PAIRS, 64)) == len(PAIRS)  # a zero bias changes nothing
    with torch.no_grad():
        model.get_output_embeddings().bias.normal_()
    with pytest.raises(ValueError, match="an LM head bias.*bottleneck reading"):
        encode_pairs(model, tokenizer, PAIRS, 64)


def test_the_mixture_refuses_a_logit_scaling_it_does_not_model():
    """Before: Granite's logits_scaling divided the served logits, not the ones the mixture trained on."""
    model, tokenizer = _small(GraniteConfig, logits_scaling=4.0)
    with pytest.raises(ValueError, match=r"logits_scaling=4\.0"):
        encode_pairs(model, tokenizer, PAIRS, 64)
    neutral, _ = _small(GraniteConfig, logits_scaling=1.0)
    assert len(encode_pairs(neutral, tokenizer, PAIRS, 64)) == len(PAIRS)


def test_a_base_whose_context_fits_no_held_out_pair_trains_and_its_gate_blocks_naming_the_context(tmp_path):
    """Before: such a run failed at its start ("no held-out pair fits the model's context"), for the indicators, which
    are advisory. Now it trains; the evaluation reads no indicator prompt, and the gate blocks, naming the context."""
    import json
    import math

    from prefect.logging import disable_run_logger

    from flows.chat import chat_base_model
    from flows.retrain import gate
    from ground.schemas import CheckpointRef, Evaluation
    from proxyloop.testing import isolated_settings
    from workers.lm.evaluate import evaluate_lm_checkpoints
    from workers.lm.models import build_tiny

    rows = [{"prompt": f"What is 3 plus {i}? " * 12, "chosen": f" It is {i + 3}.", "rejected": " It is 9."}
            for i in range(6)]  # six distinct tasks: enough for the gate (min_heldout_inputs 5)
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("".join(json.dumps(r) + "\n" for r in rows))
    short = build_tiny(tmp_path / "short", max_positions=64)

    def evaluated_and_gated(base):
        settings = isolated_settings(tmp_path, chat_base_model=str(base))
        with disable_run_logger():
            assert chat_base_model.fn(settings, str(heldout)) == str(base)  # the run's start: not refused
        evaluation = evaluate_lm_checkpoints(str(base), str(heldout), [CheckpointRef(step=0, path=str(base))])
        evaluation = Evaluation.model_validate_json(evaluation.model_dump_json())  # as the worker's result arrives
        with disable_run_logger():
            return evaluation, gate.fn(settings, evaluation)

    evaluation, decision = evaluated_and_gated(short)
    assert (evaluation.n_heldout, evaluation.n_indicator_prompts, evaluation.heldout_context) == (6, 0, 64)
    assert math.isnan(evaluation.evaluations[0].topk_entropy) and evaluation.base_topk_mass is None
    assert decision.decision == "block"
    assert "none of the 6 held-out expert pairs fits the base model's context of 64 tokens" in decision.reasons[0]
    assert decision.reasons[-1].startswith("blocked: too little held out")
    evaluation, decision = evaluated_and_gated(tiny_model_dir())  # 512 positions: they fit, no such reason
    assert (evaluation.n_indicator_prompts, evaluation.heldout_context) == (6, 512)
    assert math.isfinite(evaluation.evaluations[0].topk_entropy) and evaluation.base_topk_mass is not None
    assert not any("context" in reason for reason in decision.reasons)

"""IM vs IT loss masks on ChatML examples, and the automatic choice between them."""

import pytest
import torch

from tests.workers.lm_helpers import tiny_model_dir
from workers.lm.models import load_causal_lm, load_tokenizer
from workers.lm.training.data import collate_chats
from workers.lm.training.sft import choose_loss_mode, render_chat, sft_batch_loss
from workers.lm.training.sft_config import SFTConfig

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 3 plus 4?"},
    {"role": "assistant", "content": "It is 7."},
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(tiny_model_dir())


def _n(tokenizer, text):
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _expected_mask(tokenizer, scored_roles):
    """Hand-built: per turn [open marker: 0][content: role scored?][<|im_end|>: assistant only][\\n: 0]."""
    mask = []
    for message in CHAT:
        mask += [0] * _n(tokenizer, f"<|im_start|>{message['role']}\n")
        mask += [int(message["role"] in scored_roles)] * _n(tokenizer, message["content"])
        mask += [int(message["role"] == "assistant")] * _n(tokenizer, "<|im_end|>")
        mask += [0] * _n(tokenizer, "\n")
    return mask


def test_rendered_ids_are_the_chatml_template(tokenizer):
    chat = render_chat(CHAT, tokenizer, "it")
    assert tokenizer.decode(chat.input_ids) == tokenizer.apply_chat_template(CHAT, tokenize=False)


def test_it_mask_scores_only_the_output_and_its_end_marker(tokenizer):
    chat = render_chat(CHAT, tokenizer, "it")
    assert chat.loss_mask == _expected_mask(tokenizer, {"assistant"})
    scored = [t for t, m in zip(chat.input_ids, chat.loss_mask, strict=True) if m]
    assert tokenizer.decode(scored) == "It is 7.<|im_end|>"


def test_im_mask_scores_instruction_prompt_and_output_but_no_role_markers(tokenizer):
    chat = render_chat(CHAT, tokenizer, "im")
    assert chat.loss_mask == _expected_mask(tokenizer, {"system", "user", "assistant"})
    scored = [t for t, m in zip(chat.input_ids, chat.loss_mask, strict=True) if m]
    assert tokenizer.decode(scored) == "You are terse.What is 3 plus 4?It is 7.<|im_end|>"
    assert "<|im_start|>" not in tokenizer.decode(scored)


def test_unknown_role_is_refused(tokenizer):
    with pytest.raises(ValueError, match="Unknown chat role 'tool'"):
        render_chat([{"role": "tool", "content": "x"}], tokenizer, "im")


LONG_INSTRUCTION = [{"role": "user", "content": "the annotator prefers the first response. " * 6},
                    {"role": "assistant", "content": "It is 7."}]
LONG_OUTPUT = [{"role": "user", "content": "What?"},
               {"role": "assistant", "content": "the annotator prefers the first response. " * 6}]


def test_auto_picks_im_inside_an_im_region_set_in_the_config(tokenizer):
    config = SFTConfig(im_min_length_ratio=1.0, im_max_examples=5000)
    choice = choose_loss_mode([LONG_INSTRUCTION] * 20, tokenizer, config)
    assert choice.mode == "im"
    assert choice.length_ratio > 1
    assert choice.reason.startswith("IM: ratio") and "20 examples <= 5000" in choice.reason


def test_auto_picks_it_for_long_outputs_or_many_examples(tokenizer):
    short_instructions = choose_loss_mode([LONG_OUTPUT] * 20, tokenizer, SFTConfig(im_min_length_ratio=1.0))
    assert short_instructions.mode == "it" and "< 1.0" in short_instructions.reason
    many = choose_loss_mode([LONG_INSTRUCTION] * 30, tokenizer, SFTConfig(im_min_length_ratio=1.0, im_max_examples=10))
    assert many.mode == "it" and "30 examples > 10" in many.reason


def test_loss_mode_override_wins_and_says_so(tokenizer):
    choice = choose_loss_mode([LONG_OUTPUT] * 20, tokenizer, SFTConfig(loss_mode="im"))
    assert choice.mode == "im" and "override" in choice.reason
    with pytest.raises(ValueError, match="Unknown loss mode 'both'"):
        SFTConfig(loss_mode="both")


def test_sft_loss_is_the_mean_nll_of_the_scored_tokens_only(tokenizer):
    model = load_causal_lm(tiny_model_dir())
    it = collate_chats([render_chat(CHAT, tokenizer, "it")], tokenizer.pad_token_id, 512)
    loss, metrics = sft_batch_loss(model, it)
    with torch.no_grad():
        log_p = model(input_ids=it["input_ids"]).logits[0, :-1].log_softmax(-1)
    targets = it["input_ids"][0, 1:]
    scored = it["loss_mask"][0, 1:].bool()
    expected = -log_p[torch.arange(len(targets)), targets][scored].mean()
    assert float(loss.detach()) == pytest.approx(float(expected), abs=1e-6)
    assert metrics["tokens/scored"] == float(scored.sum()) == _n(tokenizer, "It is 7.<|im_end|>")

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from policies.indicators import topk_indicators
from policies.lm.indicators import checkpoint_indicators, completion_indicators
from workers.lm.models import build_tiny

PROMPTS = ["the expert ranks", "What is 3 plus 4? It is"]
COMPLETIONS = [" the longer reply.", " 7."]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = build_tiny(tmp_path_factory.mktemp("tiny"), seed=3)
    return AutoModelForCausalLM.from_pretrained(str(path)).eval(), AutoTokenizer.from_pretrained(str(path))


def _one_by_one(model, tokenizer, prompt, completion):
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    ids = torch.tensor([tokenizer(prompt + completion, add_special_tokens=False).input_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt_ids) - 1 : -1]
    entropy, mass = topk_indicators(logits)
    return float(entropy.mean()), float(mass.mean())


def test_batched_values_equal_a_position_by_position_computation(tiny):
    model, tokenizer = tiny
    batched = completion_indicators(model, tokenizer, PROMPTS, COMPLETIONS)
    singles = [_one_by_one(model, tokenizer, p, c) for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]
    assert batched["entropy_mean"] == pytest.approx(sum(s[0] for s in singles) / 2, abs=1e-4)
    assert batched["mass_mean"] == pytest.approx(sum(s[1] for s in singles) / 2, abs=1e-4)


def test_a_sharpened_model_shows_lower_entropy_and_higher_mass(tiny, tmp_path):
    model, tokenizer = tiny
    before = completion_indicators(model, tokenizer, PROMPTS, COMPLETIONS)
    sharp = AutoModelForCausalLM.from_pretrained(str(build_tiny(tmp_path / "t", seed=3))).eval()
    with torch.no_grad():
        sharp.lm_head.weight.mul_(40.0)
    after = completion_indicators(sharp, tokenizer, PROMPTS, COMPLETIONS)
    assert after["entropy_mean"] < before["entropy_mean"] and after["mass_mean"] > before["mass_mean"]
    assert before["entropy_raw_mean"] > 0 and before["entropy_mean"] <= float(torch.log2(torch.tensor(10.0))) + 1e-5


def test_both_views_are_reported(tiny):
    model, tokenizer = tiny
    values = checkpoint_indicators(model, tokenizer, PROMPTS, COMPLETIONS)
    assert {"teacher_forced/entropy_mean", "generated/mass_std", "generated/entropy_raw_mean"} <= set(values)


def test_one_prompt_gives_a_spread_of_zero_without_a_warning(tiny):
    """Before: the standard deviation across one sequence was NaN (n − 1 = 0), with a torch warning per indicator."""
    import warnings

    model, tokenizer = tiny
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        one = checkpoint_indicators(model, tokenizer, PROMPTS[:1], COMPLETIONS[:1])
    stds = {f"{view}/{name}_std" for view in ("teacher_forced", "generated")
            for name in ("entropy", "entropy_raw", "mass")}
    assert {key for key in one if key.endswith("_std")} == stds
    assert all(value == 0.0 for key, value in one.items() if key.endswith("_std"))
    both = completion_indicators(model, tokenizer, PROMPTS, COMPLETIONS)  # two prompts: the n − 1 estimator, as ever
    singles = [completion_indicators(model, tokenizer, [p], [c]) for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]
    spread = abs(singles[0]["entropy_mean"] - singles[1]["entropy_mean"]) / 2 ** 0.5
    assert both["entropy_std"] == pytest.approx(spread, abs=1e-5) and both["entropy_std"] > 0


def test_no_prompt_reads_every_indicator_as_nan(tiny):
    """No held-out pair fits the context (workers/lm/evaluate.py): nothing measured, every key still there."""
    import math

    model, tokenizer = tiny
    none = checkpoint_indicators(model, tokenizer, [], [])
    assert set(none) == set(checkpoint_indicators(model, tokenizer, PROMPTS, COMPLETIONS))
    assert all(math.isnan(value) for value in none.values())

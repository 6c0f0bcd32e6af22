"""The static IM/IT rule, what `loss_mode="auto"` falls back to on a dataset too small to hold chats out.

The sweep (`bench/im_vs_it.py`: ratios 0.53-90 × 16-256 examples) found no ratio/size boundary beyond
which IM wins, so the static rule never picks IM: both sides of the old boundary (ratio 1, 5000
examples) and the sweep's corners choose IT. Where chats can be held out, auto compares the two masks
on them instead (tests/workers/test_sft_auto.py).
"""

import random

import pytest

from bench.im_vs_it_parts import TASKS, agrees, cell_verdict, fit_rule, make_chat
from tests.workers.lm_helpers import tiny_model_dir
from workers.lm.models import load_tokenizer
from workers.lm.training.sft import AUTO_IM_MAX_EXAMPLES, AUTO_IM_MIN_LENGTH_RATIO, auto_choice, choose_loss_mode
from workers.lm.training.sft_config import SFTConfig


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(tiny_model_dir())


def test_measured_constants_say_no_im_region():
    assert AUTO_IM_MIN_LENGTH_RATIO is None and AUTO_IM_MAX_EXAMPLES is None


@pytest.mark.parametrize(("task", "n"), [("lookup1", 16), ("lookup1", 256), ("lookup2", 64), ("table", 16),
                                         ("expand", 16), ("expand", 256)])
def test_sweep_cells_choose_it_by_default(tokenizer, task, n):
    rng = random.Random(0)
    choice = choose_loss_mode([make_chat(task, rng) for _ in range(n)], tokenizer, SFTConfig())
    assert choice.mode == "it" and "no IM region" in choice.reason


def test_both_sides_of_the_old_boundary_choose_it():
    for ratio, n in [(0.99, 10), (1.0, 10), (90.0, 16), (90.0, 5000), (90.0, 5001), (0.5, 100_000)]:
        assert auto_choice(ratio, n, SFTConfig()).mode == "it"


def test_an_explicit_region_still_selects_im_just_inside_and_it_just_outside():
    config = SFTConfig(im_min_length_ratio=10.0, im_max_examples=128)
    assert auto_choice(10.0, 128, config).mode == "im"
    assert auto_choice(9.99, 128, config).mode == "it"
    assert auto_choice(10.0, 129, config).mode == "it"


def test_generated_tasks_span_the_swept_ratios(tokenizer):
    rng = random.Random(1)
    ratios = [choose_loss_mode([make_chat(t, rng) for _ in range(16)], tokenizer, SFTConfig()).length_ratio
              for t in TASKS]
    assert ratios == sorted(ratios) and ratios[0] < 1 < ratios[1] < 10 < ratios[2] < ratios[3]


def test_verdicts_agreement_and_the_fitted_rule():
    assert cell_verdict([0.3, 0.25, 0.36])[0] == "im"
    assert cell_verdict([-0.2, -0.15, -0.18])[0] == "it"
    assert cell_verdict([-0.3, 0.1, 0.05])[0] == "tie"
    assert agrees("it", "tie") and agrees("im", "im") and not agrees("im", "it")
    it_cells = [{"ratio": r, "n": n, "verdict": "it"} for r in (0.5, 3, 30, 90) for n in (16, 64, 256)]
    assert fit_rule(it_cells)["min_ratio"] == float("inf")
    mixed = [{**c, "verdict": "im" if c["ratio"] >= 30 and c["n"] <= 64 else "it"} for c in it_cells]
    fitted = fit_rule(mixed)
    assert fitted["agreement"] == 1.0 and 3 < fitted["min_ratio"] < 30 and 64 <= fitted["max_examples"] < 256

"""`loss_mode="auto"` trains IM and IT and keeps the mask with the lower held-out output loss (bench/im_vs_it.py).

The sweep found IM ahead at ratio 28.5 with 64 examples (`lookup2`) and IT ahead at ratio 90 with 64 examples
(`lookup1`), with no ratio/size boundary between them; these tests train the sweep's own cells, with its recipe,
through the worker and check that each side chooses as the sweep measured.
"""


import pytest

from bench.im_vs_it_parts import build_base, cell_chats, sft_config
from ground.schemas import LMTrainingRequest
from workers.lm.models import load_causal_lm, load_tokenizer
from workers.lm.snapshot_data import write_jsonl
from workers.lm.training.data import DatasetError
from workers.lm.training.run import run_lm_training
from workers.lm.training.sft_auto import MIN_VALIDATION_CHATS, output_metrics, validation_split
from workers.lm.training.sft_config import SFTConfig


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_base(tmp_path_factory.mktemp("imit") / "base", seed=0)


def _auto(base, tmp_path, task, n, **extra):
    train, val, _ = cell_chats(task, n, 0, 32, 0)
    data = write_jsonl([{"messages": c} for c in train], tmp_path / "train.jsonl")
    held = write_jsonl([{"messages": c} for c in val], tmp_path / "val.jsonl")
    config = {**sft_config(64, 16, 2e-3, 0, str(held)), **extra}
    request = LMTrainingRequest(run_id=f"{task}-{n}", method="sft", base_model=str(base), dataset=str(data),
                                output_dir=str(tmp_path / "run"), config=config)
    return run_lm_training(request, lambda _: None), val


@pytest.mark.parametrize(("task", "expected"), [("lookup2", "im"), ("lookup1", "it")])
def test_auto_chooses_the_mask_the_sweep_measured_on_each_side(base, tmp_path, task, expected):
    result, val = _auto(base, tmp_path, task, 64)
    choice = result["loss_mode"]
    assert choice["mode"] == expected, choice["reason"]
    losses = choice["validation_loss"]
    assert losses[expected] < losses["it" if expected == "im" else "im"]
    assert choice["reason"].startswith(expected.upper()) and "32 held-out chats" in choice["reason"]
    # the result is the winner's run cut at its best checkpoint, and that checkpoint scores what the lineage says
    best = result["checkpoints"][-1]
    assert best == choice["best_checkpoint"][expected] and f"/{expected}/" in best
    tokenizer = load_tokenizer(base)
    assert output_metrics(load_causal_lm(best), tokenizer, val)["loss"] == pytest.approx(losses[expected], abs=1e-6)
    # idempotent: asking again returns the stored result without training
    again, _ = _auto(base, tmp_path, task, 64)
    assert again == result


def test_held_out_share_is_disjoint_deterministic_and_refused_when_too_small():
    chats = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}] for i in range(30)]
    train, held = validation_split(chats, SFTConfig(seed=3))  # type: ignore[misc]
    assert len(held) == 6 and len(train) == 24
    assert {c[0]["content"] for c in train}.isdisjoint({c[0]["content"] for c in held})
    assert validation_split(chats, SFTConfig(seed=3)) == (train, held)
    assert validation_split(chats, SFTConfig(seed=4)) != (train, held)
    assert validation_split(chats[: 8 + MIN_VALIDATION_CHATS - 1], SFTConfig()) is None


def test_a_dataset_too_small_to_hold_out_is_decided_by_the_static_rule_and_says_so(base, tmp_path):
    train, _, _ = cell_chats("lookup2", 10, 0, 0, 0)
    data = write_jsonl([{"messages": c} for c in train], tmp_path / "train.jsonl")
    config = {"loss_mode": "auto", "max_steps": 2, "checkpoint_every": 2, "batch_size": 4}
    result = run_lm_training(LMTrainingRequest(run_id="small", method="sft", base_model=str(base), dataset=str(data),
                                               output_dir=str(tmp_path / "run"), config=config), lambda _: None)
    assert result["loss_mode"]["mode"] == "it" and "too few chats to validate" in result["loss_mode"]["reason"]
    assert not (tmp_path / "run" / "im").exists()


def test_an_empty_or_missing_validation_dataset_is_refused_before_training(tmp_path):
    chats = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}] for i in range(30)]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DatasetError, match="has no rows"):
        validation_split(chats, SFTConfig(validation_dataset=str(empty)))
    with pytest.raises(DatasetError, match="does not exist"):
        validation_split(chats, SFTConfig(validation_dataset=str(tmp_path / "missing.jsonl")))


def test_validation_share_outside_the_unit_interval_is_refused():
    with pytest.raises(ValueError, match="validation_share"):
        SFTConfig(validation_share=1.0)

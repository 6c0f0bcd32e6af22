"""The language-model loop: every loss type trains, accumulation, bucketing, checkpoints, resume, LoRA, SFT."""

import json

import pytest
import torch
from safetensors.torch import load_file

from ground.schemas import LMTrainingRequest
from tests.workers.lm_helpers import tiny_model_dir, write_pairs
from workers.lm.models import load_causal_lm
from workers.lm.training.data import bucketed_batches, padding_fraction
from workers.lm.training.run import run_lm_training

FAST = {"learning_rate": 1e-3, "batch_size": 4, "max_length": 64, "max_grad_norm": 0.0}


def _request(tmp_path, name, dataset, method="dpo", **config):
    return LMTrainingRequest(run_id=name, method=method, base_model=str(tiny_model_dir()), dataset=str(dataset),
                             output_dir=str(tmp_path / name), config={**FAST, **config})


def _weights(path):
    return {k: v.clone() for k, v in load_causal_lm(path).state_dict().items()}


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_every_loss_type_changes_the_weights_and_lowers_the_loss(tmp_path, loss_type):
    data = write_pairs(tmp_path / "pairs.jsonl", 8)
    result = run_lm_training(_request(tmp_path, loss_type, data, loss_type=loss_type, max_steps=8,
                                      checkpoint_every=8), progress=lambda _: None)
    assert result["steps"] == 8 and len(result["losses"]) == 8
    assert result["losses"][-1] < result["losses"][0]
    before, after = _weights(tiny_model_dir()), _weights(result["checkpoints"][-1])
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_progress_reports_step_loss_and_tokens_per_second(tmp_path):
    seen = []
    run_lm_training(_request(tmp_path, "p", write_pairs(tmp_path / "d.jsonl", 8), max_steps=2), seen.append)
    assert [m["step"] for m in seen] == [1, 2]
    assert all(m["tokens_per_s"] > 0 and m["loss"] > 0 and "rewards/margins" in m for m in seen)


def test_two_accumulated_micro_batches_equal_one_batch_of_twice_the_size(tmp_path):
    data = write_pairs(tmp_path / "d.jsonl", 4)
    one = run_lm_training(_request(tmp_path, "one", data, batch_size=4, max_steps=1), lambda _: None)
    two = run_lm_training(_request(tmp_path, "two", data, batch_size=2, grad_accum_steps=2, max_steps=1),
                          lambda _: None)
    assert one["losses"][0] == pytest.approx(two["losses"][0], abs=1e-6)
    a, b = _weights(one["checkpoints"][-1]), _weights(two["checkpoints"][-1])
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0)  # Adam step ~ lr = 1e-3 per weight


def test_bucketed_batches_cover_each_example_once_and_pad_less_than_random():
    lengths = [int(x) for x in torch.randint(5, 200, (256,), generator=torch.Generator().manual_seed(0))]
    batches = bucketed_batches(lengths, batch_size=8, bucket_factor=8, seed=3, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(256))
    assert batches == bucketed_batches(lengths, batch_size=8, bucket_factor=8, seed=3, epoch=0)
    assert batches != bucketed_batches(lengths, batch_size=8, bucket_factor=8, seed=3, epoch=1)
    unsorted = bucketed_batches(lengths, batch_size=8, bucket_factor=1, seed=3, epoch=0)
    assert padding_fraction(lengths, batches) < padding_fraction(lengths, unsorted) / 2


class Interrupted(Exception):
    pass


def test_a_run_interrupted_after_a_checkpoint_resumes_to_the_same_losses(tmp_path):
    data = write_pairs(tmp_path / "d.jsonl", 12)
    config = {"max_steps": 6, "checkpoint_every": 2, "batch_size": 2, "grad_accum_steps": 2}
    whole = run_lm_training(_request(tmp_path, "whole", data, **config), lambda _: None)

    def die_at_step_3(meta):
        if meta["step"] == 3:
            raise Interrupted

    with pytest.raises(Interrupted):
        run_lm_training(_request(tmp_path, "cut", data, **config), die_at_step_3)
    assert [p.name for p in (tmp_path / "cut").glob("checkpoint-*")] == ["checkpoint-000002"]
    resumed = run_lm_training(_request(tmp_path, "cut", data, **config), lambda _: None)
    assert resumed["resumed_from_step"] == 2
    assert resumed["losses"] == pytest.approx(whole["losses"], abs=1e-6)
    again = run_lm_training(_request(tmp_path, "cut", data, **config), lambda _: None)
    assert again == resumed  # idempotent by run id


def test_checkpoints_are_safetensors_and_json_only(tmp_path):
    result = run_lm_training(_request(tmp_path, "c", write_pairs(tmp_path / "d.jsonl", 4), max_steps=1),
                             lambda _: None)
    checkpoint = result["checkpoints"][-1]
    suffixes = {p.suffix for p in __import__("pathlib").Path(checkpoint).iterdir()}
    assert suffixes <= {".safetensors", ".json", ".jinja"}, suffixes
    state = json.loads((__import__("pathlib").Path(checkpoint) / "state.json").read_text())
    assert state["config"]["loss_type"] == "sigmoid" and state["step"] == 1
    assert "0.exp_avg" in load_file(f"{checkpoint}/optimizer.safetensors")


def test_lora_trains_only_the_adapter_and_resumes(tmp_path):
    data = write_pairs(tmp_path / "d.jsonl", 8)
    config = {"max_steps": 4, "checkpoint_every": 2, "lora_r": 4}
    whole = run_lm_training(_request(tmp_path, "lora", data, **config), lambda _: None)
    checkpoint = whole["checkpoints"][-1]
    adapter = load_file(f"{checkpoint}/adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)

    def die_at_step_3(meta):
        if meta["step"] == 3:
            raise Interrupted

    with pytest.raises(Interrupted):
        run_lm_training(_request(tmp_path, "lora-cut", data, **config), die_at_step_3)
    resumed = run_lm_training(_request(tmp_path, "lora-cut", data, **config), lambda _: None)
    assert resumed["resumed_from_step"] == 2
    assert resumed["losses"] == pytest.approx(whole["losses"], abs=1e-6)


def test_sft_run_records_the_loss_mode_and_its_reason(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "the annotator prefers the first response. " * 4},
                          {"role": "assistant", "content": f"It is {i}."}]} for i in range(6)]
    data = tmp_path / "sft.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    result = run_lm_training(_request(tmp_path, "sft", data, method="sft", max_steps=2), lambda _: None)
    assert result["loss_mode"]["mode"] == "it"  # the measured rule (bench/im_vs_it.py) found no IM region
    assert result["loss_mode"]["reason"].startswith("IT: ratio") and "bench/im_vs_it" in result["loss_mode"]["reason"]
    assert result["losses"][-1] > 0


def test_unknown_config_keys_fail_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"unknown DPOConfig keys \['lr'\]"):
        run_lm_training(_request(tmp_path, "bad", write_pairs(tmp_path / "d.jsonl", 4), lr=1), lambda _: None)

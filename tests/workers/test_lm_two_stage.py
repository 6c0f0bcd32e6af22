"""Paper 1's two-stage stack on a causal LM: stage 1 adds and trains the simplex bottleneck, stage 2 moves the
adapter alone; both checkpoint, resume and load back with their bottleneck."""

import pytest
import torch

from ground.schemas import LMTrainingRequest
from policies.lm.simplex_bottleneck import MODULE_NAME, attach_bottleneck, bottleneck_of, load_causal_lm_dir
from tests.workers.lm_helpers import tiny_model_dir, write_pairs
from workers.lm.models import load_tokenizer
from workers.lm.training.loop_config import LoopConfig
from workers.lm.training.run import run_lm_training

FAST = {"learning_rate": 1e-2, "batch_size": 4, "max_length": 64, "max_grad_norm": 0.0}
ADAPTER = f"{MODULE_NAME}.adapter."


class Interrupted(Exception):
    pass


def _request(tmp_path, name, dataset, base=None, **config):
    return LMTrainingRequest(run_id=name, method="dpo", base_model=str(base or tiny_model_dir()),
                             dataset=str(dataset), output_dir=str(tmp_path / name), config={**FAST, **config})


def _weights(path):
    return {k: v.clone() for k, v in load_causal_lm_dir(path).state_dict().items()}


def test_a_fresh_bottleneck_leaves_the_model_unchanged():
    model = load_causal_lm_dir(tiny_model_dir()).eval()
    ids = load_tokenizer(tiny_model_dir())("What is 3 plus 4? It is 7.", return_tensors="pt").input_ids
    before = model(input_ids=ids).logits
    attach_bottleneck(model, 4)
    assert torch.equal(model(input_ids=ids).logits, before)  # Θ̃ starts at zero: the stack is the base model


def test_stage_1_trains_the_bottleneck_and_stage_2_only_its_adapter(tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", 8)
    stage1 = run_lm_training(_request(tmp_path, "stage1", data, simplex_dim=4, max_steps=6), lambda _: None)
    stage1_dir = stage1["checkpoints"][-1]
    after1 = _weights(stage1_dir)
    assert {k for k in after1 if k.startswith(MODULE_NAME)} >= {f"{ADAPTER}weight", f"{MODULE_NAME}.theta.weight"}
    assert after1[f"{MODULE_NAME}.theta.weight"].abs().sum() > 0  # Θ̃ left zero: the proxy trained nothing into it
    assert torch.equal(after1[f"{ADAPTER}weight"], torch.eye(4))  # stage 1 keeps the adapter the identity

    stage2 = run_lm_training(_request(tmp_path, "stage2", data, base=stage1_dir, train_parts="adapter", max_steps=6),
                             lambda _: None)
    after2 = _weights(stage2["checkpoints"][-1])
    moved = {k for k in after1 if not torch.equal(after1[k], after2[k])}
    assert moved and all(k.startswith(ADAPTER) for k in moved), moved
    assert stage2["final_loss"] < stage2["losses"][0]


def test_stage_2_resumes_after_an_interruption_to_the_same_losses(tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", 8)
    stage1 = run_lm_training(_request(tmp_path, "s1", data, simplex_dim=3, max_steps=2), lambda _: None)
    config = {"train_parts": "adapter", "max_steps": 4, "checkpoint_every": 2}
    base = stage1["checkpoints"][-1]
    whole = run_lm_training(_request(tmp_path, "whole", data, base=base, **config), lambda _: None)

    def die_at_step_3(meta):
        if meta["step"] == 3:
            raise Interrupted

    with pytest.raises(Interrupted):
        run_lm_training(_request(tmp_path, "cut", data, base=base, **config), die_at_step_3)
    resumed = run_lm_training(_request(tmp_path, "cut", data, base=base, **config), lambda _: None)
    assert resumed["resumed_from_step"] == 2
    assert resumed["losses"] == pytest.approx(whole["losses"], abs=1e-6)


def test_a_saved_two_stage_model_generates_with_its_bottleneck(tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", 8)
    stage1 = run_lm_training(_request(tmp_path, "s1", data, simplex_dim=4, max_steps=3), lambda _: None)
    model = load_causal_lm_dir(stage1["checkpoints"][-1]).eval()
    assert bottleneck_of(model) is not None
    plain = load_causal_lm_dir(tiny_model_dir()).eval()
    ids = load_tokenizer(tiny_model_dir())("What is 3 plus 4?", return_tensors="pt").input_ids
    assert not torch.allclose(model(input_ids=ids).logits, plain(input_ids=ids).logits)
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape[1] > ids.shape[1]


def test_stage_2_without_a_bottleneck_or_with_lora_is_refused(tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", 4)
    with pytest.raises(ValueError, match="train stage 1"):
        run_lm_training(_request(tmp_path, "no-stage1", data, train_parts="adapter", max_steps=1), lambda _: None)
    with pytest.raises(ValueError, match="LoRA and the simplex bottleneck"):
        LoopConfig(simplex_dim=4, lora_r=4)
    with pytest.raises(ValueError, match="simplex_dim"):
        LoopConfig(simplex_dim=1)


def test_a_bottleneck_only_stage_1_leaves_the_body_and_the_adapter_as_they_were(tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", 8)
    stage1 = run_lm_training(_request(tmp_path, "s1", data, simplex_dim=4, train_parts="bottleneck", max_steps=4),
                             lambda _: None)
    after = _weights(stage1["checkpoints"][-1])
    before = _weights(tiny_model_dir())
    assert all(torch.equal(after[k], before[k]) for k in before)  # the body is frozen
    moved = {k for k in after if k.startswith(MODULE_NAME)
             and not torch.equal(after[k], torch.zeros_like(after[k]))}
    assert f"{MODULE_NAME}.theta.weight" in moved
    assert torch.equal(after[f"{ADAPTER}weight"], torch.eye(4))

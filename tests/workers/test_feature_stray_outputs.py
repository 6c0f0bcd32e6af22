"""The feature worker on a snapshot with one stray proxy event (y_w = 7 on Y = {0, 1, 2}): it trains on exactly the
clean snapshot's triples, at 3 outputs (policies/features/outputs.py says what the widening to 8 cost)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ground.schemas import FeatureTriple, TrainingRequest
from ingest.synthetic import appendix_d
from workers.features.tasks import train_feature_policy

pytestmark = pytest.mark.usefixtures("one_thread")

STRAY = FeatureTriple(x=[0.1] * 5, y_w=7, y_l=1)


def _train(tmp_path, name, proxy, expert, heldout=()):
    request = TrainingRequest(run_id=name, snapshot_id="s", store_url="sqlite://", plan="two_stage",
                              output_dir=str(tmp_path / name), stage1_epochs=20, stage2_epochs=10, checkpoint_every=10)
    result = train_feature_policy(request, proxy, expert, torch.device("cpu"), "w", lambda _: None, heldout)
    final = Path(result.checkpoints[-1].path)
    return json.loads((final / "config.json").read_text())["model"], load_file(str(final / "model.safetensors"))


def test_a_stray_proxy_event_leaves_the_outputs_and_the_trained_policy_as_without_it(tmp_path):
    task = appendix_d(n_proxy=400, n_expert=36, seed=0)
    clean_config, clean = _train(tmp_path, "clean", task.proxy, task.expert[:24])
    stray_config, stray = _train(tmp_path, "stray", [*task.proxy, STRAY], task.expert[:24])
    assert clean_config["n_outputs"] == stray_config["n_outputs"] == 3
    assert clean.keys() == stray.keys() and all(torch.equal(clean[k], stray[k]) for k in clean)


def test_an_output_only_held_out_expert_triples_use_stays_answerable(tmp_path):
    task = appendix_d(n_proxy=400, n_expert=36, seed=0)
    heldout = [*task.expert[24:], FeatureTriple(x=[0.0] * 5, y_w=7, y_l=0)]
    config, _ = _train(tmp_path, "heldout", [*task.proxy, STRAY], task.expert[:24], heldout)
    assert config["n_outputs"] == 8

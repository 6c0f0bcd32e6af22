"""The shared reference log-prob cache: a retrain scores only new pairs, with the same losses as without the cache,
and a different truncation or base model never reads another's values."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from ground.schemas import LMTrainingRequest
from ground.settings import get_settings
from tests.workers.lm_helpers import tiny_model_dir, write_pairs
from workers.lm.models import load_causal_lm, load_tokenizer
from workers.lm.training import reference_cache
from workers.lm.training.run import REFERENCE_FILE, run_lm_training

FAST = {"learning_rate": 1e-2, "batch_size": 4, "max_length": 64, "max_grad_norm": 0.0, "max_steps": 3}


@pytest.fixture
def computed(monkeypatch):
    """Pairs the reference model actually scored, per call (the cache's only way to the model)."""
    counts: list[int] = []
    real = reference_cache.reference_logps

    def counting(model, pairs, *args):
        counts.append(len(pairs))
        return real(model, pairs, *args)

    monkeypatch.setattr(reference_cache, "reference_logps", counting)
    return counts


def _use_cache(monkeypatch, directory):
    monkeypatch.setenv("PROXYLOOP_REFERENCE_CACHE_DIR", str(directory))
    get_settings.cache_clear()


@pytest.fixture(autouse=True)
def _fresh_settings():
    yield
    get_settings.cache_clear()  # the next test reads the environment monkeypatch restored


def _train(tmp_path, name, dataset, base=None, **config):
    request = LMTrainingRequest(run_id=name, method="dpo", base_model=str(base or tiny_model_dir()),
                                dataset=str(dataset), output_dir=str(tmp_path / name), config={**FAST, **config})
    return run_lm_training(request, lambda _: None)


def _reference(tmp_path, name):
    return load_file(str(tmp_path / name / REFERENCE_FILE))


def test_a_retrain_scores_only_the_new_pairs_with_the_losses_of_an_uncached_run(tmp_path, monkeypatch, computed):
    old, grown = write_pairs(tmp_path / "old.jsonl", 8), write_pairs(tmp_path / "grown.jsonl", 12)  # 8 old + 4 new
    _use_cache(monkeypatch, tmp_path / "shared")
    _train(tmp_path, "first", old)
    retrain = _train(tmp_path, "retrain", grown)
    assert computed == [8, 4]

    _use_cache(monkeypatch, tmp_path / "empty")  # the same retrain as it was before the cache: every pair scored
    uncached = _train(tmp_path, "uncached", grown)
    assert computed[2:] == [12]
    # The 4 new pairs form the same batch in both runs, so even the last float bits agree.
    for part in ("chosen", "rejected"):
        assert torch.equal(_reference(tmp_path, "retrain")[part], _reference(tmp_path, "uncached")[part])
    assert retrain["losses"] == uncached["losses"]


def test_another_max_length_or_base_model_misses_and_a_copied_model_hits(tmp_path, monkeypatch, computed):
    data = write_pairs(tmp_path / "pairs.jsonl", 8)
    _use_cache(monkeypatch, tmp_path / "shared")
    _train(tmp_path, "first", data)
    _train(tmp_path, "shorter", data, max_length=12)  # truncation changes the scored tokens
    assert computed == [8, 8]

    copy = shutil.copytree(tiny_model_dir(), tmp_path / "copy")
    _train(tmp_path, "copy", data, base=copy)  # keyed by content, not by where the model lies
    assert computed == [8, 8]

    moved = load_causal_lm(copy)  # e.g. a stage-1 checkpoint as the base of stage 2: same names, other weights
    with torch.no_grad():
        next(moved.parameters()).add_(1e-3)
    moved.save_pretrained(tmp_path / "moved")
    load_tokenizer(copy).save_pretrained(tmp_path / "moved")
    _train(tmp_path, "moved", data, base=tmp_path / "moved")
    assert computed == [8, 8, 8]
    assert not torch.equal(_reference(tmp_path, "moved")["chosen"], _reference(tmp_path, "first")["chosen"])


def test_a_second_writer_of_a_pair_keeps_the_first_value(tmp_path):
    first, second = reference_cache.ReferenceCache(tmp_path), reference_cache.ReferenceCache(tmp_path)
    first.store({b"k" * 32: (-1.5, -2.5)})
    second.store({b"k" * 32: (-9.0, -9.0), b"j" * 32: (-3.0, -4.0)})
    assert first.lookup([b"k" * 32, b"j" * 32, b"x" * 32]) == {b"k" * 32: (-1.5, -2.5), b"j" * 32: (-3.0, -4.0)}

"""Redelivery safety of training runs (acks_late): an output directory is returned, resumed or reused only by the
run recorded in it, and a damaged checkpoint, reference cache or result costs a few steps, never the run."""

import json
import logging
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from ground.schemas import LMTrainingRequest, TrainingRequest
from ground.settings import get_settings
from ingest.synthetic import appendix_d
from tests.conftest import one_torch_thread
from tests.workers.lm_helpers import tiny_model_dir, write_pairs
from workers.features import tasks as feature_tasks
from workers.lm.training.checkpoint import ForeignRunError
from workers.lm.training.run import REFERENCE_FILE, run_lm_training

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = {"learning_rate": 1e-3, "batch_size": 2, "max_length": 64, "max_grad_norm": 0.0, "max_steps": 4,
        "checkpoint_every": 2}
MIXTURE = {"reading": "mixture", "mixture_stage": "proxy", "proxy_epochs": 2, "batch_size": 2, "simplex_dim": 2,
           "checkpoint_every": 2}  # 6 pairs: 3 steps an epoch, checkpoints at 2, 4 and 6


def quiet(_):
    pass


@pytest.fixture
def pairs(tmp_path):
    return write_pairs(tmp_path / "pairs.jsonl", 6)


def _request(tmp_path, pairs, out="run", run_id="a", base=None, **config):
    return LMTrainingRequest(run_id=run_id, method="dpo", base_model=str(base or tiny_model_dir()), dataset=str(pairs),
                             output_dir=str(tmp_path / out), config={**FAST, **config})


def _mixture_request(tmp_path, pairs, out="mix", run_id="m", base=None, **config):
    return _request(tmp_path, pairs, out, run_id, base).model_copy(update={"config": {**MIXTURE, **config}})


def _files(directory):
    return sorted((str(p.relative_to(directory)), p.stat().st_size) for p in directory.rglob("*"))


def _interrupted_copy(tmp_path, name, finished="whole"):
    """A copy of a finished run's directory as a run killed after its last checkpoint leaves it (no result.json);
    the same request resumes it, as `output_dir` is not part of what a run is."""
    out = shutil.copytree(tmp_path / finished, tmp_path / name)
    (out / "result.json").unlink()
    return out


def _truncate(path):
    os.truncate(path, path.stat().st_size // 2)


# Another request in the same output directory is refused, naming the directory and what differs.


def test_a_finished_run_is_returned_to_its_own_request_only(tmp_path, pairs):
    first = run_lm_training(_request(tmp_path, pairs), quiet)
    out = tmp_path / "run"
    before = _files(out)
    other_base = shutil.copytree(tiny_model_dir(), tmp_path / "other-base")
    other_pairs = write_pairs(tmp_path / "other.jsonl", 8)
    for request, says in [(_request(tmp_path, pairs, run_id="b"), "run_id 'a' there, 'b' asked"),
                          (_request(tmp_path, pairs, base=other_base), "base_model"),
                          (_request(tmp_path, other_pairs), "dataset_sha256"),
                          (_request(tmp_path, pairs, learning_rate=1e-2), "config learning_rate=0.001 there, 0.01")]:
        with pytest.raises(ForeignRunError, match=says) as refused:
            run_lm_training(request, quiet)
        assert str(out) in str(refused.value)
    assert _files(out) == before  # nothing deleted, nothing written
    assert run_lm_training(_request(tmp_path, pairs), quiet) == first  # a redelivery gets its result


def test_an_interrupted_run_is_not_resumed_by_another_even_without_its_run_record(tmp_path, pairs):
    run_lm_training(_request(tmp_path, pairs, out="whole"), quiet)
    out = _interrupted_copy(tmp_path, "cut")
    write_pairs(pairs, 8)  # the same path now holds other pairs: A's reference log-probs are not theirs
    with pytest.raises(ForeignRunError, match="dataset_sha256"):
        run_lm_training(_request(tmp_path, pairs, out="cut"), quiet)
    (out / "run.json").unlink()  # a directory from before run.json: the checkpoints' state.json still say whose
    with pytest.raises(ForeignRunError, match=r"checkpoint-00000\d/state.json: run_id 'a' there, 'b' asked"):
        run_lm_training(_request(tmp_path, pairs, out="cut", run_id="b"), quiet)
    assert not (out / "result.json").exists()


def test_a_mixture_run_is_refused_another_base_pairs_or_simplex(tmp_path, pairs):
    run_lm_training(_mixture_request(tmp_path, pairs, out="whole"), quiet)
    out = _interrupted_copy(tmp_path, "mix")
    shutil.rmtree(out / "checkpoint-000006")
    other_base = shutil.copytree(tiny_model_dir(), tmp_path / "other-base")
    other_pairs = write_pairs(tmp_path / "other.jsonl", 6)
    for request, says in [(_mixture_request(tmp_path, other_pairs, base=other_base), "base_model"),
                          (_mixture_request(tmp_path, pairs, simplex_dim=3), "config simplex_dim=2 there, 3 asked")]:
        with pytest.raises(ForeignRunError, match=says):
            run_lm_training(request, quiet)
    (out / "run.json").unlink()  # the checkpoints' state.json hold the request's config too
    with pytest.raises(ForeignRunError, match="config simplex_dim=2 there, 3 asked"):
        run_lm_training(_mixture_request(tmp_path, pairs, simplex_dim=3), quiet)


@pytest.fixture
def feature_request(tmp_path, monkeypatch):
    """`train`'s request (as Celery hands it over) with `changed` fields, the snapshot served without a store."""
    task = appendix_d(n_proxy=10, n_expert=30, seed=2)
    monkeypatch.setattr(feature_tasks, "_snapshot", lambda *_: {"proxy": task.proxy, "expert": task.expert})
    monkeypatch.setattr(feature_tasks, "report_progress", lambda *_: None)

    def request(**changed):
        return TrainingRequest(**{"run_id": "f", "snapshot_id": "s", "store_url": "sqlite://", "plan": "expert_only",
                                  "output_dir": str(tmp_path / "f"), "stage2_epochs": 4, "checkpoint_every": 2,
                                  **changed}).model_dump()
    return request


def test_the_feature_task_returns_its_result_to_its_own_request_only(feature_request):
    first = feature_tasks.train.run(feature_request())
    assert feature_tasks.train.run(feature_request(store_url="sqlite:///elsewhere.db")) == first  # the same run
    for changed, says in [({"run_id": "g"}, "run_id 'f' there, 'g' asked"), ({"plan": "two_stage"}, "plan"),
                          ({"snapshot_id": "t"}, "snapshot_id")]:
        with pytest.raises(ForeignRunError, match=says):
            feature_tasks.train.run(feature_request(**changed))


def test_a_second_delivery_while_the_first_trains_waits_and_returns_its_result(feature_request, monkeypatch):
    """Two workers trained one run at once into one directory (the audit: a redelivery while the first copy ran)."""
    import threading

    trained, training = [], threading.Event()
    train_policy = feature_tasks.train_feature_policy

    def first_one_slow(*args, **kwargs):
        trained.append(1)
        training.set()
        threading.Event().wait(0.5)  # still training when the second delivery arrives
        return train_policy(*args, **kwargs)

    monkeypatch.setattr(feature_tasks, "train_feature_policy", first_one_slow)
    results = []
    first = threading.Thread(target=lambda: results.append(feature_tasks.train.run(feature_request())))
    first.start()
    training.wait(30)
    second = feature_tasks.train.run(feature_request())
    first.join()
    assert trained == [1] and results == [second]


def test_the_feature_task_retrains_over_a_torn_result(feature_request, tmp_path, caplog):
    first = feature_tasks.train.run(feature_request())
    result = tmp_path / "f" / "result.json"
    result.write_text(result.read_text()[:40])  # an older worker killed while writing it in place
    with caplog.at_level(logging.WARNING):
        again = feature_tasks.train.run(feature_request())
    assert "result.json is unreadable" in caplog.text
    assert again["run_id"] == "f" and again["final_loss"] == first["final_loss"]
    assert json.loads(result.read_text()) == again and not result.with_name("result.json.partial").exists()


# A damaged checkpoint, reference cache or result: the run resumes from what still loads.


DAMAGE = {
    "half model.safetensors": lambda c: _truncate(c / "model.safetensors"),
    "empty state.json": lambda c: (c / "state.json").write_text(""),
    "half optimizer.safetensors": lambda c: _truncate(c / "optimizer.safetensors"),
    "no rng.safetensors": lambda c: (c / "rng.safetensors").unlink(),
    "empty directory": lambda c: [p.unlink() for p in c.iterdir()],
}


@pytest.fixture(scope="module")
def whole_lm(tmp_path_factory):
    """One uninterrupted run (4 steps, checkpoints at 2 and 4) that the damage cases copy. Module-scoped, so it
    sets up what the per-test fixtures would: its own reference cache, one torch thread."""
    root = tmp_path_factory.mktemp("whole")
    pairs = write_pairs(root / "pairs.jsonl", 6)
    with pytest.MonkeyPatch.context() as patch, one_torch_thread():
        patch.setenv("PROXYLOOP_REFERENCE_CACHE_DIR", str(root / "reference-cache"))
        get_settings.cache_clear()
        whole = run_lm_training(_request(root, pairs, out="whole"), quiet)
    get_settings.cache_clear()
    return root, pairs, whole


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_newest_checkpoint_is_skipped_for_the_one_before(whole_lm, damage, caplog):
    root, pairs, whole = whole_lm
    out = _interrupted_copy(root, damage.replace(" ", "-"))
    DAMAGE[damage](out / "checkpoint-000004")
    with caplog.at_level(logging.WARNING):
        resumed = run_lm_training(_request(root, pairs, out=out.name), quiet)
    assert f"checkpoint {out / 'checkpoint-000004'} cannot be resumed from" in caplog.text
    assert resumed["resumed_from_step"] == 2
    assert resumed["losses"] == pytest.approx(whole["losses"], abs=1e-6)


def test_with_every_checkpoint_damaged_the_run_starts_again(whole_lm):
    root, pairs, whole = whole_lm
    out = _interrupted_copy(root, "all-damaged")
    for step in (2, 4):
        _truncate(out / f"checkpoint-00000{step}" / "model.safetensors")
    resumed = run_lm_training(_request(root, pairs, out=out.name), quiet)
    assert resumed["resumed_from_step"] == 0
    assert resumed["losses"] == pytest.approx(whole["losses"], abs=1e-6)


@pytest.fixture
def empty_shared_cache(tmp_path, monkeypatch):
    """No shared reference cache to fall back on: a recomputed reference is really computed."""
    monkeypatch.setenv("PROXYLOOP_REFERENCE_CACHE_DIR", str(tmp_path / "empty-cache"))
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_a_damaged_reference_cache_is_recomputed_from_the_base_on_resume(whole_lm, empty_shared_cache, caplog):
    root, pairs, whole = whole_lm
    out = _interrupted_copy(root, "reference")
    shutil.rmtree(out / "checkpoint-000004")
    _truncate(out / REFERENCE_FILE)
    with caplog.at_level(logging.WARNING):
        resumed = run_lm_training(_request(root, pairs, out=out.name), quiet)
    assert f"{out / REFERENCE_FILE} does not load" in caplog.text
    assert resumed["resumed_from_step"] == 2  # the policy holds step 2's weights; the reference is the base's
    assert resumed["losses"] == pytest.approx(whole["losses"], abs=1e-6)
    recomputed, original = load_file(str(out / REFERENCE_FILE)), load_file(str(root / "whole" / REFERENCE_FILE))
    assert all(torch.allclose(recomputed[k], original[k], atol=1e-5) for k in original)


def test_a_torn_result_is_rebuilt_from_the_last_checkpoint(whole_lm, caplog):
    root, pairs, whole = whole_lm
    out = shutil.copytree(root / "whole", root / "torn-result")
    (out / "result.json").write_text("{")
    with caplog.at_level(logging.WARNING):
        rebuilt = run_lm_training(_request(root, pairs, out=out.name), quiet)
    assert "result.json is unreadable" in caplog.text
    assert rebuilt["resumed_from_step"] == 4 and rebuilt["final_loss"] == whole["final_loss"]
    assert json.loads((out / "result.json").read_text()) == rebuilt


def test_a_run_continued_to_more_steps_is_the_same_run(whole_lm):
    root, pairs, whole = whole_lm
    _interrupted_copy(root, "longer")
    longer = run_lm_training(_request(root, pairs, out="longer", max_steps=6, checkpoint_every=3), quiet)
    assert longer["resumed_from_step"] == 4 and longer["steps"] == 6
    assert longer["losses"][:4] == pytest.approx(whole["losses"], abs=1e-6)


def test_a_damaged_newest_mixture_checkpoint_is_skipped_for_the_one_before(tmp_path, pairs, caplog):
    whole = run_lm_training(_mixture_request(tmp_path, pairs, out="whole"), quiet)
    out = _interrupted_copy(tmp_path, "mix")
    _truncate(out / "checkpoint-000006" / "mode_mixture.safetensors")
    with caplog.at_level(logging.WARNING):
        resumed = run_lm_training(_mixture_request(tmp_path, pairs), quiet)
    assert f"checkpoint {out / 'checkpoint-000006'} cannot be resumed from" in caplog.text
    assert resumed["resumed_from_step"] == 4 and resumed["losses"] == whole["losses"]
    final, expected = (load_file(str(d / "checkpoint-000006" / "mode_mixture.safetensors")) for d in (out, tmp_path /
                                                                                                         "whole"))
    assert all(torch.equal(final[k], expected[k]) for k in expected)

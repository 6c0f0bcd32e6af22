"""The gate and the alias moves on what the audit of release paths fed them: accuracies exactly at a floor, every
checkpoint collapsed in "decide" mode, NaN weights, a version that cannot load, a broker down after a move."""

import math
import socket
from pathlib import Path

import pytest
import torch

from ground.schemas import CheckpointEvaluation, PolicyVersion
from ingest.proxy_client import BrokerUnreachable
from policies.audit_log import verify
from policies.features.model import DirectPolicy, pairwise_accuracy
from policies.promotion import (
    AnnouncementFailed,
    GateRules,
    announce,
    decide,
    finish_release_of_run,
    move_alias,
    release_checkpoint,
)
from policies.registry import RegistryError, aliases
from proxyloop.testing import isolated_settings
from tests.policies.test_audit import released  # noqa: F401  (the fixture: v1, v2, rollback to 1, back to 2)
from tests.policies.test_release import _checkpoint


def _eval(step: int, accuracy: float, mass: float | None = 0.9) -> CheckpointEvaluation:
    return CheckpointEvaluation(step=step, path=f"/c{step}", heldout_accuracy=accuracy, topk_entropy=1.0,
                                topk_mass=mass)


def _seven_of_ten() -> float:
    model = DirectPolicy(1, 2, 4)
    x = torch.zeros(10, 1)
    with torch.no_grad():
        better = int(model.log_probs(x)[0].argmax())
    y_w = torch.tensor([better] * 7 + [1 - better] * 3)
    return pairwise_accuracy(model, x, y_w, 1 - y_w)


def test_accuracies_exactly_at_the_floor_or_the_allowed_drop_are_released():
    assert _seven_of_ten() == 0.7  # counted, not a float32 mean (0.699999988)
    at_floor = decide([_eval(1, _seven_of_ten())], 0.6, GateRules(min_heldout_accuracy=0.7, indicators="advisory"))
    assert at_floor.decision == "release", at_floor.reasons
    at_drop = decide([_eval(1, 0.70)], 0.72, GateRules(min_heldout_accuracy=0.5, max_accuracy_drop=0.02,
                                                     indicators="advisory"))
    assert at_drop.decision == "release", at_drop.reasons


def test_decide_mode_says_it_keeps_the_earliest_when_every_checkpoint_collapsed():
    """The reasons said "excluding it and later checkpoints" and then released step 0, without saying why."""
    evals = [_eval(0, 0.8, 0.5), _eval(1, 0.8, 0.45), _eval(2, 0.8, 0.4)]
    gate = decide(evals, 0.6, GateRules(indicators="decide"), base_mass=0.9)
    assert gate.checkpoint is not None and gate.checkpoint.step == 0
    assert any("every checkpoint is below it: keeping the earliest, step 0" in r for r in gate.reasons)


def test_a_model_with_nan_weights_has_no_accuracy_and_the_gate_blocks():
    model = DirectPolicy(1, 2, 4)
    with torch.no_grad():
        model.net[0].weight.fill_(float("nan"))
    accuracy = pairwise_accuracy(model, torch.zeros(4, 1), torch.tensor([0, 0, 1, 1]), torch.tensor([1, 1, 0, 0]))
    assert math.isnan(accuracy)
    assert decide([_eval(1, accuracy)], 0.6, GateRules(indicators="advisory")).decision == "block"
    late = decide([_eval(1, 0.8), _eval(2, accuracy)], 0.6, GateRules(indicators="advisory"))
    assert late.decision == "pick_checkpoint" and late.checkpoint is not None and late.checkpoint.step == 1


def test_a_rollback_onto_a_version_without_weights_moves_nothing(released):  # noqa: F811
    root = released.registry_dir
    (root / "appendix-d" / "1" / "model.safetensors").unlink()
    entries = len(verify(root))
    with pytest.raises(RegistryError, match="cannot be served"):
        move_alias(released, 1, reason="roll back")
    assert aliases(root, "appendix-d")["production"] == 2 and len(verify(root)) == entries


def test_a_move_whose_announcement_fails_says_the_move_stands(released, monkeypatch):  # noqa: F811
    def broker_down(*_args: object, **_kwargs: object) -> None:
        raise ConnectionError("Kafka unreachable")

    monkeypatch.setattr("policies.promotion.announce", broker_down)
    with pytest.raises(AnnouncementFailed, match="moved and logged"):
        move_alias(released, 1, reason="roll back")
    assert aliases(released.registry_dir, "appendix-d")["production"] == 1


def test_a_retried_release_finishes_only_its_own_checkpoints_version_and_never_undoes_a_rollback(tmp_path,
                                                                                                monkeypatch):
    settings = isolated_settings(tmp_path / "home", registry_url=str(tmp_path / "registry"))
    announced = []
    monkeypatch.setattr("policies.promotion.announce", lambda s, version, alias, event_id: announced.append(
        version.version))
    first = str(_checkpoint(tmp_path / "c1", 1))
    release_checkpoint(settings, Path(first), {"flow_run_id": "r", "gate": {"checkpoint": {"path": first}}})
    assert finish_release_of_run(settings, settings.policy_name, "r", str(tmp_path / "c2")) is None  # gated again
    assert finish_release_of_run(settings, settings.policy_name, "r", first).version == 1
    assert announced == [1, 1]
    release_checkpoint(settings, _checkpoint(tmp_path / "c3", 3), {"flow_run_id": "other"})
    announced.clear()
    assert finish_release_of_run(settings, settings.policy_name, "r", first).version == 1
    assert announced == []  # production is v2 now: announcing v1 as production would undo that


def test_announcing_with_the_broker_down_names_the_setting_at_once(tmp_path):
    """Before: kafka-python's bootstrap waited 30 s, then a bare KafkaTimeoutError (rollback, approve)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    settings = isolated_settings(tmp_path / "home", kafka_bootstrap=f"127.0.0.1:{closed}")
    version = PolicyVersion(policy="appendix-d", version=1, path=str(tmp_path), lineage={})
    with pytest.raises(BrokerUnreachable, match=r"unreachable \(PROXYLOOP_KAFKA_BOOTSTRAP\)"):
        announce(settings, version, "production", "released-appendix-d-1")

"""The release flow run as Prefect runs it (a temporary Prefect server), against the session's broker.

The gate's override path: a blocked run is released only with a reason, and who and why land in the
version's lineage and in the promotion history.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from ground.schemas import CheckpointEvaluation, GateDecision, RetrainRunRecord, SnapshotInfo
from ground.settings import Settings, get_settings
from ingest.bus import ensure_topics
from ingest.store import make_engine, record_run
from policies.audit_log import verify
from policies.registry import resolve, versions
from proxyloop import stack
from tests.policies.test_release import _checkpoint

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(service_settings: Settings, kafka: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    settings = service_settings.model_copy(update={
        "home": tmp_path, "store_url": f"sqlite:///{tmp_path}/store.db", "registry_url": str(tmp_path / "registry"),
        "topic_policy_released": f"released-{tmp_path.name}"})
    ensure_topics(settings)
    for key, value in stack.child_env(settings).items():  # the flow resolves get_settings(); Prefect keeps its own
        if key.startswith("PROXYLOOP_"):
            monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    return settings


def _blocked_run(settings: Settings, checkpoint: Path) -> str:
    evaluation = CheckpointEvaluation(step=10, path=str(checkpoint), heldout_accuracy=0.4, topk_entropy=1.0,
                                      topk_mass=0.9)
    gate = GateDecision(decision="block", checkpoint=evaluation, baseline_accuracy=0.6,
                        reasons=["held-out accuracy 0.400 is below the minimum 0.55"])
    run = RetrainRunRecord(run_id="run-1", gate=gate,
                           snapshot=SnapshotInfo(snapshot_id="snap-1", item_kind="features", n_expert=3, n_proxy=9))
    with Session(make_engine(settings.resolved_store_url)) as session:
        record_run(session, run, "blocked")
        session.commit()
    return "run-1"


def test_a_blocked_run_is_released_only_with_a_reason_and_the_override_is_audited(
    settings: Settings, prefect_server: None, tmp_path: Path
) -> None:
    from flows.retrain import release_flow

    run_id = _blocked_run(settings, _checkpoint(tmp_path / "ckpt", 1))
    with pytest.raises(PermissionError, match="blocked by the gate"):
        release_flow(run_id)
    assert versions(settings.registry_dir, settings.policy_name) == []

    release = release_flow(run_id, override_reason="accepted: held-out set too small (ticket 7)", operator="alice")

    assert (release.version, release.alias, release.family) == (1, "production", "feature")
    assert release.override is not None and release.override["by"] == "alice"
    lineage = resolve(settings.registry_dir, f"{settings.policy_name}@production").lineage
    assert lineage["override"]["reason"] == "accepted: held-out set too small (ticket 7)"
    assert lineage["override"]["gate_reasons"] == ["held-out accuracy 0.400 is below the minimum 0.55"]
    (entry,) = verify(settings.registry_dir)
    assert (entry.action, entry.who, entry.why, entry.snapshot_id, entry.version) == (
        "override", "alice", "accepted: held-out set too small (ticket 7)", "snap-1", 1)
    assert entry.gate["decision"] == "block"

    again = release_flow(run_id, override_reason="clicked twice", operator="bob")  # released once, whatever is asked
    assert again == release and versions(settings.registry_dir, settings.policy_name) == [1]
    assert len(verify(settings.registry_dir)) == 1


def test_a_release_whose_announcement_failed_is_finished_by_the_retry_not_released_twice(
    settings: Settings, prefect_server: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The broker down after the version was registered and the alias moved (the audit: approve then registered v2
    for the same run). The retry announces v1; the registry and the promotion log hold one release."""
    from kafka.errors import KafkaTimeoutError

    from flows.retrain import release_flow
    from policies import promotion

    run_id = _blocked_run(settings, _checkpoint(tmp_path / "ckpt", 1))
    working = promotion.connect_producer

    def broker_down(_settings: Settings) -> None:
        raise KafkaTimeoutError("Unable to bootstrap from the broker")

    monkeypatch.setattr(promotion, "connect_producer", broker_down)
    with pytest.raises(KafkaTimeoutError):
        release_flow(run_id, override_reason="ship it", operator="alice")
    assert versions(settings.registry_dir, settings.policy_name) == [1]

    monkeypatch.setattr(promotion, "connect_producer", working)
    release = release_flow(run_id, override_reason="ship it, broker back", operator="alice")
    assert release.version == 1 and versions(settings.registry_dir, settings.policy_name) == [1]
    assert [(e.action, e.version) for e in verify(settings.registry_dir)] == [("override", 1)]
    assert resolve(settings.registry_dir, f"{settings.policy_name}@production").version == 1


def test_a_release_registers_while_holding_its_runs_lock(
    settings: Settings, prefect_server: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two operators approving one run at once both found it unreleased and registered a version each (the audit:
    v3 and v4 for one run). The release now looks and registers under the run's lock: while it registers, nobody
    else can take that lock."""
    import fcntl

    from flows.retrain import release_flow
    from policies import promotion
    from policies.registry_lock import release_lock_path

    run_id = _blocked_run(settings, _checkpoint(tmp_path / "ckpt", 1))
    register, contended = promotion.register, []

    def register_and_try_the_lock(*args: object, **kwargs: object) -> object:
        with open(release_lock_path(settings.registry_dir, run_id), "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                contended.append(False)
            except BlockingIOError:
                contended.append(True)
        return register(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(promotion, "register", register_and_try_the_lock)
    assert release_flow(run_id, override_reason="ship it", operator="alice").version == 1
    assert contended == [True]

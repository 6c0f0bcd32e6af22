"""The promotion history: every release, override and alias move chained by hash; tampering is named by seq."""

import hashlib
import json
import multiprocessing
import uuid
from datetime import UTC, datetime, timedelta

import fsspec
import pytest
import torch
from typer.testing import CliRunner

from ground.settings import get_settings
from policies.audit_log import (
    GENESIS_HASH,
    AuditTampered,
    ReleaseEvidence,
    _content_hash,
    current_user,
    record_move,
    serving_at,
    verify,
)
from policies.promotion import move_alias, release_checkpoint
from policies.registry import aliases, register
from policies.registry_lock import AUDIT_FILE
from policies.registry_remote import push
from proxyloop.cli import app
from proxyloop.testing import isolated_settings
from tests.conftest import export
from tests.policies.test_release import _checkpoint

START = datetime(2025, 3, 1, 10, 0, tzinfo=UTC)  # the fake clock: entry n is written at START + n hours
PASSED = {"decision": "release", "reasons": [], "baseline_accuracy": 0.7, "checkpoint": {"heldout_accuracy": 0.81}}
BLOCKED = {"decision": "block", "reasons": ["held-out accuracy 0.62 < 0.70"], "baseline_accuracy": 0.7,
           "checkpoint": {"heldout_accuracy": 0.62}}


@pytest.fixture
def released(tmp_path, monkeypatch):
    """v1 released, v2 released over a blocked gate, rollback to v1, move back to v2 — one hour apart."""
    settings = isolated_settings(tmp_path / "home", registry_url=str(tmp_path / "registry"))
    ticks = iter(START + timedelta(hours=n) for n in range(100))
    monkeypatch.setattr("policies.audit_log.utcnow", lambda: next(ticks))
    announced = []
    monkeypatch.setattr("policies.promotion.announce",
                        lambda settings, version, alias, event_id: announced.append((version.version, alias)))
    release_checkpoint(settings, _checkpoint(tmp_path / "c1", 1), {}, evidence=ReleaseEvidence(
        who="alice", why="gate passed for run r1", gate=PASSED, snapshot_id="snap-1"))
    release_checkpoint(settings, _checkpoint(tmp_path / "c2", 2), {}, evidence=ReleaseEvidence(
        who="bob", why="accepted: held-out set too small", gate=BLOCKED, snapshot_id="snap-2", override=True))
    move_alias(settings, 1, reason="v2 regressed on tickets")
    move_alias(settings, 2, reason="regression fixed upstream")
    assert announced == [(1, "production"), (2, "production"), (1, "production"), (2, "production")]
    return settings


def _rewrite(settings, edit):
    """Rewrite the log file as an attacker with write access would: `edit` gets and returns the parsed lines."""
    path = settings.registry_dir / AUDIT_FILE
    lines = edit([json.loads(line) for line in path.read_text().splitlines()])
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_release_override_rollback_and_move_are_chained_with_who_why_gate_and_snapshot(released):
    entries = verify(released.registry_dir)

    me = current_user()
    assert [(e.seq, e.at, e.action, e.policy, e.version, e.alias, e.previous_version, e.who, e.why, e.snapshot_id)
            for e in entries] == [
        (0, START, "release", "appendix-d", 1, "production", None, "alice", "gate passed for run r1", "snap-1"),
        (1, START + timedelta(hours=1), "override", "appendix-d", 2, "production", 1, "bob",
         "accepted: held-out set too small", "snap-2"),
        (2, START + timedelta(hours=2), "rollback", "appendix-d", 1, "production", 2, me,
         "v2 regressed on tickets", "snap-1"),
        (3, START + timedelta(hours=3), "alias_move", "appendix-d", 2, "production", 1, me,
         "regression fixed upstream", "snap-2"),
    ]
    assert [e.gate for e in entries] == [PASSED, BLOCKED, {}, {}]
    assert [e.prev_hash for e in entries] == [GENESIS_HASH] + [e.hash for e in entries[:-1]]
    assert aliases(released.registry_dir, "appendix-d") == {"production": 2}


@pytest.mark.parametrize(("at", "version"), [
    (START - timedelta(minutes=1), None),
    (START, 1),
    (START + timedelta(minutes=30), 1),
    (START + timedelta(hours=1, minutes=30), 2),
    (START + timedelta(hours=2, minutes=30), 1),
    (START + timedelta(days=30), 2),
    (datetime(2025, 3, 1, 12, 30), 1),  # naive means UTC
])
def test_serving_at_answers_the_version_behind_the_alias_at_that_time(released, at, version):
    entry = serving_at(released.registry_dir, "appendix-d", "production", at)
    assert (entry.version if entry else None) == version


def test_serving_at_an_alias_that_never_moved_is_none(released):
    assert serving_at(released.registry_dir, "appendix-d", "staging", START + timedelta(days=1)) is None


def test_editing_an_old_entrys_why_is_detected_and_named_by_seq(released):
    def edit(lines):
        lines[1]["why"] = "gate passed"
        return lines

    _rewrite(released, edit)
    with pytest.raises(AuditTampered, match=r"^seq 1: content hash mismatch"):
        verify(released.registry_dir)
    with pytest.raises(AuditTampered, match=r"^seq 1: content hash mismatch"):
        serving_at(released.registry_dir, "appendix-d", "production", START)


def test_deleting_a_middle_entry_is_detected_as_a_seq_gap(released):
    _rewrite(released, lambda lines: lines[:1] + lines[2:])
    with pytest.raises(AuditTampered, match=r"^seq gap: line 2 holds seq 2, expected seq 1 "):
        verify(released.registry_dir)


def test_swapping_two_entries_is_detected_as_a_seq_gap(released):
    _rewrite(released, lambda lines: [lines[0], lines[2], lines[1], lines[3]])
    with pytest.raises(AuditTampered, match=r"^seq gap: line 2 holds seq 2, expected seq 1 "):
        verify(released.registry_dir)


def test_re_hashing_an_edited_entry_breaks_the_link_from_the_next_one(released):
    def edit_and_rehash(lines):
        lines[1]["who"] = "alice"
        body = {key: value for key, value in lines[1].items() if key != "hash"}
        lines[1]["hash"] = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
        return lines

    _rewrite(released, edit_and_rehash)
    with pytest.raises(AuditTampered, match=r"^seq 2: broken link: prev_hash is not the hash of seq 1 "):
        verify(released.registry_dir)


def test_the_remote_mirror_refuses_a_local_log_whose_newest_entries_were_cut_off(released):
    url = f"memory://registry-{uuid.uuid4().hex}"
    push(released.registry_dir, url, "appendix-d")
    with fsspec.open(f"{url}/{AUDIT_FILE}", "rb") as mirrored:
        assert mirrored.read() == (released.registry_dir / AUDIT_FILE).read_bytes()
    _rewrite(released, lambda lines: lines[:2])  # a valid but shorter chain: verify alone cannot tell
    assert len(verify(released.registry_dir)) == 2
    record_move(released.registry_dir, "appendix-d", "production", 1, why="after the cut")
    with pytest.raises(AuditTampered, match="does not extend the mirrored history"):
        push(released.registry_dir, url, "appendix-d")


def _move_back_and_forth(root: str, writer: str) -> None:
    from pathlib import Path

    for i in range(50):
        record_move(Path(root), "demo", "production", 1 + i % 2, why=f"{writer}-{i}", who=writer)


def test_two_processes_appending_50_entries_each_leave_one_valid_chain_of_100(tmp_path):
    for _ in range(2):
        register(tmp_path, "demo", {"w": torch.ones(2)}, {"family": "direct"}, {}, alias=None)
    spawn = multiprocessing.get_context("spawn")
    writers = [spawn.Process(target=_move_back_and_forth, args=(str(tmp_path), name)) for name in ("p", "q")]
    for process in writers:
        process.start()
    for process in writers:
        process.join()
    assert [process.exitcode for process in writers] == [0, 0]

    entries = verify(tmp_path)
    assert [e.seq for e in entries] == list(range(100))
    for name in ("p", "q"):
        assert [e.why for e in entries if e.who == name] == [f"{name}-{i}" for i in range(50)]
    # read-previous, move and append happen under one lock: each entry saw the move before it
    assert [e.previous_version for e in entries] == [None] + [e.version for e in entries[:-1]]


@pytest.fixture
def cli(released, monkeypatch):
    export(released, monkeypatch)
    yield lambda *args: CliRunner().invoke(app, ["history", *args])
    get_settings.cache_clear()


def test_history_at_prints_what_was_serving_then(cli):
    result = cli("--at", "2025-03-01T12:30")
    assert result.exit_code == 0, result.output
    assert result.output == (
        "appendix-d@production at 2025-03-01T12:30:00+00:00: v1 since 2025-03-01T12:00:00+00:00 "
        f"(rollback by {current_user()}: v2 regressed on tickets; snapshot snap-1; entry seq 2)\n")


def test_history_at_before_any_release_says_nothing_was_released(cli):
    result = cli("--at", "2025-03-01T09:00:00+00:00")
    assert result.exit_code == 0, result.output
    assert result.output == "nothing was released as appendix-d@production by 2025-03-01T09:00:00+00:00\n"


def test_history_lists_the_verified_chain_as_json(cli, released):
    result = cli("--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == [e.model_dump(mode="json") for e in verify(released.registry_dir)]


def test_history_exits_1_naming_the_seq_when_the_chain_is_broken(cli, released):
    def edit(lines):
        lines[0]["version"] = 2
        return lines

    _rewrite(released, edit)
    result = cli("--at", "2025-03-01T12:30")
    assert result.exit_code == 1
    assert "the promotion history was tampered with: seq 0: content hash mismatch" in result.output


def test_a_correctly_chained_entry_that_is_not_a_valid_entry_is_named_by_seq(cli, released):
    """Found by a release audit: an unknown action, re-hashed and re-linked, was a pydantic traceback."""
    def rechain_with_an_unknown_action(lines):
        lines[-1]["action"] = "delete"
        lines[-1]["hash"] = _content_hash(lines[-1])  # the log's own hash: the entry stays chained
        return lines

    _rewrite(released, rechain_with_an_unknown_action)
    with pytest.raises(AuditTampered, match=r"^seq 3: chained correctly but not a valid entry \(action: "):
        verify(released.registry_dir)
    with pytest.raises(AuditTampered, match=r"^seq 3: "):
        serving_at(released.registry_dir, "appendix-d", "production", START)
    result = cli("--at", "2025-03-01T12:30")
    assert result.exit_code == 1 and "tampered with: seq 3: chained correctly" in result.output

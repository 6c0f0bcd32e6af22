"""The promotion log under a full disk or a crash mid-append (policies/audit_log.py): the entry is written before
the alias moves and taken back when either step fails, and an unfinished last line is a write that never finished,
not tampering. Before, a full disk during a release left the alias moved, a torn line at the end of the log, and
every later release, rollback and `proxyloop history` refusing the log as tampered."""

import errno
import logging

import pytest

from policies.audit_log import verify
from policies.promotion import move_alias
from policies.registry import aliases
from policies.registry_lock import AUDIT_FILE
from tests.policies.test_audit import released  # noqa: F401  (the fixture: v1, v2, rollback to 1, back to 2)


def _full_disk(*_args: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_log_entry_that_cannot_be_written_leaves_the_alias_and_the_log_as_they_were(released, monkeypatch):  # noqa: F811
    root = released.registry_dir
    before = (root / AUDIT_FILE).read_bytes()
    monkeypatch.setattr("policies.audit_log.os.fsync", _full_disk)
    with pytest.raises(OSError, match="No space left"):
        move_alias(released, 1, reason="roll back")
    assert aliases(root, "appendix-d")["production"] == 2
    assert (root / AUDIT_FILE).read_bytes() == before
    monkeypatch.undo()
    monkeypatch.setattr("policies.promotion.announce", lambda *args, **kwargs: None)
    move_alias(released, 1, reason="roll back, disk freed")
    assert [e.version for e in verify(root)] == [1, 2, 1, 2, 1]


def test_an_alias_that_cannot_be_written_takes_its_entry_back(released, monkeypatch):  # noqa: F811
    root = released.registry_dir
    before = (root / AUDIT_FILE).read_bytes()
    monkeypatch.setattr("policies.audit_log.set_alias", _full_disk)
    with pytest.raises(OSError):
        move_alias(released, 1, reason="roll back")
    assert (root / AUDIT_FILE).read_bytes() == before and aliases(root, "appendix-d")["production"] == 2


def test_an_unfinished_last_line_is_set_aside_with_a_warning_and_cut_by_the_next_write(released, caplog):  # noqa: F811
    root = released.registry_dir
    with open(root / AUDIT_FILE, "ab") as log:
        log.write(b'{"action": "release", "alias": "production", "at": "2025-03-01T14:0')  # an append cut short
    with caplog.at_level(logging.WARNING, logger="proxyloop.policies.audit"):
        assert len(verify(root)) == 4
    assert "unfinished entry" in caplog.text
    move_alias(released, 1, reason="roll back after the disk filled")
    assert [e.seq for e in verify(root)] == [0, 1, 2, 3, 4]
    assert (root / AUDIT_FILE).read_bytes().endswith(b"\n")


def test_a_complete_but_damaged_last_line_is_still_tampering(released):  # noqa: F811
    root = released.registry_dir
    with open(root / AUDIT_FILE, "ab") as log:
        log.write(b'{"seq": 4, "hash": "forged"}\n')
    with pytest.raises(Exception, match="audit|seq 4|entry"):
        verify(root)

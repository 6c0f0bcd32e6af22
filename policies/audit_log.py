"""The promotion history: an append-only, hash-chained log of every release, alias move, rollback and gate override,
so "what was serving at time T, and who decided it" has an answer nobody can quietly rewrite. One log per registry,
`<root>/audit.jsonl`. Each line is an `AuditEntry` whose `hash` covers its own content and the previous entry's
hash, so editing, deleting or reordering an old entry breaks the chain. A release moves an alias and logs it under
the registry's one lock (policies/registry_lock.py).

The entry is written (and synced) before the alias moves, and taken back if the move fails: an alias never points
anywhere its log does not say. An append cut short (a full disk, a crash mid-write) leaves a last line without its
newline; that is a write that never finished, not tampering, so it is set aside with a warning (the next write
removes it) instead of stopping every later release, rollback and `proxyloop history` until someone edits the
file by hand."""

from __future__ import annotations

import getpass
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from contextlib import suppress
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ground.moments import as_utc, utcnow
from ground.schemas import PolicyVersion
from ground.validation import validation_problems
from policies.registry import aliases, set_alias
from policies.registry_lock import AUDIT_FILE, complete_log, exclusive

log = logging.getLogger("proxyloop.policies.audit")

GENESIS_HASH = "0" * 64  # `prev_hash` of entry 0
RESTORE_HINT = ("restore audit.jsonl from the registry's remote mirror or a backup, then run "
                "`proxyloop history` to verify it again")

AuditAction = Literal["release", "alias_move", "rollback", "override"]


class AuditTampered(RuntimeError):
    """The log no longer matches its hash chain: an entry was edited, deleted, inserted or reordered."""


def current_user() -> str:
    """The OS user, for entries whose caller names nobody (`getpass` fails without a passwd entry: containers)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid-{os.getuid()}"


class ReleaseEvidence(BaseModel):
    """What a release brings into the log: who asked, why, what the gate saw, which snapshot it was trained on."""

    who: str = Field(default_factory=current_user)
    why: str = ""
    gate: dict[str, Any] = Field(default_factory=dict, description="The gate's decision, reasons and metrics.")
    snapshot_id: str | None = None
    override: bool = Field(False, description="Released although the gate blocked it (logged as 'override').")


class AuditEntry(BaseModel):
    """One line of the log; `hash` = sha256 of the canonical JSON of every other field."""

    model_config = ConfigDict(extra="forbid")

    seq: int = Field(description="0-based position in the log.")
    at: datetime = Field(description="When the alias moved (UTC).")
    action: AuditAction
    policy: str
    version: int = Field(description="The version the alias points at from now on.")
    alias: str
    previous_version: int | None = Field(description="What the alias pointed at before; None if it was new.")
    who: str
    why: str
    gate: dict[str, Any] = Field(description="The gate's evidence for a release; {} for a manual alias move.")
    snapshot_id: str | None
    prev_hash: str
    hash: str


def _content_hash(fields: dict[str, Any]) -> str:
    # Over the JSON as stored (not a re-serialised model), so any changed value changes the hash
    # while key order and whitespace of the line do not matter.
    body = {key: value for key, value in fields.items() if key != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _entry_lines(root: Path) -> list[str]:
    """The log's complete lines (`complete_log`), with a warning when an unfinished last line is left out."""
    complete, size = complete_log(root)
    if len(complete) < size:
        _warn_unfinished(root, size - len(complete))
    return complete.decode().splitlines()


def _warn_unfinished(root: Path, size: int) -> None:
    log.warning("%s ends with an unfinished entry (%d bytes without a newline: an append cut short by a full disk or "
                "a crash); it is not part of the log and the next write removes it", root / AUDIT_FILE, size)


def _chain_head(root: Path) -> AuditEntry | None:
    """The last entry, which the next one links to; a damaged last line stops the write before the alias moves.
    The caller holds `exclusive`: an unfinished last line is cut off here, so the next entry starts a line."""
    complete, size = complete_log(root)
    if len(complete) < size:
        _warn_unfinished(root, size - len(complete))
        os.truncate(root / AUDIT_FILE, len(complete))
    lines = complete.decode().splitlines()
    try:
        return AuditEntry.model_validate_json(lines[-1]) if lines else None
    except ValueError as exc:
        raise AuditTampered(f"the last line of {root / AUDIT_FILE} is not an entry ({exc}); {RESTORE_HINT}") from exc


def _readable(root: Path) -> Iterator[AuditEntry]:
    """Entries that parse, unverified: for look-ups while writing (a damaged old line must not block a rollback)."""
    for line in _entry_lines(root):
        with suppress(ValueError):
            yield AuditEntry.model_validate_json(line)


def _append(root: Path, head: AuditEntry | None, **fields: Any) -> tuple[AuditEntry, int]:
    """Chain `fields` to `head` and append them as one synced line; the entry and the log's size before it. A write
    that fails part-way is cut off again before the error propagates. The caller holds `exclusive`."""
    draft = AuditEntry(seq=head.seq + 1 if head else 0, at=utcnow(), prev_hash=head.hash if head else GENESIS_HASH,
                       hash="", **fields)
    stored = draft.model_dump(mode="json")
    stored["hash"] = _content_hash(stored)
    path = root / AUDIT_FILE
    size = path.stat().st_size if path.exists() else 0
    try:
        with open(path, "a") as out:
            out.write(json.dumps(stored, sort_keys=True) + "\n")
            out.flush()
            os.fsync(out.fileno())  # on disk before the alias moves
    except OSError:
        _cut(path, size)
        raise
    return AuditEntry.model_validate(stored), size


def _cut(path: Path, size: int) -> None:
    """Take the log back to `size` bytes (best effort: if even that fails, the next write finds the tail torn)."""
    with suppress(OSError):
        os.truncate(path, size)


def _move_logged(root: Path, policy: str, alias: str, version: int, head: AuditEntry | None,
                 **fields: Any) -> AuditEntry:
    """Log the move, then make it; the entry is taken back if the alias cannot be written."""
    entry, size = _append(root, head, policy=policy, alias=alias, version=version, **fields)
    try:
        set_alias(root, policy, alias, version)
    except BaseException:
        _cut(root / AUDIT_FILE, size)
        raise
    return entry


def logged_releases(root: Path, policy: str) -> set[int]:
    """Versions of `policy` whose release (or override) the log holds: a release that failed after registering its
    version but before logging it is not one of them."""
    return {entry.version for entry in _readable(root)
            if entry.action in ("release", "override") and entry.policy == policy}


def record_release(root: Path, version: PolicyVersion, alias: str, evidence: ReleaseEvidence) -> AuditEntry:
    """Point `alias` at a freshly registered `version` and log it as a release (or an override)."""
    with exclusive(root):  # one lock around read-previous, log and move: `previous_version` stays exact
        head = _chain_head(root)
        previous = aliases(root, version.policy).get(alias)
        return _move_logged(root, version.policy, alias, version.version, head,
                            action="override" if evidence.override else "release", previous_version=previous,
                            who=evidence.who, why=evidence.why, gate=evidence.gate, snapshot_id=evidence.snapshot_id)


def record_move(root: Path, policy: str, alias: str, version: int, why: str, who: str | None = None) -> AuditEntry:
    """Point `alias` at an existing `version` and log it: 'rollback' if lower than before, else 'alias_move'.

    The entry carries the snapshot the version was released from, so history also answers which data served.
    """
    with exclusive(root):
        head = _chain_head(root)
        previous = aliases(root, policy).get(alias)
        released = [entry for entry in _readable(root)
                    if entry.action in ("release", "override") and (entry.policy, entry.version) == (policy, version)]
        return _move_logged(root, policy, alias, version, head,
                            action="rollback" if previous is not None and version < previous else "alias_move",
                            previous_version=previous, who=who or current_user(), why=why, gate={},
                            snapshot_id=released[-1].snapshot_id if released else None)


def verify(root: Path) -> list[AuditEntry]:
    """Every entry, after re-computing each hash and link; raises `AuditTampered` naming the first bad entry.

    Detects an edited, deleted, inserted or reordered entry. It cannot detect the loss of the newest entries
    (the remaining prefix is a valid chain): compare the last hash with a copy kept elsewhere for that.
    """
    entries: list[AuditEntry] = []
    prev_hash = GENESIS_HASH
    for expected_seq, line in enumerate(_entry_lines(root)):
        try:
            stored = json.loads(line)
            seq = stored["seq"]
        except (ValueError, TypeError, KeyError) as exc:
            raise AuditTampered(f"line {expected_seq + 1} of the audit log is not an entry ({exc!r}); "
                                f"{RESTORE_HINT}") from exc
        if seq != expected_seq:
            raise AuditTampered(f"seq gap: line {expected_seq + 1} holds seq {seq}, expected seq {expected_seq} "
                                f"(an entry was deleted, inserted or reordered); {RESTORE_HINT}")
        if stored.get("hash") != _content_hash(stored):
            raise AuditTampered(f"seq {seq}: content hash mismatch (the entry was edited after it was written); "
                                f"{RESTORE_HINT}")
        if stored.get("prev_hash") != prev_hash:
            raise AuditTampered(f"seq {seq}: broken link: prev_hash is not the hash of seq {seq - 1} "
                                f"(an earlier entry was edited and re-hashed, or replaced); {RESTORE_HINT}")
        try:
            entries.append(AuditEntry.model_validate(stored))
        except ValidationError as exc:  # hashed and linked, but not an entry: not written by `_append`
            problems = validation_problems(exc)
            raise AuditTampered(f"seq {seq}: chained correctly but not a valid entry ({problems}); "
                                f"{RESTORE_HINT}") from exc
        prev_hash = stored["hash"]
    return entries


def serving_at(root: Path, policy: str, alias: str, at: datetime) -> AuditEntry | None:
    """The entry that last pointed `policy@alias` somewhere at or before `at` (naive = UTC); None if none yet.

    Verifies the whole chain first, so the answer never comes from a tampered log.
    """
    at = as_utc(at)
    matching = [entry for entry in verify(root) if (entry.policy, entry.alias) == (policy, alias) and entry.at <= at]
    return matching[-1] if matching else None

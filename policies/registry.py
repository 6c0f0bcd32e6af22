"""Policy registry on a directory: immutable numbered versions with lineage, movable aliases, and the
promotion history that logs every alias move.

Layout: `<root>/<name>/<version>/{model.safetensors, config.json, lineage.json, MODEL_CARD.md}`
and `<root>/<name>/aliases.json`. A version is written to a temporary directory and renamed
into place, so readers never see a half-written one.

The promotion history lives here too because a release moves an alias and logs it under one lock:
an append-only, hash-chained log of every release, alias move, rollback and gate override, so "what
was serving at time T, and who decided it" has an answer nobody can quietly rewrite. One log per
registry, `<root>/audit.jsonl`. Each line is an `AuditEntry` whose `hash` covers its own content and
the previous entry's hash, so editing, deleting or reordering an old entry breaks the chain.
"""

from __future__ import annotations

import fcntl
import getpass
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ground.schemas import PolicyVersion, as_utc, utcnow

if TYPE_CHECKING:  # torch and safetensors load when a version is written, not when a flow module imports this
    import torch

ALIASES_FILE = "aliases.json"
REGISTER_ATTEMPTS = 100  # numbers `register` tries before giving up; each retry means another writer won a race
# Written into every version's config.json. 2: the two-stage adapter's centre is part of the weights
# (adapter.centre_weight / centre_bias). Versions without the field were written by format 1 or by
# format-2 code before the field existed; the loader tells them apart by their tensors.
REGISTRY_FORMAT = 2
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
ALIAS_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
VERSION_PATTERN = re.compile(r"[0-9]{1,18}")  # a version number as a tag or a folder name


class RegistryError(ValueError):
    pass


class RegistryFormatError(RegistryError):
    """A version written in a registry format this proxyloop cannot read; the message names both formats."""


def validate_name(name: str) -> str:
    if not NAME_PATTERN.match(name) or ".." in name:
        raise RegistryError(
            f"invalid policy name {name!r}: use lower-case letters, digits, '.', '_' or '-' (max 64), "
            "starting with a letter or digit"
        )
    return name


def _validate_alias(alias: str) -> str:
    if not ALIAS_PATTERN.match(alias):
        raise RegistryError(f"invalid alias {alias!r}: lower-case letters, digits, '_' or '-'")
    return alias


def _write_json_atomic(path: Path, content: object) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "w") as handle:
        json.dump(content, handle, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)


def versions(root: Path, name: str) -> list[int]:
    policy_dir = root / validate_name(name)
    if not policy_dir.is_dir():
        return []
    return sorted(int(p.name) for p in policy_dir.iterdir() if p.is_dir() and VERSION_PATTERN.fullmatch(p.name))


def aliases(root: Path, name: str) -> dict[str, int]:
    """alias → version. A damaged file raises `RegistryError` naming it: serving answers "the registry is
    broken" instead of a 500, and nobody rewrites it on top of aliases that can no longer be read."""
    path = root / validate_name(name) / ALIASES_FILE
    fix = "; repair or restore it (`proxyloop history` shows where each alias was last moved)"
    try:
        content = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise RegistryError(f"{path} cannot be read as JSON ({exc}){fix}") from exc
    if not isinstance(content, dict):
        raise RegistryError(f"{path} holds {json.dumps(content)[:80]}, not a JSON object of alias → version{fix}")
    bad = {alias: version for alias, version in content.items() if type(version) is not int or version < 0}
    if bad:
        raise RegistryError(f"{path} maps aliases to values that are not version numbers: {bad}{fix}")
    return content


def set_alias(root: Path, name: str, alias: str, version: int) -> None:
    """Point `alias` at an existing version. Under the registry's lock (re-entrant: the release path calls this
    holding it), so two writers' read-modify-writes of aliases.json cannot lose one of the moves."""
    with _exclusive(root):
        if version not in versions(root, name):
            raise RegistryError(f"{name} has no version {version}; known: {versions(root, name)}")
        current = aliases(root, name)
        current[_validate_alias(alias)] = version
        _write_json_atomic(root / name / ALIASES_FILE, current)


def _highest_used(root: Path, name: str) -> int:
    """The highest number this policy has ever used: version folders, any other entry named like one (a stray
    file), aliases, and every version the promotion history mentions. A number is never handed out twice, so an
    alias or a log entry naming a version deleted by hand never comes to describe a different model."""
    used = [int(p.name) for p in (root / name).iterdir() if VERSION_PATTERN.fullmatch(p.name)]
    with suppress(RegistryError):  # a damaged aliases.json stops the alias move that follows, not the numbering
        used += aliases(root, name).values()
    for line in _raw_lines(root):  # raw JSON: an entry the model rejects still names a number that was used
        with suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict) and entry.get("policy") == name:
                used += [v for v in (entry.get("version"), entry.get("previous_version")) if type(v) is int]
    return max(used, default=0)


def _model_card(name: str, version: int, lineage: dict[str, Any]) -> str:
    lines = [f"# {name} v{version}", "", "Released by proxyloop. Lineage:", ""]
    lines += [f"- **{key}**: `{json.dumps(value, default=str)[:300]}`" for key, value in sorted(lineage.items())]
    return "\n".join(lines) + "\n"


def register(
    root: Path, name: str, tensors: dict[str, torch.Tensor] | None, config: dict[str, Any],
    lineage: dict[str, Any], alias: str | None = "production", directories: dict[str, Path] | None = None,
) -> PolicyVersion:
    """Write a new immutable version and (optionally) point an alias at it.

    `tensors` become `model.safetensors`; `directories` (e.g. a Hugging Face model directory) are
    copied in under the given names before the version becomes visible. Releases pass `alias=None` and
    move the alias through `record_release` below, which logs the move in the promotion history.
    """
    policy_dir = root / validate_name(name)
    policy_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=policy_dir, prefix=".staging-"))
    try:
        if tensors is not None:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in tensors.items()}, str(staging / "model.safetensors"))
        for subdir, source in (directories or {}).items():
            shutil.copytree(source, staging / subdir)
        (staging / "config.json").write_text(json.dumps({**config, "format_version": REGISTRY_FORMAT}, indent=2,
                                                        sort_keys=True))
        for _ in range(REGISTER_ATTEMPTS):
            version = _highest_used(root, name) + 1
            target = policy_dir / str(version)
            if not VERSION_PATTERN.fullmatch(target.name):
                raise RegistryError(f"{policy_dir} has no version number left after {version - 1}")
            full_lineage = {**lineage, "policy": name, "version": version}
            (staging / "lineage.json").write_text(json.dumps(full_lineage, indent=2, default=str))
            (staging / "MODEL_CARD.md").write_text(_model_card(name, version, full_lineage))
            try:
                staging.rename(target)  # fails if the name was taken since `_highest_used` looked
                break
            except OSError as exc:
                if not target.exists() and not target.is_symlink():  # not a lost race: retrying cannot help
                    raise RegistryError(f"cannot move the new version into {target}: {exc}") from exc
        else:
            raise RegistryError(f"{policy_dir}: {REGISTER_ATTEMPTS} version numbers in a row were taken by other "
                                "writers while this one was registering; try again")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if alias:
        set_alias(root, name, alias, version)
    return PolicyVersion(policy=name, version=version, path=str(policy_dir / str(version)), lineage=full_lineage)


def version_of(root: Path, ref: str) -> tuple[str, int]:
    """`name@alias`, `name@<version>` or `name` (= `name@production`) → (name, version number), checked to
    exist: an alias left pointing at a folder deleted by hand is a `RegistryError`, not a crash further on."""
    name, _, tag = ref.partition("@")
    tag = tag or "production"
    validate_name(name)
    if VERSION_PATTERN.fullmatch(tag):  # ASCII digits only: "²".isdigit() is True, int("²") raises
        version = int(tag)
        if version not in versions(root, name):
            raise RegistryError(f"{name} has no version {version}; known: {versions(root, name)}")
    else:
        known = aliases(root, name)
        if tag not in known:
            raise RegistryError(f"{name} has no alias {tag!r}; known aliases: {sorted(known)}")
        version = known[tag]
        if not (root / name / str(version)).is_dir():  # one stat, not a listing: this runs on every request
            raise RegistryError(f"{name}@{tag} points at version {version}, whose folder "
                                f"{root / name / str(version)} is missing; known: {versions(root, name)}")
    return name, version


def resolve(root: Path, ref: str) -> PolicyVersion:
    """`ref` as in `version_of` → the version on disk, with its lineage."""
    name, version = version_of(root, ref)
    path = root / name / str(version)
    try:
        lineage = json.loads((path / "lineage.json").read_text())
    except (OSError, ValueError) as exc:  # deleted or damaged since `version_of` looked
        raise RegistryError(f"{ref}: cannot read {path / 'lineage.json'} ({exc})") from exc
    return PolicyVersion(policy=name, version=version, path=str(path), lineage=lineage)


def list_policies(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and NAME_PATTERN.match(p.name))


# The promotion history (`<root>/audit.jsonl`).

AUDIT_FILE = "audit.jsonl"
LOCK_FILE = ".audit.lock"
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


_held = threading.local()  # lock files this thread holds: a nested `_exclusive` must not wait for itself


@contextmanager
def _exclusive(root: Path) -> Iterator[None]:
    """Hold the registry's lock (alias moves, the audit log): concurrent writers (threads, processes or machines
    sharing the directory) queue here. Re-entrant per thread, because flock on a second descriptor of the file
    would wait for the first one for ever."""
    root.mkdir(parents=True, exist_ok=True)
    key, held = str((root / LOCK_FILE).resolve()), vars(_held).setdefault("paths", set())
    if key in held:
        yield
        return
    with open(root / LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        held.add(key)
        try:
            yield
        finally:
            held.discard(key)


def _raw_lines(root: Path) -> list[str]:
    path = root / AUDIT_FILE
    return path.read_text().splitlines() if path.exists() else []


def _chain_head(root: Path) -> AuditEntry | None:
    """The last entry, which the next one links to; a damaged last line stops the write before the alias moves."""
    lines = _raw_lines(root)
    try:
        return AuditEntry.model_validate_json(lines[-1]) if lines else None
    except ValueError as exc:
        raise AuditTampered(f"the last line of {root / AUDIT_FILE} is not an entry ({exc}); {RESTORE_HINT}") from exc


def _readable(root: Path) -> Iterator[AuditEntry]:
    """Entries that parse, unverified: for look-ups while writing (a damaged old line must not block a rollback)."""
    for line in _raw_lines(root):
        with suppress(ValueError):
            yield AuditEntry.model_validate_json(line)


def _write(root: Path, head: AuditEntry | None, **fields: Any) -> AuditEntry:
    """Chain `fields` to `head` and append them as one line. The caller holds `_exclusive`."""
    draft = AuditEntry(seq=head.seq + 1 if head else 0, at=utcnow(), prev_hash=head.hash if head else GENESIS_HASH,
                       hash="", **fields)
    stored = draft.model_dump(mode="json")
    stored["hash"] = _content_hash(stored)
    with open(root / AUDIT_FILE, "a") as log:
        log.write(json.dumps(stored, sort_keys=True) + "\n")
        log.flush()
        os.fsync(log.fileno())  # the alias has already moved: its entry must survive a crash
    return AuditEntry.model_validate(stored)


def record_release(root: Path, version: PolicyVersion, alias: str, evidence: ReleaseEvidence) -> AuditEntry:
    """Point `alias` at a freshly registered `version` and log it as a release (or an override)."""
    with _exclusive(root):  # one lock around read-previous, move and append: `previous_version` stays exact
        head = _chain_head(root)
        previous = aliases(root, version.policy).get(alias)
        set_alias(root, version.policy, alias, version.version)
        return _write(root, head, action="override" if evidence.override else "release", policy=version.policy,
                      version=version.version, alias=alias, previous_version=previous, who=evidence.who,
                      why=evidence.why, gate=evidence.gate, snapshot_id=evidence.snapshot_id)


def record_move(root: Path, policy: str, alias: str, version: int, why: str, who: str | None = None) -> AuditEntry:
    """Point `alias` at an existing `version` and log it: 'rollback' if lower than before, else 'alias_move'.

    The entry carries the snapshot the version was released from, so history also answers which data served.
    """
    with _exclusive(root):
        head = _chain_head(root)
        previous = aliases(root, policy).get(alias)
        set_alias(root, policy, alias, version)
        released = [entry for entry in _readable(root)
                    if entry.action in ("release", "override") and (entry.policy, entry.version) == (policy, version)]
        return _write(root, head, action="rollback" if previous is not None and version < previous else "alias_move",
                      policy=policy, version=version, alias=alias, previous_version=previous,
                      who=who or current_user(), why=why, gate={},
                      snapshot_id=released[-1].snapshot_id if released else None)


def verify(root: Path) -> list[AuditEntry]:
    """Every entry, after re-computing each hash and link; raises `AuditTampered` naming the first bad entry.

    Detects an edited, deleted, inserted or reordered entry. It cannot detect the loss of the newest entries
    (the remaining prefix is a valid chain): compare the last hash with a copy kept elsewhere for that.
    """
    entries: list[AuditEntry] = []
    prev_hash = GENESIS_HASH
    for expected_seq, line in enumerate(_raw_lines(root)):
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
        except ValidationError as exc:  # hashed and linked, but not an entry: not written by `_write`
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
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

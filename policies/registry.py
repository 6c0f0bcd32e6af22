"""Policy registry on a directory: immutable numbered versions with lineage, movable aliases, and the
promotion history that logs every alias move.

Layout: `<root>/<name>/<version>/{model.safetensors, config.json, lineage.json, MODEL_CARD.md}`
and `<root>/<name>/aliases.json`. A version is written to a temporary directory and renamed
into place, so readers never see a half-written one.

The promotion history that logs every alias move is policies/audit_log.py; both take the registry's one lock
(policies/registry_lock.py), and version numbers are never reused, also against the log's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ground.schemas import PolicyVersion
from policies.registry_lock import audit_lines, exclusive

if TYPE_CHECKING:  # torch and safetensors load when a version is written, not when a flow module imports this
    import torch

ALIASES_FILE = "aliases.json"
REGISTER_ATTEMPTS = 100  # numbers `register` tries before giving up; each retry means another writer won a race
# Written into every version's config.json. 2: the two-stage adapter's centre is part of the weights
# (adapter.centre_weight / centre_bias). Versions without the field were written by format 1 or by
# format-2 code before the field existed; the loader tells them apart by their tensors.
REGISTRY_FORMAT = 2
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}\Z")  # \Z: "$" let a trailing newline through
ALIAS_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,31}\Z")
VERSION_PATTERN = re.compile(r"[0-9]{1,18}")  # a version number as a tag or a folder name


class RegistryError(ValueError):
    http_status = 404  # what serving answers: a name, alias or version nobody released


class RegistryUnreadable(RegistryError):
    """The registry holds something this server cannot read (a damaged aliases.json or lineage, an alias pointing at
    a deleted folder): the operator's to mend, so serving answers 503, not the 404 of a name nobody released."""

    http_status = 503


class RegistryFormatError(RegistryUnreadable):
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
        raise RegistryUnreadable(f"{path} cannot be read as JSON ({exc}){fix}") from exc
    if not isinstance(content, dict):
        raise RegistryUnreadable(f"{path} holds {json.dumps(content)[:80]}, not a JSON object of alias → version{fix}")
    bad = {alias: version for alias, version in content.items() if type(version) is not int or version < 0}
    if bad:
        raise RegistryUnreadable(f"{path} maps aliases to values that are not version numbers: {bad}{fix}")
    return content


def set_alias(root: Path, name: str, alias: str, version: int) -> None:
    """Point `alias` at an existing version. Under the registry's lock (re-entrant: the release path calls this
    holding it), so two writers' read-modify-writes of aliases.json cannot lose one of the moves."""
    with exclusive(root):
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
    for line in audit_lines(root):  # raw JSON: an entry the model rejects still names a number that was used
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
            raise RegistryUnreadable(f"{name}@{tag} points at version {version}, whose folder "
                                f"{root / name / str(version)} is missing; known: {versions(root, name)}")
    return name, version


def resolve(root: Path, ref: str) -> PolicyVersion:
    """`ref` as in `version_of` → the version on disk, with its lineage."""
    name, version = version_of(root, ref)
    path = root / name / str(version)
    try:
        lineage = json.loads((path / "lineage.json").read_text())
    except (OSError, ValueError) as exc:  # deleted or damaged since `version_of` looked
        raise RegistryUnreadable(f"{ref}: cannot read {path / 'lineage.json'} ({exc})") from exc
    return PolicyVersion(policy=name, version=version, path=str(path), lineage=lineage)


def version_problem(version: PolicyVersion) -> str | None:
    """Why `version` could not be served (a weights file or its config gone or damaged since it was released), or
    None. Checked before an alias is moved onto it: a rollback onto a version that cannot load moved serving onto
    nothing and said "production → vN"."""
    path = Path(version.path)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        return f"{path / 'config.json'} is unreadable ({exc})"
    weights = [path / "model.safetensors"] if config.get("family") in ("two_stage", "direct") else [
        child for child in path.iterdir() if child.is_dir() and not child.name.startswith(".")]
    if not any(w.exists() for w in weights):
        return f"{path} holds no model weights (model.safetensors or a model folder)"
    return None


def list_policies(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and NAME_PATTERN.match(p.name))

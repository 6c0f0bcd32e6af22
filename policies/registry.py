"""Policy registry on a directory: immutable numbered versions with lineage, and movable aliases.

Layout: `<root>/<name>/<version>/{model.safetensors, config.json, lineage.json, MODEL_CARD.md}`
and `<root>/<name>/aliases.json`. A version is written to a temporary directory and renamed
into place, so readers never see a half-written one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ground.schemas import PolicyVersion

ALIASES_FILE = "aliases.json"
# Written into every version's config.json. 2: the two-stage adapter's centre is part of the weights
# (adapter.centre_weight / centre_bias). Versions without the field were written by format 1 or by
# format-2 code before the field existed; the loader tells them apart by their tensors.
REGISTRY_FORMAT = 2
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
ALIAS_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


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
    return sorted(int(p.name) for p in policy_dir.iterdir() if p.is_dir() and p.name.isdigit())


def aliases(root: Path, name: str) -> dict[str, int]:
    path = root / validate_name(name) / ALIASES_FILE
    return {k: int(v) for k, v in json.loads(path.read_text()).items()} if path.exists() else {}


def set_alias(root: Path, name: str, alias: str, version: int) -> None:
    if version not in versions(root, name):
        raise RegistryError(f"{name} has no version {version}; known: {versions(root, name)}")
    current = aliases(root, name)
    current[_validate_alias(alias)] = version
    _write_json_atomic(root / name / ALIASES_FILE, current)


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
    move the alias through `policies.audit`, which logs the move in the promotion history.
    """
    policy_dir = root / validate_name(name)
    policy_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=policy_dir, prefix=".staging-"))
    try:
        if tensors is not None:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(staging / "model.safetensors"))
        for subdir, source in (directories or {}).items():
            shutil.copytree(source, staging / subdir)
        (staging / "config.json").write_text(json.dumps({**config, "format_version": REGISTRY_FORMAT}, indent=2,
                                                        sort_keys=True))
        while True:
            version = (max(versions(root, name), default=0)) + 1
            full_lineage = {**lineage, "policy": name, "version": version}
            (staging / "lineage.json").write_text(json.dumps(full_lineage, indent=2, default=str))
            (staging / "MODEL_CARD.md").write_text(_model_card(name, version, full_lineage))
            try:
                staging.rename(policy_dir / str(version))  # fails if another writer took the number
                break
            except OSError:
                continue
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if alias:
        set_alias(root, name, alias, version)
    return PolicyVersion(policy=name, version=version, path=str(policy_dir / str(version)), lineage=full_lineage)


def version_of(root: Path, ref: str) -> tuple[str, int]:
    """`name@alias`, `name@<version>` or `name` (= `name@production`) → (name, version number)."""
    name, _, tag = ref.partition("@")
    tag = tag or "production"
    validate_name(name)
    if tag.isdigit():
        version = int(tag)
        if version not in versions(root, name):
            raise RegistryError(f"{name} has no version {version}; known: {versions(root, name)}")
    else:
        known = aliases(root, name)
        if tag not in known:
            raise RegistryError(f"{name} has no alias {tag!r}; known aliases: {sorted(known)}")
        version = known[tag]
    return name, version


def resolve(root: Path, ref: str) -> PolicyVersion:
    """`ref` as in `version_of` → the version on disk, with its lineage."""
    name, version = version_of(root, ref)
    path = root / name / str(version)
    return PolicyVersion(
        policy=name, version=version, path=str(path), lineage=json.loads((path / "lineage.json").read_text())
    )


def list_policies(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and NAME_PATTERN.match(p.name))

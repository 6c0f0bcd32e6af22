"""Registry storage on any fsspec URL (S3-compatible, GCS, …) behind the local registry directory.

The local directory stays the working copy (atomic renames, fast reads). With
`PROXYLOOP_REGISTRY_REMOTE_URL` set, every release and alias move is pushed there, and readers
pull aliases and missing versions before resolving, so services on other machines see releases.
Versions are immutable, so a version present locally is never fetched again.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import tempfile
import time
from pathlib import Path

import fsspec

from ground.settings import Settings
from policies.audit_log import AuditTampered
from policies.registry import ALIASES_FILE, NAME_PATTERN, VERSION_PATTERN, validate_name, versions
from policies.registry_lock import AUDIT_FILE, complete_log, exclusive

COMPLETE_MARKER = ".complete"  # written last: a remote version without it is still uploading


def _fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, root = fsspec.core.url_to_fs(url)
    return fs, root.rstrip("/")


def push(local_root: Path, url: str, name: str) -> None:
    """Upload versions the remote lacks, then the aliases (after the versions they point at), then the
    registry's promotion history."""
    fs, root = _fs(url)
    remote_policy = posixpath.join(root, validate_name(name))
    for version in versions(local_root, name):
        remote_version = posixpath.join(remote_policy, str(version))
        if fs.exists(posixpath.join(remote_version, COMPLETE_MARKER)):
            continue
        local_version = local_root / name / str(version)
        for path in sorted(p for p in local_version.rglob("*") if p.is_file()):
            fs.put_file(str(path), posixpath.join(remote_version, path.relative_to(local_version).as_posix()))
        fs.pipe_file(posixpath.join(remote_version, COMPLETE_MARKER), b"")
    aliases, log = local_root / name / ALIASES_FILE, local_root / AUDIT_FILE
    with exclusive(local_root):  # as a writer left them: an entry being appended (or cut back) is not read half-way
        moved = aliases.read_bytes() if aliases.exists() else None
        logged = complete_log(local_root)[0] if log.exists() else None  # complete lines only
    if moved is not None:
        fs.pipe_file(posixpath.join(remote_policy, ALIASES_FILE), moved)
    if logged is not None:
        _push_audit_log(fs, root, log, logged)


def _push_audit_log(fs: fsspec.AbstractFileSystem, root: str, log: Path, local: bytes) -> None:
    """Mirror the log, refusing to replace a remote copy the local log does not extend: that copy is the
    witness that catches a local log whose newest entries were cut off (or another machine's divergent log)."""
    remote_log = posixpath.join(root, AUDIT_FILE)
    if fs.exists(remote_log) and not local.startswith(fs.cat_file(remote_log)):
        raise AuditTampered(f"{log} does not extend the mirrored history at {remote_log} (versions and aliases "
                            "were mirrored, the history was not): local entries were lost or changed, or another "
                            "machine publishes to this registry. Compare both with `proxyloop history`, restore the "
                            "local log from the mirror, and publish from one machine")
    fs.pipe_file(remote_log, local)


def pull(local_root: Path, url: str, name: str) -> None:
    """Fetch the remote aliases and every complete version missing locally. Safe to run concurrently (threads
    or server processes): each caller stages in a folder of its own, and a version another caller moved in
    first is kept, not overwritten."""
    fs, root = _fs(url)
    remote_policy = posixpath.join(root, validate_name(name))
    if not fs.exists(remote_policy):
        return
    local_policy = local_root / name
    local_policy.mkdir(parents=True, exist_ok=True)
    have = set(versions(local_root, name))
    for entry in fs.ls(remote_policy, detail=False):
        version = posixpath.basename(entry.rstrip("/"))
        if not VERSION_PATTERN.fullmatch(version) or int(version) in have:
            continue
        if fs.exists(posixpath.join(entry, COMPLETE_MARKER)):
            _fetch_version(fs, entry, local_policy, version)
    remote_aliases = posixpath.join(remote_policy, ALIASES_FILE)
    if fs.exists(remote_aliases):
        handle, tmp = tempfile.mkstemp(dir=local_policy, prefix=f".{ALIASES_FILE}.pull-")
        with os.fdopen(handle, "wb") as out:
            out.write(fs.cat_file(remote_aliases))
        Path(tmp).replace(local_policy / ALIASES_FILE)


def _fetch_version(fs: fsspec.AbstractFileSystem, entry: str, local_policy: Path, version: str) -> None:
    staging_root = Path(tempfile.mkdtemp(dir=local_policy, prefix=f".pull-{version}-"))
    try:
        staging = staging_root / version
        fs.get(entry.rstrip("/") + "/", str(staging), recursive=True)
        (staging / COMPLETE_MARKER).unlink(missing_ok=True)
        try:
            staging.rename(local_policy / version)
        except OSError:
            if not (local_policy / version).is_dir():  # not a concurrent pull that finished first
                raise
    finally:
        shutil.rmtree(staging_root, ignore_errors=True)


_last_pull: dict[str, float] = {}
NOT_HERE = "/not-released-here"  # no policy name can be this (NAME_PATTERN)


def refresh(settings: Settings, ref: str) -> None:
    """Before serving `ref`: pull the remote registry, at most every `registry_remote_poll_s`."""
    if not settings.registry_remote_url:
        return
    name = ref.partition("@")[0]
    if not NAME_PATTERN.match(name) or ".." in name:
        return  # no policy can have it: resolving it answers the 404
    # Names not released here share one pull budget: each new name had pulled at once and stayed in _last_pull for
    # good, so a client asking for nosuch1, nosuch2, ... made a remote listing per request and grew this dict.
    key = name if (settings.registry_dir / name).is_dir() else NOT_HERE
    now = time.monotonic()
    if now - _last_pull.get(key, float("-inf")) < settings.registry_remote_poll_s:
        return
    pull(settings.registry_dir, settings.registry_remote_url, name)
    _last_pull[key] = now
    if (settings.registry_dir / name).is_dir():  # found remotely: its own budget from now on
        _last_pull[name] = now

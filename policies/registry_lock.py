"""The registry's lock and its promotion log's file, shared by the registry (alias moves, version numbers) and the
log (policies/audit_log.py) without either importing the other."""

from __future__ import annotations

import fcntl
import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

AUDIT_FILE = "audit.jsonl"
LOCK_FILE = ".audit.lock"

_held = threading.local()  # lock files this thread holds: a nested `_exclusive` must not wait for itself


@contextmanager
def exclusive(root: Path) -> Iterator[None]:
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


def release_lock_path(root: Path, run_id: str) -> Path:
    return root / ".release-locks" / hashlib.sha256(run_id.encode()).hexdigest()[:32]


@contextmanager
def release_lock(root: Path, run_id: str) -> Iterator[None]:
    """One release of a run at a time, across processes: two `proxyloop approve` of one run at once both found it
    unreleased and registered two versions. Per run, so releases of other runs do not wait on a slow broker."""
    path = release_lock_path(root, run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        yield


def complete_log(root: Path) -> tuple[bytes, int]:
    """The log up to its last newline, and the file's size. A longer file ends with an unfinished line (an append
    cut short by a full disk or a crash): it was never written whole, so no reader takes it for an entry."""
    path = root / AUDIT_FILE
    data = path.read_bytes() if path.exists() else b""
    return data[:data.rfind(b"\n") + 1], len(data)


def audit_lines(root: Path) -> list[str]:
    """The log's complete lines (`complete_log`)."""
    return complete_log(root)[0].decode().splitlines()

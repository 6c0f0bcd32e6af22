"""Stopping a stack component: its whole process group goes, and none is left a zombie; test ports stay free.

Tests and in-process stacks start components as children of the test process; an exited child stays a
zombie until its parent waits for it, and a zombie still counts as a member of its process group, so the
stop used to wait out the grace period for every component (8–20 s each) and leave the zombie behind.
"""

import signal
import subprocess
import time
from pathlib import Path

from proxyloop.stack import _stop_pid


def _started(command: list[str]) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(command, start_new_session=True)
    deadline = time.monotonic() + 10
    while not Path(f"/proc/{process.pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return process


def _in_group(pgid: int) -> list[int]:
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited while we looked
        if int(fields[2]) == pgid:  # fields after the command: state, ppid, pgrp, ...
            members.append(int(stat.parent.name))
    return members


def test_a_child_that_exits_on_the_signal_is_reaped_not_left_a_zombie():
    process = _started(["sleep", "300"])
    _stop_pid(process.pid, 60, signal.SIGTERM)  # before the fix: 60 s, then a zombie still in /proc
    assert not Path(f"/proc/{process.pid}").exists()
    assert _in_group(process.pid) == []


def test_a_group_that_ignores_the_signal_is_killed_after_the_grace_period():
    process = _started(["bash", "-c", "trap '' TERM; sleep 300 & wait"])
    _stop_pid(process.pid, 1, signal.SIGTERM)
    assert not Path(f"/proc/{process.pid}").exists()
    deadline = time.monotonic() + 10  # the orphaned sleep is init's to reap
    while _in_group(process.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _in_group(process.pid) == []


def test_test_ports_come_from_under_the_ephemeral_range_and_never_twice():
    """The kernel hands out ephemeral ports by itself (bind to 0, outgoing connections): a stack component started
    after a test picked its ports could otherwise take one of them first."""
    from proxyloop.testing import _ephemeral_low, free_object_store_port, free_port

    ports = [free_port() for _ in range(200)] + [free_object_store_port()]
    assert len(set(ports)) == len(ports)
    assert all(1024 <= p < _ephemeral_low() for p in ports)

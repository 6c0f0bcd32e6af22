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


def test_up_says_when_a_running_component_was_started_with_other_settings(tmp_path, monkeypatch):
    """A running process keeps its environment: switching Label Studio on and running `up` again left flows and the
    HTTP app without its token, and `up` said only "already running"."""
    from proxyloop import stack
    from proxyloop.components import Component
    from proxyloop.testing import isolated_settings

    settings = isolated_settings(tmp_path)
    sleeper = Component(name="sleeper", command=lambda s: ["sleep", "60"], healthy=lambda s: True)
    said: list[str] = []
    stack.start_component(settings, sleeper, said.append)
    pid = stack.pid_of(settings, "sleeper")
    try:
        stack.start_component(settings, sleeper, said.append)
        monkeypatch.setenv("PROXYLOOP_DEBUG", "1")  # not a setting: no reason to restart anything
        token = settings.model_copy(update={"labelstudio_token": "a-new-token"})
        stack.start_component(token, sleeper, said.append)
        assert said[1:] == ["sleeper: already running", "sleeper: already running, with other settings than these "
                            "(PROXYLOOP_LABELSTUDIO_TOKEN); `proxyloop down` then `proxyloop up` applies them"]
        assert "a-new-token" not in stack._started_with(settings, "sleeper").read_text()  # hashed, not kept
    finally:
        assert pid is not None
        _stop_pid(pid, 5, signal.SIGTERM)


def test_status_reports_an_optional_component_this_home_runs_even_when_these_settings_switch_it_off(tmp_path):
    from proxyloop import stack
    from proxyloop.testing import isolated_settings

    settings = isolated_settings(tmp_path, embedded_labelstudio=False)
    assert "labelstudio" not in stack.health(settings)
    other = _started(["sleep", "60"])
    try:
        stack._write_pidfile(settings, "labelstudio", other.pid)
        assert stack.health(settings)["labelstudio"].endswith("(running, though these settings switch it off)")
    finally:
        _stop_pid(other.pid, 5, signal.SIGTERM)

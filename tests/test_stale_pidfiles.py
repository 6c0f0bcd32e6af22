"""Pid files the stack did not write, or that outlived their process (proxyloop/stack.py): a pid the kernel has
given to another program is not the component, and `down` must not signal it; an empty or damaged file is stale,
not a traceback. Before: `up` said "redis: already running" with nothing listening, `down` killed the unrelated
program, and an empty pid file made `status` and `down` exit with a ValueError."""

import subprocess

from proxyloop import stack
from proxyloop.testing import isolated_settings


def test_a_pid_reused_by_another_program_is_stale_and_left_alone(tmp_path):
    settings = isolated_settings(tmp_path)
    other = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        stack._write_pidfile(settings, "redis", other.pid)
        assert stack.pid_of(settings, "redis") == other.pid  # the process it was written for
        path = stack._pidfile(settings, "redis")
        pid, start = path.read_text().split()
        path.write_text(f"{pid} {int(start) + 1}")  # the same number, another process (a reboot, a killed stack)
        stopped: list[str] = []
        stack.down(settings, stopped.append)
        assert other.poll() is None and stopped == [] and not path.exists()  # not signalled, not "stopped"
        path.write_text(f"{pid} {int(start) + 1}")
        assert stack.pid_of(settings, "redis") is None  # and `up` starts redis instead of "already running"
    finally:
        other.kill()
        other.wait()


def test_an_empty_or_damaged_pid_file_is_stale_not_an_error(tmp_path):
    settings = isolated_settings(tmp_path)
    for content in ("", "12ab", "1 2 3"):
        path = stack._pidfile(settings, "worker")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
        assert stack.pid_of(settings, "worker") is None and not path.exists()

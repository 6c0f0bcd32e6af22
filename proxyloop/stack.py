"""Process control of the local stack: start, check and stop each component as its own process, on loopback.

Pids and logs live under `<home>/run` and `<home>/logs`, the object store's data under
`<home>/objectstore`. What the components are: proxyloop.components.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from ground.settings import Settings, env_name
from proxyloop.components import (
    COMPONENTS,
    Component,
    StackError,
    component,
    tcp_open,
)

__all__ = ["COMPONENTS", "Component", "StackError", "component"]
log = logging.getLogger("proxyloop.stack")


def child_env(settings: Settings) -> dict[str, str]:
    """Children resolve the same Settings: every field is exported, paths made absolute, JSON-valued fields
    (chat_recipe) as JSON, which is how pydantic-settings reads them back (str() of a dict is not)."""
    env = dict(os.environ)
    for name, value in settings.model_dump().items():
        env[env_name(name)] = json.dumps(value) if isinstance(value, dict | list) else str(value)
    env["PROXYLOOP_HOME"] = str(settings.home_dir)
    env.update({
        "PREFECT_API_URL": settings.prefect_api_url,
        "PREFECT_HOME": str(settings.home_dir / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
        "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "0.5",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    })
    return env


def _pidfile(settings: Settings, name: str) -> Path:
    return settings.home_dir / "run" / f"{name}.pid"


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (state first, start time at index 19), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[-1].split()
    except OSError:
        return None


def _write_pidfile(settings: Settings, name: str, pid: int) -> None:
    """`PID START` (START: the process's start time in clock ticks since boot), written whole: a pid alone named
    whatever process the kernel gave that number next (after a reboot or a killed stack), which `down` then killed
    and `up` took for the component already running."""
    fields = _stat(pid)
    path = _pidfile(settings, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(f"{pid} {fields[19]}" if fields else str(pid))
    partial.replace(path)


def pid_of(settings: Settings, name: str) -> int | None:
    """The component's process if it is still the one this stack started; a pid file that is empty, damaged or
    names another process (the pid reused) is stale: removed, with a warning, and None."""
    path = _pidfile(settings, name)
    if not path.exists():
        return None
    parts = path.read_text().split()
    if not 1 <= len(parts) <= 2 or not all(part.isdigit() for part in parts):
        log.warning("%s is not a pid file of this stack (%r): removed", path, path.read_text()[:40])
        path.unlink(missing_ok=True)
        return None
    pid = int(parts[0])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    fields = _stat(pid)
    if fields and fields[0].startswith("Z"):  # a zombie of ours still answers kill(0)
        return None
    if len(parts) == 2 and fields and fields[19] != parts[1]:
        log.warning("%s names pid %d, now another process (started at tick %s, not %s): removed as stale", path,
                    pid, fields[19], parts[1])
        path.unlink(missing_ok=True)
        return None
    return pid


def _settings_digest(env: Mapping[str, str]) -> dict[str, str]:
    """The settings a component gets (PROXYLOOP_ variables that name a setting: not --debug's, not a typo), each
    value hashed (tokens and secrets are among them)."""
    settings = {env_name(field) for field in Settings.model_fields}
    return {key: hashlib.sha256(value.encode()).hexdigest()[:16]
            for key, value in sorted(env.items()) if key in settings}


def _started_with(settings: Settings, name: str) -> Path:
    return settings.home_dir / "run" / f"{name}.settings.json"


def changed_settings(settings: Settings, name: str, env: Mapping[str, str]) -> list[str]:
    """The PROXYLOOP_ variables whose values differ from those the running component was started with: a running
    process keeps its environment, so `up` with Label Studio switched on left flows and the HTTP app without its
    token, and nothing said so."""
    try:
        before = json.loads(_started_with(settings, name).read_text())
    except (OSError, ValueError):
        return []  # started before this was recorded: nothing to compare
    now = _settings_digest(env)
    return sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))


def start_component(settings: Settings, component: Component, say: Callable[[str], None]) -> None:
    env = {**child_env(settings), **component.env(settings)}
    if pid_of(settings, component.name) is not None:
        changed = changed_settings(settings, component.name, env)
        if changed:
            shown = ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
            say(f"{component.name}: already running, with other settings than these ({shown}); "
                "`proxyloop down` then `proxyloop up` applies them")
        else:
            say(f"{component.name}: already running")
        return
    if component.listens_on is not None and tcp_open(component.listens_on(settings), component.setting):
        raise StackError(
            f"{component.name}: {component.listens_on(settings)} is already in use by a process this stack "
            f"(home {settings.home_dir}) did not start; stop it, or change the port in "
            f"{env_name(component.setting) if component.setting else 'Settings'}"
        )
    (settings.home_dir / "run").mkdir(parents=True, exist_ok=True)
    (settings.home_dir / "logs").mkdir(parents=True, exist_ok=True)
    log_path = settings.home_dir / "logs" / f"{component.name}.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            component.command(settings), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, cwd=Path.cwd(), start_new_session=True,
        )
    _write_pidfile(settings, component.name, process.pid)
    _started_with(settings, component.name).write_text(json.dumps(_settings_digest(env)))
    deadline = time.monotonic() + component.start_timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise StackError(f"{component.name} exited with {process.returncode}; log {log_path}:\n{tail}")
        if component.healthy(settings):
            say(f"{component.name}: up (pid {process.pid})")
            if component.after_start is not None:
                component.after_start(settings, say)
            return
        time.sleep(0.3)
    raise StackError(f"{component.name} not healthy after {component.start_timeout_s:.0f} s; see {log_path}")


def up(settings: Settings, say: Callable[[str], None] = lambda _: None) -> None:
    from ingest.bus import ensure_topics
    from ingest.labelstudio.embedded import with_credentials

    settings.ensure_home()  # a home that is a file or cannot be created: named, before anything starts
    settings = with_credentials(settings)  # every child gets the embedded Label Studio's token, if it runs
    for part in COMPONENTS:
        if not part.enabled(settings):
            say(f"{part.name}: {'off' if part.optional else 'external (URL in settings)'}")
            continue
        if part.name == "worker":
            ensure_topics(settings)  # everything after this point produces or consumes
        start_component(settings, part, say)


def _group_gone(pid: int) -> bool:
    """True once no process of the group `pid` leads is left. Reaps the leader first when this process
    started it (tests, in-process stacks): an exited child stays a zombie until its parent waits, and a
    zombie still counts as a member of its group, so the grace period would always run out."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass  # not our child: whoever started it (or init) reaps it
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _stop_pid(pid: int, grace_s: float, stop_signal: signal.Signals) -> None:
    try:
        os.killpg(pid, stop_signal)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if _group_gone(pid):
            return
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    while not _group_gone(pid) and time.monotonic() < deadline + 5:  # SIGKILL is not ignorable: moments
        time.sleep(0.05)


def stop_component(settings: Settings, name: str) -> bool:
    """Stop one component started from this home; True if it was running."""
    stopping = component(name)
    pid = pid_of(settings, name)
    if pid is not None:
        _stop_pid(pid, stopping.stop_grace_s, stopping.stop_signal)
    _pidfile(settings, name).unlink(missing_ok=True)
    _started_with(settings, name).unlink(missing_ok=True)
    return pid is not None


def down(settings: Settings, say: Callable[[str], None] = lambda _: None) -> None:
    for part in reversed(COMPONENTS):
        if stop_component(settings, part.name):
            say(f"{part.name}: stopped")


def health(settings: Settings) -> dict[str, str]:
    """Each component's state. A component whose address cannot be read is "misconfigured: …" (the setting),
    so status still reports the others. An optional component this home started is reported even when the
    caller's settings switch it off (Label Studio started by `PROXYLOOP_EMBEDDED_LABELSTUDIO=true proxyloop up`)."""
    states: dict[str, str] = {}
    for part in COMPONENTS:
        running = pid_of(settings, part.name) is not None
        if part.optional and not part.enabled(settings) and not running:
            continue  # no part of this stack
        try:
            if part.optional and not part.enabled(settings):
                states[part.name] = ("healthy" if part.healthy(settings) else "unhealthy") + \
                    " (running, though these settings switch it off)"
            elif not part.enabled(settings):
                states[part.name] = "healthy (external)" if part.healthy(settings) else "unreachable (external)"
            elif not running:
                states[part.name] = "stopped"
            else:
                states[part.name] = "healthy" if part.healthy(settings) else "unhealthy"
        except StackError as exc:
            states[part.name] = f"misconfigured: {exc}"
    return states


def is_up(settings: Settings) -> bool:
    return all(state.startswith("healthy") for state in health(settings).values())

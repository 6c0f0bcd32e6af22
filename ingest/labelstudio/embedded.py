"""The local stack's own Label Studio: how it starts, when it is healthy, its credentials, its provisioning.

`scripts/labelstudio.sh` runs it from its own cached venv (Label Studio pins Django & co.). Used by the
stack's `labelstudio` component (proxyloop.components, on with `PROXYLOOP_EMBEDDED_LABELSTUDIO=true`)
and by the test launcher (proxyloop.testing.labelstudio_server).

Credentials: the admin's e-mail (`labelstudio_admin`), a password and the API token are generated on
the first start and kept in `<home>/labelstudio/credentials.json` (mode 0600); Label Studio creates its
admin from them on that start only, so the file stays the truth afterwards. A `PROXYLOOP_LABELSTUDIO_TOKEN`
set before the first start seeds the token instead; with the switch on and no token set, every API
client (`provision.client_for`) reads the token from the file.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlparse

import httpx

from ground.settings import Settings

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "labelstudio.sh"


class LabelStudioInstallError(RuntimeError):
    pass


@dataclass(frozen=True)
class Credentials:
    username: str  # the admin's e-mail: the annotator's login on the embedded stack
    password: str
    token: str  # the admin's legacy API token (Label Studio keeps at most 40 characters)

    def server_env(self) -> dict[str, str]:
        """What scripts/labelstudio.sh passes to Label Studio, which creates this admin on its first start."""
        return {"LABEL_STUDIO_USERNAME": self.username, "LABEL_STUDIO_PASSWORD": self.password,
                "LABEL_STUDIO_USER_TOKEN": self.token}


def new_credentials(username: str = "admin@example.com", token: str = "") -> Credentials:
    return Credentials(username=username, password=secrets.token_urlsafe(12), token=token or secrets.token_hex(20))


def home_dir(settings: Settings) -> Path:
    return settings.home_dir / "labelstudio"


def data_dir(settings: Settings) -> Path:
    """Label Studio's own data (its SQLite database, uploads)."""
    return home_dir(settings) / "data"


def credentials_path(settings: Settings) -> Path:
    return home_dir(settings) / "credentials.json"


def read_credentials(settings: Settings) -> Credentials | None:
    path = credentials_path(settings)
    if not path.exists():
        return None
    return Credentials(**json.loads(path.read_text()))


def ensure_credentials(settings: Settings) -> Credentials:
    """The embedded Label Studio's admin: read from home, or generated (and written, 0600) on first use."""
    found = read_credentials(settings)
    if found is not None:
        return found
    created = new_credentials(settings.labelstudio_admin, settings.labelstudio_token)
    path = credentials_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(asdict(created), handle)
    return created


def embedded_token(settings: Settings) -> str:
    """The API token to use: the setting, else (embedded Label Studio) the one kept in home; "" if neither."""
    if settings.labelstudio_token or not settings.embedded_labelstudio:
        return settings.labelstudio_token
    found = read_credentials(settings)
    return found.token if found else ""


def with_credentials(settings: Settings) -> Settings:
    """Settings whose `labelstudio_token` is the embedded Label Studio's (created on first use), so child
    processes (flows: reconciliation, acquisition) get it through the environment; unchanged when off."""
    if not settings.embedded_labelstudio or settings.labelstudio_token:
        return settings
    return settings.model_copy(update={"labelstudio_token": ensure_credentials(settings).token})


def install() -> None:
    """The cached venv (scripts/labelstudio.sh install): ~95 s the first time, then a no-op."""
    done = subprocess.run(["bash", str(SCRIPT), "install"], capture_output=True, text=True)
    if done.returncode != 0:
        raise LabelStudioInstallError(f"{SCRIPT} install failed ({done.returncode}): {done.stderr[-2000:]}")


def start_command(port: int, data: Path) -> list[str]:
    return ["bash", str(SCRIPT), "start", str(port), str(data)]


def port_of(url: str) -> int:
    parsed = urlparse(url)
    if parsed.port is None:
        raise ValueError(f"Label Studio URL {url!r} names no port; the embedded one needs one")
    return parsed.port


def healthy(url: str) -> bool:
    """Label Studio's /health answers 200 (its admin and token exist by then: it creates them before serving)."""
    try:
        return httpx.get(f"{url.rstrip('/')}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False

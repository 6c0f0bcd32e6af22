"""Label Studio in the local stack (PROXYLOOP_EMBEDDED_LABELSTUDIO): `proxyloop up` starts and provisions it,
`proxyloop demo` labels through it (tasks imported, annotations submitted through its API, labels reaching
the store by its webhook), `proxyloop down` stops it. Off by default: then it is no part of the stack."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from label_studio_sdk.client import LabelStudio
from sqlalchemy import select
from sqlalchemy.orm import Session

from ground.settings import Settings
from ingest.labelstudio import embedded
from ingest.store import LabelRow, make_engine
from proxyloop import stack
from proxyloop.components import tcp_open
from proxyloop.testing import free_port, isolated_settings
from tests.conftest import run_cli, run_demo, stack_env


def test_label_studio_is_no_part_of_the_stack_when_off(tmp_path: Path) -> None:
    settings = isolated_settings(tmp_path)
    assert not settings.embedded_labelstudio
    assert "labelstudio" not in stack.health(settings)  # not started, not checked: `up`/`status` ignore it
    assert embedded.with_credentials(settings) is settings
    assert not embedded.credentials_path(settings).exists()


def test_embedded_credentials_are_generated_once_private_and_seed_the_token(tmp_path: Path) -> None:
    settings = isolated_settings(tmp_path, embedded_labelstudio=True)
    assert embedded.embedded_token(settings) == ""  # nothing generated yet
    first = embedded.ensure_credentials(settings)
    assert first.username == settings.labelstudio_admin and len(first.token) == 40 and first.password
    assert stat.S_IMODE(os.stat(embedded.credentials_path(settings)).st_mode) == 0o600
    assert embedded.ensure_credentials(settings) == first  # the file is the truth after the first start
    assert embedded.with_credentials(settings).labelstudio_token == first.token == embedded.embedded_token(settings)
    seeded = isolated_settings(tmp_path / "other", embedded_labelstudio=True, labelstudio_token="preset-token")
    assert embedded.ensure_credentials(seeded).token == "preset-token"


def live_stack(test: Callable[..., None]) -> Callable[..., None]:
    """A test on the live stack: Label Studio takes 1-2 min to start, then a whole demo cycle runs; beyond
    the default 600 s on a small shared machine."""
    marked: Callable[..., None] = pytest.mark.integration(pytest.mark.e2e(pytest.mark.timeout(1800)(test)))
    return marked


def _provisioning(settings: Settings, client: LabelStudio) -> dict[str, Any]:
    projects: list[Any] = list(client.projects.list(title=settings.labelstudio_project_title))
    [project] = projects
    assert project.id is not None
    return {"project_id": int(project.id),
            "webhooks": {h.url: h.headers for h in client.webhooks.list(project=str(project.id))},
            "ml_backends": [b.url for b in client.ml.list(project=int(project.id))]}


@pytest.fixture(scope="module")
def ls_demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """`proxyloop up` with Label Studio on, the demo through it, then `proxyloop down`; what each left behind."""
    home = tmp_path_factory.mktemp("demo-labelstudio")
    settings = isolated_settings(home, embedded_labelstudio=True, labelstudio_url=f"http://127.0.0.1:{free_port()}")
    report_path = home / "report.json"
    seen: dict[str, Any] = {"settings": settings}
    try:  # everything is collected, and the stack stopped, before the tests look
        # One intra-op thread in the stack's processes (conftest's `stack_env`): on a shared 2-core machine the
        # worker's tiny fits with two threads ran ~15x slower, past the demo's retrain deadline.
        with stack_env():
            up = run_cli(settings, "up", timeout=900)  # Label Studio: 1-2 min to start on a small machine
            assert up.returncode == 0, up.stdout[-4000:] + up.stderr[-4000:]
            seen["up"] = up.stdout
            seen["health"] = stack.health(settings)
            seen["pid"] = stack.pid_of(settings, "labelstudio")
            credentials = embedded.read_credentials(settings)
            assert credentials is not None
            seen["credentials"] = credentials
            client = LabelStudio(base_url=settings.labelstudio_url, api_key=credentials.token)
            seen["provisioned"] = _provisioning(settings, client)
            run_demo(settings, report_path)
            seen["report"] = json.loads(report_path.read_text())
            ids = [f"labelstudio-annotation-{a}" for a in seen["report"]["labelstudio"]["annotation_ids"]]
            with Session(make_engine(settings.resolved_store_url)) as session:
                seen["rows"] = {r.event_id: (r.kind, r.item) for r in session.scalars(
                    select(LabelRow).where(LabelRow.event_id.in_(ids)))}
            task_id = seen["report"]["labelstudio"]["task_ids"][0]
            seen["first_task"] = (client.tasks.get(id=task_id).data,
                                  [a.result for a in client.annotations.list(id=task_id)])
    finally:
        seen["down"] = run_cli(settings, "down", timeout=300).stdout
        seen["after_down"] = stack.health(settings).get("labelstudio"), tcp_open(settings.labelstudio_url)
    yield seen


@live_stack
def test_up_starts_label_studio_and_provisions_project_webhook_and_ml_backend(ls_demo: dict[str, Any]) -> None:
    settings: Settings = ls_demo["settings"]
    assert ls_demo["health"]["labelstudio"] == "healthy" and ls_demo["pid"] is not None
    assert "labelstudio: up" in ls_demo["up"] and f"log in at {settings.labelstudio_url}" in ls_demo["up"]
    provisioned = ls_demo["provisioned"]
    secret = {"X-Proxyloop-Secret": settings.webhook_secret}
    ml_url = settings.resolved_labelstudio_ml_backend_url
    assert provisioned["webhooks"] == {settings.resolved_labelstudio_webhook_url: secret, f"{ml_url}/webhook": secret}
    assert provisioned["ml_backends"] == [ml_url]
    assert ls_demo["credentials"].username == settings.labelstudio_admin


@live_stack
def test_the_demo_labels_through_label_studio_and_its_webhook(ls_demo: dict[str, Any]) -> None:
    report = ls_demo["report"]
    assert report["labels_via"] == "labelstudio"
    labelstudio = report["labelstudio"]
    assert labelstudio["project_id"] == ls_demo["provisioned"]["project_id"]
    n = report["events"]["expert_published"]
    assert n == 60 and len(labelstudio["task_ids"]) == len(labelstudio["annotation_ids"]) == n
    rows = ls_demo["rows"]  # every annotation Label Studio made, stored under its annotation id
    assert len(rows) == n and all(kind == "expert" and item["type"] == "features" for kind, item in rows.values())
    data, [result] = ls_demo["first_task"]
    selected = result[0]["value"]["selected"]
    first = rows[f"labelstudio-annotation-{labelstudio['annotation_ids'][0]}"][1]
    assert first["x"] == data["x"]
    assert (first["y_w"], first["y_l"]) == ((data["y_a"], data["y_b"]) if selected == "left"
                                            else (data["y_b"], data["y_a"]))
    assert report["serving"]["status"] == 200  # the cycle went on from there: retrain, gate, release


@live_stack
def test_down_stops_label_studio(ls_demo: dict[str, Any]) -> None:
    assert "labelstudio: stopped" in ls_demo["down"]
    with pytest.raises(ProcessLookupError):
        os.killpg(ls_demo["pid"], 0)  # its whole process group is gone
    assert ls_demo["after_down"] == ("stopped", False)  # nothing listens on its port any more

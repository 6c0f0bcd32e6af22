"""Against a real Label Studio server: provisioning, webhook delivery into the store, reconciliation.

The HTTP app and the ingest consumer run as their own processes (as `proxyloop up` starts them),
on the session's Kafka broker.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from label_studio_sdk.client import LabelStudio
from sqlalchemy import select
from sqlalchemy.orm import Session

from ground.settings import Settings
from ingest.bus import ensure_topics
from ingest.labelstudio.provision import ensure_webhook
from ingest.store import LabelRow, label_history, make_engine
from proxyloop import stack
from proxyloop.testing import free_port
from tests.conftest import launch_chromium, run_cli

pytestmark = pytest.mark.integration

TASKS = [{"prompt": f"Question {i}?", "answer_a": f"answer A{i}", "answer_b": f"answer B{i}"} for i in range(8)]


@pytest.fixture(scope="module")
def pipeline(service_settings: Settings, kafka: str, labelstudio: Any, tmp_path_factory: pytest.TempPathFactory,
             ) -> Iterator[Settings]:
    """HTTP app + consumer processes wired to the Label Studio server, with their own store and topics."""
    home = tmp_path_factory.mktemp("ls-pipeline")
    settings = service_settings.model_copy(update={
        "home": home, "store_url": f"sqlite:///{home}/store.db", "http_port": free_port(),
        "topic_expert": "ls-expert", "topic_proxy": "ls-proxy", "consumer_group": "ls-ingest",
        "webhook_secret": "ls-test-secret", "labelstudio_url": labelstudio.url, "labelstudio_token": labelstudio.token,
        "labelstudio_project_title": "pairwise under test", "retrain_min_expert": 10**6, "retrain_min_proxy": 10**6,
    })
    ensure_topics(settings)
    for name in ("http", "consumer"):
        stack.start_component(settings, stack.component(name), lambda _: None)
    try:
        yield settings
    finally:
        for name in ("consumer", "http"):
            stack.stop_component(settings, name)


def _cli(settings: Settings, *args: str) -> str:
    result = run_cli(settings, *args, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _client(settings: Settings) -> LabelStudio:
    return LabelStudio(base_url=settings.labelstudio_url, api_key=settings.labelstudio_token)


def _rows(settings: Settings) -> dict[str, LabelRow]:
    with Session(make_engine(settings.resolved_store_url)) as session:
        return {r.event_id: r for r in session.scalars(select(LabelRow))}


def _wait_for(
    settings: Settings, done: Callable[[dict[str, LabelRow]], bool], timeout: float = 60,
) -> dict[str, LabelRow]:
    deadline = time.monotonic() + timeout
    while True:
        rows = _rows(settings)
        if done(rows) or time.monotonic() > deadline:
            return rows
        time.sleep(0.3)


def _annotate(client: LabelStudio, task_id: int, selected: str, why: str | None = None) -> int:
    result: list[dict[str, Any]] = [{"from_name": "pw", "to_name": "a,b", "type": "pairwise",
                                     "value": {"selected": selected}}]
    if why:
        result.append({"from_name": "why", "to_name": "a", "type": "textarea", "value": {"text": [why]}})
    annotation = client.annotations.create(id=task_id, result=result)
    assert annotation.id is not None
    return int(annotation.id)


def _project_tasks(client: LabelStudio, project_id: int) -> list[int]:
    return sorted(int(t.id) for t in client.tasks.list(project=project_id))


@pytest.fixture(scope="module")
def project(pipeline: Settings, tmp_path_factory: pytest.TempPathFactory) -> int:
    tasks_file = tmp_path_factory.mktemp("tasks") / "tasks.jsonl"
    tasks_file.write_text("\n".join(json.dumps(t) for t in TASKS))
    out = _cli(pipeline, "labelstudio", "setup", "--tasks", str(tasks_file))
    assert "8 tasks imported" in out
    client = _client(pipeline)
    project_id = next(p.id for p in client.projects.list(title=pipeline.labelstudio_project_title))
    assert project_id is not None
    return int(project_id)


def test_setup_provisions_pairwise_project_with_secret_webhook_and_ml_backend(pipeline: Settings, project: int) -> None:
    client = _client(pipeline)
    config = client.projects.get(id=project).label_config or ""
    assert all(tag in config for tag in ("<Pairwise", "$prompt", "$answer_a", "$answer_b", "<TextArea"))
    assert len(_project_tasks(client, project)) == len(TASKS)
    ml_url = pipeline.resolved_labelstudio_ml_backend_url
    secret = {"X-Proxyloop-Secret": "ls-test-secret"}
    hooks = {h.url: (h.headers, h.is_active) for h in client.webhooks.list(project=str(project))}
    # ours for the labels, and the one Label Studio adds for the ML backend's re-ranking, both with the secret
    assert hooks == {pipeline.resolved_labelstudio_webhook_url: (secret, True), f"{ml_url}/webhook": (secret, True)}
    backends = list(client.ml.list(project=project))  # connected: Label Studio checked its health with the secret
    assert [(b.url, b.auth_method) for b in backends] == [(ml_url, "BASIC_AUTH")]
    _cli(pipeline, "labelstudio", "setup")  # again: reuses the project, the webhooks and the ML backend
    assert len(list(client.projects.list(title=pipeline.labelstudio_project_title))) == 1
    assert len(list(client.webhooks.list(project=str(project)))) == 2
    assert len(list(client.ml.list(project=project))) == 1


def test_annotations_updates_and_deletions_reach_the_store_via_the_webhook(pipeline: Settings, project: int) -> None:
    client = _client(pipeline)
    tasks = _project_tasks(client, project)
    ids = [_annotate(client, tasks[0], "left", why="A is right"), _annotate(client, tasks[1], "right"),
           _annotate(client, tasks[2], "left")]
    keys = [f"labelstudio-annotation-{i}" for i in ids]
    rows = _wait_for(pipeline, lambda r: all(k in r for k in keys))
    assert [rows[k].item["choice"] for k in keys] == ["a", "b", "a"]
    assert rows[keys[0]].item["rationale"] == "A is right" and rows[keys[0]].item["prompt"] == "Question 0?"
    assert {rows[k].source for k in keys} == {f"labelstudio/project-{project}"}  # the payload names its project

    client.annotations.update(id=ids[1], result=[{"from_name": "pw", "to_name": "a,b", "type": "pairwise",
                                                  "value": {"selected": "left"}}])
    client.annotations.delete(id=ids[2])
    rows = _wait_for(pipeline, lambda r: r[keys[1]].item["choice"] == "a" and r[keys[2]].deleted)
    assert rows[keys[1]].item["choice"] == "a" and not rows[keys[1]].deleted
    assert rows[keys[2]].deleted
    with Session(make_engine(pipeline.resolved_store_url)) as session:
        assert [h.action for h in label_history(session, keys[1])] == ["created", "updated"]
        assert [h.action for h in label_history(session, keys[2])] == ["created", "deleted"]


def test_reconciliation_recovers_every_label_a_webhook_outage_lost_exactly_once(
    pipeline: Settings, project: int,
) -> None:
    client = _client(pipeline)
    ensure_webhook(pipeline, client, project, active=False)  # the outage
    try:
        tasks = _project_tasks(client, project)
        before = _rows(pipeline)
        live_before = [k for k, r in before.items() if not r.deleted]
        missed = [_annotate(client, task, "right" if i % 2 else "left", why=f"reason {i}")
                  for i, task in enumerate(tasks[3:])]
        updated_id, deleted_id = (int(k.rsplit("-", 1)[1]) for k in sorted(live_before)[:2])
        client.annotations.update(id=updated_id, result=[{"from_name": "pw", "to_name": "a,b", "type": "pairwise",
                                                          "value": {"selected": "right"}}])
        client.annotations.delete(id=deleted_id)
        assert not any(f"labelstudio-annotation-{i}" in _rows(pipeline) for i in missed)

        out = _cli(pipeline, "labelstudio", "reconcile")
        assert f"{len(missed) + 1} retracted" not in out  # one deletion, not more
        keys = [f"labelstudio-annotation-{i}" for i in missed]
        updated_key, deleted_key = f"labelstudio-annotation-{updated_id}", f"labelstudio-annotation-{deleted_id}"
        rows = _wait_for(pipeline, lambda r: all(k in r for k in keys) and r[deleted_key].deleted
                         and r[updated_key].item["choice"] == "b")
        assert all(k in rows for k in keys), "reconciliation did not recover every missed annotation"
        assert [rows[k].item["rationale"] for k in keys] == [f"reason {i}" for i in range(len(missed))]
        assert rows[updated_key].item["choice"] == "b" and rows[deleted_key].deleted

        # Exactly once: a second run, and the earlier webhook deliveries, leave one row and no new history.
        history_before = _history_lengths(pipeline)
        _cli(pipeline, "labelstudio", "reconcile")
        _wait_until_consumed(pipeline)
        assert _history_lengths(pipeline) == history_before
        live = {a.id for t in client.tasks.list(project=project, fields="all") for a in _annotations(t)}
        assert {k for k, r in _rows(pipeline).items() if not r.deleted} == {f"labelstudio-annotation-{i}" for i in live}
    finally:
        ensure_webhook(pipeline, client, project, active=True)


def _wait_until_consumed(settings: Settings, timeout: float = 60) -> None:
    """Until the consumer group has committed every record on the expert topic (all of them stored)."""
    from kafka import KafkaConsumer, TopicPartition

    probe = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=settings.consumer_group,
                          enable_auto_commit=False)
    partitions = [TopicPartition(settings.topic_expert, p) for p in range(settings.topic_partitions)]
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ends = probe.end_offsets(partitions)
            if all((probe.committed(tp) or 0) >= ends[tp] for tp in partitions):
                return
            time.sleep(0.3)
        raise AssertionError("the consumer did not catch up with the expert topic")
    finally:
        probe.close()


def _annotations(task: Any) -> list[Any]:
    from ingest.labelstudio.payloads import LSAnnotation

    return [LSAnnotation.model_validate(a) for a in task.annotations or []]


def _history_lengths(settings: Settings) -> dict[str, int]:
    with Session(make_engine(settings.resolved_store_url)) as session:
        return {key: len(label_history(session, key)) for key in _rows(settings)}


def test_webhook_without_the_secret_is_refused(pipeline: Settings) -> None:
    import httpx

    response = httpx.post(pipeline.resolved_labelstudio_webhook_url, json={"action": "ANNOTATION_CREATED"})
    assert response.status_code == 401
    response = httpx.post(pipeline.resolved_labelstudio_webhook_url, json={"action": "ANNOTATION_CREATED"},
                          headers={"X-Proxyloop-Secret": "ls-test-secret"})
    assert response.status_code == 422 and "unusable" in response.json()["detail"]
    assert Path(pipeline.home_dir).exists()


def test_an_annotator_labels_in_the_browser_and_the_label_reaches_the_store(
    pipeline: Settings, project: int, labelstudio: Any, tmp_path: Path,
) -> None:
    """Headless Chromium (Debian's) logs in, sees the prompt and both responses, picks B, submits."""
    from playwright.sync_api import sync_playwright

    client = _client(pipeline)
    task_data = {"prompt": "What is the capital of France?", "answer_a": "Lyon, probably.",
                 "answer_b": "The capital of France is Paris."}
    client.projects.import_tasks(id=project, request=[task_data])
    task_id = max(_project_tasks(client, project))
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{labelstudio.url}/user/login", wait_until="networkidle")
            page.fill("input[name=email]", labelstudio.username)
            page.fill("input[name=password]", labelstudio.password)
            page.click("button[type=submit]")
            page.wait_for_load_state("networkidle")
            page.goto(f"{labelstudio.url}/projects/{project}/data?task={task_id}", wait_until="networkidle")
            for text in task_data.values():
                page.get_by_text(text, exact=True).last.wait_for(timeout=30_000)
            page.get_by_text(task_data["answer_b"], exact=True).last.click()
            page.screenshot(path=str(tmp_path / "labelling.png"))
            page.get_by_role("button", name="Submit").click()
            page.wait_for_timeout(1000)
        finally:
            browser.close()
    rows = _wait_for(pipeline, lambda r: any(row.item and row.item.get("prompt") == task_data["prompt"]
                                             for row in r.values()))
    stored = [row for row in rows.values() if row.item and row.item.get("prompt") == task_data["prompt"]]
    assert len(stored) == 1 and stored[0].item["choice"] == "b"
    assert stored[0].item["response_b"] == task_data["answer_b"]
    assert (tmp_path / "labelling.png").stat().st_size > 10_000

"""Reconciliation retracts only its own project's labels: each label records its project (labels.source), and the
sweep looks up only the live labels recorded as the project being reconciled.

Found by an audit, reproduced on a real stack: labels recorded no project, so reconciling project 2 asked Label Studio
for every live label's annotation and retracted all that answered 404 — every label of a deleted project 1 (after
`setup` made project 2, as the old "no project titled" hint said to), and every label the demo had posted without a
Label Studio once one was enabled. Real Kafka broker, real ingest consumer (the store's one writer), the real webhook
route and a SQLite store; Label Studio is the stand-in client of test_labelstudio_reconcile.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session
from typer.testing import CliRunner, Result

from ground.schemas import ExpertLabel, PairwiseText
from ground.settings import Settings, get_settings
from ingest.bus import make_producer, publish
from ingest.labelstudio import SECRET_HEADER, webhook_payload
from ingest.labelstudio import reconcile as reconcile_module
from ingest.labelstudio.annotate import post_webhook_payloads
from ingest.labelstudio.reconcile import reconcile, retract_project
from ingest.store import LabelRow, make_engine
from proxyloop.cli import app
from proxyloop.http import create_app
from tests.conftest import consumer_in_thread, export, own_topics, wait_until
from tests.ingest.test_labelstudio_reconcile import FakeLabelStudio, _annotation

pytestmark = pytest.mark.integration

OLD, NEW = 1, 2  # the project deleted (or on the server the URL no longer names), and the one `setup` made next
OLD_IDS, NEW_IDS = (1, 2, 3), (10, 11)
TEXT = {"prompt": "q", "answer_a": "A", "answer_b": "B"}
Cli = Callable[..., Result]


def _key(annotation_id: int) -> str:
    return f"labelstudio-annotation-{annotation_id}"


def _keys(annotation_ids: Iterable[int]) -> set[str]:
    return {_key(i) for i in annotation_ids}


def _rows(settings: Settings) -> dict[str, LabelRow]:
    with Session(make_engine(settings.resolved_store_url)) as session:
        return {row.event_id: row for row in session.scalars(select(LabelRow))}


def _live(settings: Settings) -> set[str]:
    return {key for key, row in _rows(settings).items() if not row.deleted}


def _sources(settings: Settings, keys: Iterable[str]) -> dict[str, str | None]:
    rows = _rows(settings)
    return {key: rows[key].source for key in keys}


@pytest.fixture
def settings(service_settings: Settings, kafka: str, tmp_path: Path) -> Iterator[Settings]:
    """Own topics and store, with the consumer running."""
    settings = own_topics(service_settings, tmp_path)
    with consumer_in_thread(settings):
        yield settings


@pytest.fixture
def cli(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cli]:
    """`proxyloop labelstudio ARGS` in-process on these settings, `label_studio` as its Label Studio client."""

    def run(*args: str, label_studio: FakeLabelStudio) -> Result:
        monkeypatch.setattr(reconcile_module, "client_for", lambda _settings: label_studio)
        get_settings.cache_clear()
        return CliRunner().invoke(app, ["labelstudio", *args])

    export(settings, monkeypatch)
    try:
        yield run
    finally:
        get_settings.cache_clear()


def _post(settings: Settings, payloads: Iterable[dict[str, Any]]) -> None:
    """Through the HTTP app's webhook route, which publishes to the broker; 200 once Kafka acknowledged each."""
    with TestClient(create_app(settings)) as http:
        for payload in payloads:
            response = http.post("/webhooks/labelstudio", json=payload,
                                 headers={SECRET_HEADER: settings.webhook_secret})
            assert response.status_code == 200, response.text


def _annotated(settings: Settings, project_id: int, annotation_ids: Iterable[int]) -> None:
    """The project's annotations, as Label Studio's webhook delivered them; returns once the consumer stored them."""
    ids = list(annotation_ids)
    _post(settings, [webhook_payload(i, i, TEXT, "left", project_id=project_id) for i in ids])
    wait_until(lambda: _keys(ids) <= _live(settings), 60, f"project {project_id}'s labels stored")


def _demo_posted(settings: Settings, monkeypatch: pytest.MonkeyPatch, n: int = 6) -> set[str]:
    """What `proxyloop demo` does without a Label Studio: the payloads it would send, posted by the demo's own poster
    (to the app in-process rather than a served one); returns once the consumer stored them."""
    labelled = [({**TEXT, "prompt": f"q{i}"}, "left" if i % 2 else "right") for i in range(n)]
    with monkeypatch.context() as patch:
        patch.setattr(httpx, "Client", lambda **_: TestClient(create_app(settings)))
        demo = set(post_webhook_payloads(settings, labelled))  # type: ignore[arg-type]
    wait_until(lambda: demo <= _live(settings), 60, "the demo's labels stored")
    return demo


def _recording_no_project(settings: Settings, annotation_ids: Iterable[int]) -> None:
    """Labels as stored before labels recorded their project: events naming none (the contract's default)."""
    ids = list(annotation_ids)
    item = PairwiseText(prompt="q", response_a="A", response_b="B", choice="a")
    producer = make_producer(settings)
    for i in ids:
        publish(producer, settings.topic_expert, ExpertLabel(event_id=_key(i), annotator_id="labelstudio-user-1",
                                                             item=item), wait=False)
    producer.flush()
    producer.close()
    wait_until(lambda: _keys(ids) <= _live(settings), 60, "the labels recording no project stored")


def test_reconciling_a_new_project_leaves_the_old_projects_labels_live_and_sweeps_its_own(settings: Settings) -> None:
    """Project 1 deleted, `setup` made project 2: Label Studio answers 404 for every annotation of project 1, and the
    reconciliation of project 2 used to retract all of them. Both paths record the project on the stored label."""
    _annotated(settings, OLD, OLD_IDS)
    label_studio = FakeLabelStudio({NEW: [[_annotation(i)] for i in NEW_IDS]})
    report = reconcile(settings, client=label_studio, project_id=NEW)  # type: ignore[arg-type]
    assert (report.retracted, report.published) == (0, len(NEW_IDS))
    assert report.unknown_project == 0
    wait_until(lambda: _keys(NEW_IDS) <= _live(settings), 60, "reconcile's labels stored")
    assert _live(settings) == _keys(OLD_IDS + NEW_IDS)
    assert _sources(settings, _keys(OLD_IDS + NEW_IDS)) == {**dict.fromkeys(_keys(OLD_IDS), "labelstudio/project-1"),
                                                            **dict.fromkeys(_keys(NEW_IDS), "labelstudio/project-2")}

    label_studio.tasks_by_project[NEW] = [[_annotation(NEW_IDS[0])]]  # the other task deleted in Label Studio
    again = reconcile(settings, client=label_studio, project_id=NEW)  # type: ignore[arg-type]
    assert again.retracted == 1
    wait_until(lambda: _key(NEW_IDS[1]) not in _live(settings), 60, "project 2's deleted annotation retracted")
    assert _live(settings) == _keys(OLD_IDS + NEW_IDS[:1])
    assert _sources(settings, [_key(NEW_IDS[1])]) == {_key(NEW_IDS[1]): "labelstudio/project-2"}


def test_the_demos_simulated_labels_survive_reconciling_a_real_project_1(
    settings: Settings, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`proxyloop demo` without Label Studio posts the payloads it would send (project 1); Label Studio enabled
    later has a real project 1 without those annotations, and its reconciliation retracted every demo label."""
    demo = _demo_posted(settings, monkeypatch)
    real = FakeLabelStudio({OLD: [[_annotation(i)] for i in OLD_IDS]})
    report = reconcile(settings, client=real)  # type: ignore[arg-type]  # by title, as the scheduled flow does
    assert (report.project_id, report.published, report.retracted) == (OLD, len(OLD_IDS), 0)
    wait_until(lambda: _keys(OLD_IDS) <= _live(settings), 60, "the real project's labels stored")
    assert _live(settings) == demo | _keys(OLD_IDS)
    assert set(_sources(settings, demo).values()) == {"labelstudio/simulated"}


def test_labels_recording_no_project_are_left_alone_and_reported(settings: Settings, cli: Cli) -> None:
    """Stored before labels recorded their project: nothing ties them to the project reconciled, so they are neither
    looked up nor retracted, only counted."""
    _recording_no_project(settings, OLD_IDS)
    result = cli("reconcile", "--project", str(NEW), label_studio=FakeLabelStudio({NEW: [[_annotation(10)]]}))
    assert result.exit_code == 0, result.output
    out = " ".join(result.stdout.split())
    assert "0 retracted" in out
    assert ("3 live Label Studio labels of unknown project left alone; `proxyloop labelstudio retract-project "
            "--project ID` withdraws them on purpose") in out
    wait_until(lambda: _key(10) in _live(settings), 60, "reconcile's label stored")
    assert _live(settings) == _keys((*OLD_IDS, 10))


def test_retract_project_takes_the_projects_labels_and_unknown_ones_gone_but_no_other_projects_or_the_demos(
    settings: Settings, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Labels recorded as project 1 go without a lookup (Label Studio has answered 404 for the project); those
    recording no project go when their annotation answers 404, as before; project 2's and the demo's are not looked
    up, though Label Studio answers 404 for every demo annotation."""
    _annotated(settings, OLD, OLD_IDS)
    _annotated(settings, NEW, NEW_IDS)
    _recording_no_project(settings, (20, 21))  # 20's annotation is gone; 21's is in another project
    demo = _demo_posted(settings, monkeypatch, n=2)
    label_studio = FakeLabelStudio({NEW: [[_annotation(i)] for i in NEW_IDS]}, elsewhere={21})
    report = retract_project(settings, OLD, client=label_studio)  # type: ignore[arg-type]
    assert (report.retracted, report.live) == (4, 5)
    assert report.recorded == 3
    kept = _keys((*NEW_IDS, 21)) | demo
    wait_until(lambda: _live(settings) == kept, 60, "the consumer storing the retractions")
    # A retraction keeps the project its label recorded; a 404 names none for a label that recorded none.
    assert _sources(settings, _keys((*OLD_IDS, 20))) == {**dict.fromkeys(_keys(OLD_IDS), "labelstudio/project-1"),
                                                         _key(20): None}


def _error_line(result: Result) -> str:
    assert result.exit_code == 1, result.output
    [line] = result.stderr.splitlines()
    assert line.startswith("error: ")
    return line


def test_no_project_by_title_names_the_project_the_store_knows(settings: Settings, cli: Cli) -> None:
    """The old hint, "run `proxyloop labelstudio setup` first", led to the sweep that retracted every label."""
    nothing = FakeLabelStudio({})
    assert "; run `proxyloop labelstudio setup` first" in _error_line(cli("reconcile", label_studio=nothing))
    _annotated(settings, OLD, OLD_IDS)
    line = _error_line(cli("reconcile", label_studio=nothing))
    assert "yet this store knows project 1 (reconciled, or holding its labels); nothing was retracted" in line
    assert "`proxyloop labelstudio retract-project --project 1` withdraws its labels" in line
    assert "check that PROXYLOOP_LABELSTUDIO_URL names the Label Studio that has it" in line
    reconcile(settings, client=FakeLabelStudio({4: []}), project_id=4)  # type: ignore[arg-type]  # a watermark only
    line = _error_line(cli("reconcile", label_studio=nothing))
    assert "knows projects 1, 4" in line and "retract-project --project ID`" in line
    assert _live(settings) == _keys(OLD_IDS)


def test_labels_recording_no_project_that_the_reconciled_project_lists_are_adopted_and_swept_from_then_on(
    settings: Settings,
) -> None:
    """Labels stored before revision 0003 record no project; left alone, a task of the live project deleted later
    (TASKS_DELETED names no annotation) never had its labels retracted (the review's find). Reconcile sends those
    its project lists again with the project, which the store fills in, and sweeps them from then on."""
    from datetime import timedelta

    from ingest.store import LabelStudioSync
    from tests.ingest.test_labelstudio_reconcile import T0

    _recording_no_project(settings, OLD_IDS)
    with Session(make_engine(settings.resolved_store_url)) as session:  # reconciled before: none changed since
        session.add(LabelStudioSync(project_id=OLD, watermark=T0 + timedelta(days=1)))
        session.commit()
    listed = FakeLabelStudio({OLD: [[_annotation(i)] for i in OLD_IDS[:2]]})  # 3's task was deleted before
    report = reconcile(settings, client=listed, project_id=OLD)  # type: ignore[arg-type]
    assert (report.published, report.retracted, report.unknown_project) == (2, 0, 1)
    wait_until(lambda: _sources(settings, _keys(OLD_IDS[:2])) == dict.fromkeys(_keys(OLD_IDS[:2]),
                                                                                 "labelstudio/project-1"),
               60, "the adopted labels' project stored")
    assert _sources(settings, [_key(3)]) == {_key(3): None}  # not listed: not this project's to judge
    shrunk = FakeLabelStudio({OLD: [[_annotation(1)]]})  # annotation 2's task deleted now
    assert reconcile(settings, client=shrunk, project_id=OLD).retracted == 1  # type: ignore[arg-type]
    wait_until(lambda: _key(2) not in _live(settings), 60, "the retraction stored")
    assert _live(settings) == _keys((1, 3))

"""`proxyloop labelstudio retract-project`: a project deleted in Label Studio has its labels retracted on purpose.

Reconcile refuses a missing project (ProjectMissing), so without this command such labels stay live for ever. Real
Kafka broker, real ingest consumer (the store's one writer) and a SQLite store; Label Studio is the stand-in client of
test_labelstudio_reconcile.py (the shapes Label Studio 1.23.2 gave), as reconcile's own tests use it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session
from typer.testing import CliRunner, Result

from ground.schemas import ExpertLabel, PairwiseText
from ground.settings import Settings, get_settings
from ingest.bus import make_producer, publish, read_topic
from ingest.labelstudio import reconcile as reconcile_module
from ingest.labelstudio.reconcile import ProjectStillExists, retract_project
from ingest.store import LabelRow, label_history, make_engine
from proxyloop.cli import app
from proxyloop.testing import free_port
from tests.conftest import consumer_in_thread, export, own_topics, wait_until
from tests.ingest.test_labelstudio_reconcile import FakeLabelStudio, _annotation

pytestmark = pytest.mark.integration

DELETED, KEPT = 1, 2
DELETED_IDS, KEPT_IDS = (1, 2, 3), (10, 11)
NOT_FROM_LABELSTUDIO = "import-expert-7"  # an expert label by another path: no Label Studio annotation behind it
Cli = Callable[..., Result]


def _key(annotation_id: int) -> str:
    return f"labelstudio-annotation-{annotation_id}"


def _label_studio(*, deleted_still_there: bool = False) -> FakeLabelStudio:
    """Label Studio after project DELETED went, with its annotations (or, for the refusal, with one still there)."""
    projects = {KEPT: [[_annotation(i)] for i in KEPT_IDS]}
    if deleted_still_there:
        projects[DELETED] = [[_annotation(DELETED_IDS[0])]]
    return FakeLabelStudio(projects)


def _rows(settings: Settings) -> dict[str, LabelRow]:
    with Session(make_engine(settings.resolved_store_url)) as session:
        return {row.event_id: row for row in session.scalars(select(LabelRow))}


def _live(settings: Settings) -> set[str]:
    return {key for key, row in _rows(settings).items() if not row.deleted}


def _on_topic(settings: Settings) -> int:
    """Records on the expert topic: what any run published shows here, acknowledged before the run returned."""
    return len(read_topic(settings, settings.topic_expert))


@pytest.fixture
def settings(service_settings: Settings, kafka: str, tmp_path: Path) -> Iterator[Settings]:
    """Own topics and store, the consumer running, and the labels both projects' annotations left, stored by it."""
    settings = own_topics(service_settings, tmp_path)
    item = PairwiseText(prompt="q", response_a="A", response_b="B", choice="a")
    seeds = [_key(i) for i in DELETED_IDS + KEPT_IDS] + [NOT_FROM_LABELSTUDIO]
    producer = make_producer(settings)
    for key in seeds:
        label = ExpertLabel(event_id=key, annotator_id="labelstudio-user-1", item=item)
        publish(producer, settings.topic_expert, label, wait=False)
    producer.flush()
    producer.close()
    with consumer_in_thread(settings):
        wait_until(lambda: _live(settings) == set(seeds), 60, "the seeded labels stored")
        yield settings


@pytest.fixture
def cli(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cli]:
    """`proxyloop labelstudio retract-project ARGS` in-process on these settings; `label_studio` as its client."""

    def run(*args: str, label_studio: FakeLabelStudio | None = None) -> Result:
        if label_studio is not None:
            monkeypatch.setattr(reconcile_module, "client_for", lambda _settings: label_studio)
        get_settings.cache_clear()  # the environment as the test left it
        return CliRunner().invoke(app, ["labelstudio", "retract-project", *args])

    export(settings, monkeypatch)
    try:
        yield run
    finally:
        get_settings.cache_clear()


def _error_line(result: Result) -> str:
    """The one `error: …` line of a refusal: exit code 1, no traceback."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    [line] = result.stderr.splitlines()
    assert line.startswith("error: ")
    return line


def test_the_deleted_projects_labels_are_tombstoned_and_every_other_label_stays_live(settings: Settings) -> None:
    report = retract_project(settings, DELETED, client=_label_studio())  # type: ignore[arg-type]
    assert (report.live, report.retracted, report.dry_run) == (len(DELETED_IDS + KEPT_IDS), len(DELETED_IDS), False)
    gone = {_key(i) for i in DELETED_IDS}
    wait_until(lambda: gone.isdisjoint(_live(settings)), 60, "the consumer storing the retractions")
    rows = _rows(settings)
    assert all(rows[key].deleted for key in gone)
    assert _live(settings) == {_key(i) for i in KEPT_IDS} | {NOT_FROM_LABELSTUDIO}
    with Session(make_engine(settings.resolved_store_url)) as session:  # stored by the consumer, as a retraction
        assert all([h.action for h in label_history(session, key)] == ["created", "deleted"] for key in gone)


def test_a_second_run_publishes_nothing_new(settings: Settings) -> None:
    retract_project(settings, DELETED, client=_label_studio())  # type: ignore[arg-type]
    wait_until(lambda: _live(settings) == {_key(i) for i in KEPT_IDS} | {NOT_FROM_LABELSTUDIO}, 60,
               "the consumer storing the first run's retractions")
    published = _on_topic(settings)
    again = retract_project(settings, DELETED, client=_label_studio())  # type: ignore[arg-type]
    assert (again.live, again.retracted) == (len(KEPT_IDS), 0)
    assert _on_topic(settings) == published


def test_a_project_label_studio_still_has_is_refused_and_nothing_is_published(settings: Settings, cli: Cli) -> None:
    """Annotations 2 and 3 answer 404 while the project does: without the refusal they would be retracted."""
    published = _on_topic(settings)
    line = _error_line(cli("--project", str(DELETED), label_studio=_label_studio(deleted_still_there=True)))
    assert f"still has project {DELETED}; nothing was retracted" in line
    with pytest.raises(ProjectStillExists):
        retract_project(settings, DELETED, client=_label_studio(deleted_still_there=True))  # type: ignore[arg-type]
    assert _on_topic(settings) == published
    assert {_key(i) for i in DELETED_IDS} <= _live(settings)


def test_an_unreachable_label_studio_is_refused_and_nothing_is_published(
    settings: Settings, cli: Cli, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Unreachable is not gone: only Label Studio can say the project is gone, and which of the labels recording no
    project (all of these: seeded without one) were its."""
    monkeypatch.setenv("PROXYLOOP_LABELSTUDIO_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("PROXYLOOP_LABELSTUDIO_TOKEN", "abc")
    published = _on_topic(settings)
    line = _error_line(cli("--project", str(DELETED)))
    assert "unreachable (PROXYLOOP_LABELSTUDIO_URL)" in line and "nothing was retracted" in line
    assert _on_topic(settings) == published
    assert {_key(i) for i in DELETED_IDS} <= _live(settings)


def test_a_dry_run_counts_what_would_go_and_publishes_nothing(settings: Settings, cli: Cli) -> None:
    published = _on_topic(settings)
    result = cli("--project", str(DELETED), "--dry-run", label_studio=_label_studio())
    assert result.exit_code == 0, result.output
    out = " ".join(result.stdout.split())  # as wrapped to the terminal's width
    assert f"project {DELETED} is gone; 3 of 5 live Label Studio labels have no annotation there" in out
    assert "dry run, would retract 3, published nothing" in out
    assert _on_topic(settings) == published
    assert {_key(i) for i in DELETED_IDS} <= _live(settings)


def test_the_project_must_be_named(cli: Cli) -> None:
    result = cli("--dry-run", label_studio=_label_studio())
    assert result.exit_code == 2 and "Missing option '--project'" in result.output

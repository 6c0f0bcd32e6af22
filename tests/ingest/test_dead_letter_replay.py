"""Re-drive after a fix: `proxyloop deadletters replay` publishes refused records again, idempotently.

Real broker (the session's Tansu), the consumer loop in a thread, the CLI as a user runs it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ground.schemas import PairwiseText, ProxyPreference
from ground.settings import Settings
from ingest import dead_letters
from ingest.bus import make_producer, publish
from ingest.store import LabelHistoryRow, count_labels, make_engine
from tests.conftest import consumer_in_thread, own_topics, run_cli, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(service_settings: Settings, kafka: str, tmp_path: Path) -> Settings:
    # A limit too tight for long texts: the "bug" the operator later fixes by raising it.
    return own_topics(service_settings, tmp_path, max_event_bytes=2000)


def _counts(settings: Settings) -> tuple[int, int, dict[str, int]]:
    with Session(make_engine(settings.resolved_store_url)) as session:
        history = int(session.scalar(select(func.count()).select_from(LabelHistoryRow)) or 0)
        return count_labels(session)["proxy"], history, dead_letters.count_by_reason(session)


def test_replay_after_a_raised_limit_stores_the_refused_records_once_and_twice_stores_nothing_more(
    settings: Settings,
) -> None:
    producer = make_producer(settings)
    for i in range(5):
        text = "long answer " * (400 if i < 3 else 1)  # three events over the 2000-byte limit
        publish(producer, settings.topic_proxy, ProxyPreference(event_id=f"p{i}", proxy_name="judge", item=PairwiseText(
            prompt="q", response_a=text, response_b="no", choice="a")), wait=False)
    producer.flush()
    producer.close()
    with consumer_in_thread(settings):
        wait_until(lambda: _counts(settings)[::2] == (2, {"too_large": 3}), 60, "2 stored, 3 dead-lettered")

    listed = run_cli(settings, "deadletters", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert sorted(json.loads(line)["reason_code"] for line in listed.stdout.splitlines()) == ["too_large"] * 3

    fixed = settings.model_copy(update={"max_event_bytes": 1_000_000})
    first = run_cli(fixed, "deadletters", "replay", "--reason", "too_large")
    assert first.returncode == 0 and "replayed 3 records" in first.stdout, first.stdout + first.stderr
    assert "nothing to replay" in run_cli(fixed, "deadletters", "replay").stdout  # each letter replays once
    again = run_cli(fixed, "deadletters", "replay", "--again")
    assert "replayed 3 records" in again.stdout, again.stdout + again.stderr
    with consumer_in_thread(fixed):
        wait_until(lambda: _counts(fixed)[0] == 5, 60, "the replayed records to be stored")
        wait_until(lambda: _counts(fixed)[1] >= 5, 60, "their history")
    stored, history, by_reason = _counts(fixed)
    assert (stored, history, by_reason) == (5, 5, {"too_large": 3})  # the second replay stored nothing twice
    with Session(make_engine(fixed.resolved_store_url)) as session:
        assert [row.replays for row in dead_letters.find(session)] == [2, 2, 2]

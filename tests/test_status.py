"""`proxyloop status [--json]` as an operator runs it: lag per partition, its trend, dead letters by reason.

Only the session's Kafka broker is up, so every other component reads as down and status exits 1.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session

from ground.moments import utcnow
from ground.settings import Settings
from ingest.bus import ensure_topics, make_producer
from ingest.lag import PartitionLag, PartitionTrend, measure_lag, record_lag
from ingest.store import make_engine
from proxyloop.operations import Overview, overview
from proxyloop.testing import free_port
from tests.conftest import consumer_in_thread, run_cli, wait_until
from tests.ingest.test_lag import publish_one_by_one

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(service_settings: Settings, kafka: str, tmp_path: Path) -> Settings:
    # The session's home: its pid file makes kafka read as healthy. Store, registry, topics are this test's,
    # and a Celery broker nobody listens on (the session's Redis may be up for other tests).
    broker = f"redis://127.0.0.1:{free_port()}"
    settings = service_settings.model_copy(update={
        "celery_broker": f"{broker}/0", "celery_backend": f"{broker}/1",
        "store_url": f"sqlite:///{tmp_path}/store.db", "registry_url": str(tmp_path / "registry"),
        "dead_letter_payload_url": (tmp_path / "dead-letters").as_uri(), "consumer_group": f"g-{tmp_path.name}",
        "topic_proxy": f"proxy-{tmp_path.name}", "topic_expert": f"expert-{tmp_path.name}",
        "topic_dead_letter": f"dead-{tmp_path.name}", "retrain_min_expert": 10**6, "retrain_min_proxy": 10**6,
        "kafka_session_timeout_ms": 1000, "kafka_heartbeat_interval_ms": 300,
    })
    ensure_topics(settings)
    return settings


def status_json(settings: Settings) -> tuple[int, dict[str, Any]]:
    result = run_cli(settings, "status", "--json", timeout=120)
    try:
        return result.returncode, json.loads(result.stdout)
    except json.JSONDecodeError as exc:
        raise AssertionError(result.stdout[-2000:] + result.stderr[-4000:]) from exc


def by_partition(view: dict[str, Any]) -> dict[tuple[str, int], dict[str, Any]]:
    return {(p["topic"], p["partition"]): p for p in view["partitions"]}


def test_status_json_with_only_kafka_up_lists_every_partition_and_exits_1(settings: Settings) -> None:
    publish_one_by_one(settings, settings.topic_proxy, 1, 2)

    code, view = status_json(settings)

    assert code == 1
    assert view["components"]["kafka"] == "healthy"
    assert view["components"]["consumer"] != "healthy"
    assert [(p["topic"], p["partition"], p["end_offset"], p["committed"], p["lag"], p["growing"], p["stalled"])
            for p in view["partitions"]] == [
        (settings.topic_expert, 0, 0, None, 0, False, False), (settings.topic_expert, 1, 0, None, 0, False, False),
        (settings.topic_expert, 2, 0, None, 0, False, False), (settings.topic_proxy, 0, 0, None, 0, False, False),
        (settings.topic_proxy, 1, 2, None, 2, False, False), (settings.topic_proxy, 2, 0, None, 0, False, False)]
    assert (view["lag_total"], view["consumer_stalled"], view["lag_error"]) == (2, False, None)
    assert (view["dead_letters_by_reason"], view["labels"]) == ({}, {"expert": 0, "proxy": 0})
    assert (view["queues"], view["runs"], view["production"]) == ({"depths": None, "active_tasks": None}, [], {})


def test_two_status_calls_show_growing_lag_and_an_old_unchanged_commit_shows_a_stall(settings: Settings) -> None:
    publish_one_by_one(settings, settings.topic_proxy, 0, 1)
    status_json(settings)
    publish_one_by_one(settings, settings.topic_proxy, 0, 2, start=1)

    _, second = status_json(settings)

    assert (by_partition(second)[(settings.topic_proxy, 0)]["lag"], by_partition(second)[
        (settings.topic_proxy, 0)]["growing"]) == (3, True)
    assert second["consumer_stalled"] is False  # seconds of samples, not the stall time
    # As if the first sample had been taken longer ago than the stall time, offset uncommitted since.
    with Session(make_engine(settings.resolved_store_url)) as session:
        record_lag(session, settings.consumer_group, [PartitionLag(settings.topic_proxy, 0, 1, None, 1)],
                   utcnow() - timedelta(seconds=settings.consumer_stall_after_s + 1), settings.lag_history_s)
        session.commit()

    code, third = status_json(settings)

    assert code == 1
    assert third["consumer_stalled"] is True
    assert [key for key, p in by_partition(third).items() if p["stalled"]] == [(settings.topic_proxy, 0)]


def test_status_counts_dead_letters_by_reason_from_the_store(settings: Settings) -> None:
    publish_one_by_one(settings, settings.topic_proxy, 0, 1)
    producer = make_producer(settings)
    producer.send(settings.topic_proxy, value=b"not json {", partition=1).get(30)
    producer.send(settings.topic_expert, value=b"[1, 2]", partition=2).get(30)
    producer.close()

    with consumer_in_thread(settings):
        wait_until(lambda: sum(lag.lag for lag in measure_lag(settings)) == 0, 90, "the consumer to commit all")
    _, view = status_json(settings)

    assert view["dead_letters_by_reason"] == {"not_json": 1, "not_object": 1}
    assert view["labels"] == {"expert": 0, "proxy": 1}
    text = run_cli(settings, "status", timeout=120).stdout
    assert "labels stored: expert 0, proxy 1; dead-lettered: 2 (not_json 1, not_object 1)" in text, text
    assert "consumer lag: 0" in text and "growing" not in text and "stalled" not in text, text


@pytest.mark.parametrize(("components", "stalled", "healthy"), [
    ({"kafka": "healthy", "prefect": "healthy (external)"}, False, True),
    ({"kafka": "healthy", "consumer": "stopped"}, False, False),
    ({"kafka": "healthy"}, True, False),
])
def test_status_is_healthy_only_with_every_component_up_and_no_stalled_consumer(
        components: dict[str, str], stalled: bool, healthy: bool) -> None:
    now = utcnow()
    view = Overview(components=components, partitions=[
        PartitionTrend("t", 0, 5, 2, 3, now, False, None, stalled, now if stalled else None)])
    assert (view.healthy, view.consumer_stalled) == (healthy, stalled)


def test_status_with_the_broker_down_reports_lag_unknown_and_why(settings: Settings) -> None:
    gone = settings.model_copy(update={"kafka_bootstrap": f"127.0.0.1:{free_port()}"})

    view = overview(gone)

    assert (view.partitions, view.lag_total, view.consumer_stalled) == (None, None, False)
    assert view.lag_error is not None and view.lag_error.startswith(f"Kafka at {gone.kafka_bootstrap} unreachable")
    assert view.as_json()["partitions"] is None


def test_status_shows_the_acquisition_queue_as_the_last_refresh_left_it(settings: Settings) -> None:
    from policies.ml_backend import ScoreCache, TaskScore, cache_path, write_cache

    assert status_json(settings)[1]["acquisition"] is None  # before the first refresh
    scores = {7: 0.1, 8: 0.5, 9: 0.69}
    write_cache(settings, ScoreCache(method="ensemble", n_labels=0, model_version="appendix-d@3", tasks={
        task: TaskScore(score=score, preferred="a", prob_a=0.6) for task, score in scores.items()}))
    try:
        queue = status_json(settings)[1]["acquisition"]
    finally:
        cache_path(settings).unlink()
    assert (queue["open_tasks"], queue["scores"], queue["method"], queue["labels_since_refresh"]) == (
        3, {"min": 0.1, "median": 0.5, "max": 0.69}, "ensemble", 0)

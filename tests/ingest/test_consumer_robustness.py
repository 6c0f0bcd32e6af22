"""The consumer under abuse: SIGKILLed mid-stream, and fed hostile bytes.

Real broker (the session's Tansu), real consumer processes (`python -m ingest.consumer`).
"""

from __future__ import annotations

import base64
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ground.schemas import FeatureTriple, ProxyPreference
from ground.settings import Settings
from ingest.bus import MalformedEvent, decode_label_event, make_producer, publish, read_topic
from ingest.store import LabelHistoryRow, LabelRow, make_engine
from proxyloop import stack
from tests.conftest import consumer_in_thread, own_topics, wait_until

pytestmark = pytest.mark.integration

KILLS = 20


@pytest.fixture
def settings(service_settings: Settings, kafka: str, tmp_path: Path) -> Settings:
    # A killed member is evicted after its session times out; keep that short so restarts are quick.
    return own_topics(service_settings, tmp_path, kafka_session_timeout_ms=1000, kafka_heartbeat_interval_ms=300,
                      consumer_max_poll_records=40)


def _stored_ids(settings: Settings) -> list[str]:
    with Session(make_engine(settings.resolved_store_url)) as session:
        return list(session.scalars(select(LabelRow.event_id)))


def _history_rows(settings: Settings) -> int:
    with Session(make_engine(settings.resolved_store_url)) as session:
        return int(session.scalar(select(func.count()).select_from(LabelHistoryRow)) or 0)


def _start_consumer(settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "ingest.consumer"], env=stack.child_env(settings),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def test_sigkill_mid_stream_twenty_times_loses_and_duplicates_nothing(settings: Settings, tmp_path: Path) -> None:
    published: list[str] = []
    stop = threading.Event()

    def produce() -> None:
        producer = make_producer(settings)
        i = 0
        while not stop.is_set():
            futures = []
            for _ in range(20):
                event = ProxyPreference(event_id=f"k-{i}", proxy_name="judge",
                                        item=FeatureTriple(x=[float(i)], y_w=0, y_l=1))
                futures.append((event.event_id, publish(producer, settings.topic_proxy, event, wait=False)))
                i += 1
            producer.flush()
            for event_id, future in futures:
                future.get(timeout=30)
                published.append(event_id)
            time.sleep(0.05)
        producer.close()

    producer_thread = threading.Thread(target=produce, daemon=True)
    producer_thread.start()
    log = tmp_path / "consumer.log"
    rng = random.Random(5)
    try:
        for _ in range(KILLS):
            before = len(_stored_ids(settings))
            process = _start_consumer(settings, log)
            # Kill while it is working: right after it stored something, at a random point of the next batch.
            wait_until(lambda: len(_stored_ids(settings)) > before, 60, "the consumer to store a batch")  # noqa: B023
            time.sleep(rng.uniform(0, 0.05))
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    finally:
        stop.set()
        producer_thread.join(timeout=60)
    final = _start_consumer(settings, log)
    try:
        wait_until(lambda: len(_stored_ids(settings)) >= len(published), 120, "the last consumer to catch up")
    finally:
        os.killpg(final.pid, signal.SIGTERM)
        final.wait(timeout=30)

    stored = _stored_ids(settings)
    assert len(stored) == len(set(stored)) == len(published)  # 0 duplicated rows
    assert set(stored) == set(published)  # 0 lost
    assert _history_rows(settings) == len(published)  # redeliveries wrote nothing


# --- hostile input -------------------------------------------------------------------------------------------

_VALID = {"schema_version": 2, "event_id": "x", "occurred_at": "2026-11-29T12:00:00Z", "kind": "proxy_preference",
          "proxy_name": "judge",
          "item": {"type": "features", "x": [0.5, 1.0], "y_w": 0, "y_l": 1}}
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


def _mutated(draw: st.DrawFn) -> bytes:
    event = json.loads(json.dumps(_VALID))
    event["event_id"] = f"hostile-{draw(st.uuids())}"
    how = draw(st.sampled_from(["drop", "retype", "version", "huge", "item", "extra", "nan"]))
    if how == "drop":  # `kind` and `schema_version` have defaults; these do not
        del event[draw(st.sampled_from(["event_id", "proxy_name", "item", "occurred_at"]))]
    elif how == "retype":
        key = draw(st.sampled_from(["event_id", "proxy_name", "item", "occurred_at", "kind"]))
        if key == "occurred_at":
            event[key] = f"not a date {draw(st.text(max_size=10))}"
        elif key == "kind":
            event[key] = draw(_json_values.filter(lambda v: v not in ("proxy_preference", "expert_label")))
        else:
            event[key] = draw(_json_values.filter(lambda v: not isinstance(v, str | dict) or v == {}))
    elif how == "version":
        event["schema_version"] = draw(_json_values.filter(lambda v: v not in (1, 2) or isinstance(v, bool)))
    elif how == "huge":
        event["event_id"] = "h" * draw(st.integers(257, 200_000))
    elif how == "item":
        event["item"] = {"type": "features", "x": draw(st.lists(_json_values, max_size=3)), "y_w": 1, "y_l": 1}
    elif how == "extra":
        event[draw(st.text(min_size=1, max_size=10).filter(lambda k: k not in _VALID))] = draw(_json_values)
    else:
        return json.dumps(event).replace("0.5", draw(st.sampled_from(["NaN", "Infinity", "-Infinity"]))).encode()
    return json.dumps(event).encode()


@st.composite
def hostile_events(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["mutated", "bad_utf8", "binary", "not_object", "deep", "truncated"]))
    if kind == "mutated":
        return _mutated(draw)
    if kind == "bad_utf8":
        return b'{"event_id": "' + draw(st.binary(min_size=1, max_size=20)) + b'\xff\xfe"}'
    if kind == "binary":
        return draw(st.binary(max_size=200).filter(lambda b: not b.strip().startswith(b"{")))
    if kind == "not_object":
        return json.dumps(draw(_json_values.filter(lambda v: not isinstance(v, dict)))).encode()
    if kind == "deep":
        depth = draw(st.integers(1000, 50_000))
        return b"[" * depth + b"]" * depth
    valid = json.dumps({**_VALID, "event_id": f"cut-{draw(st.uuids())}"}).encode()
    return valid[: draw(st.integers(1, len(valid) - 1))]


def _collect_hostile(n: int) -> list[bytes]:
    """At least n distinct hostile records, each checked to be refused by the decoder (not crash it).

    One derandomised run, so the set is the same on every machine: Hypothesis's CI profile derandomises anyway,
    and a loop of repeated runs would then draw the same examples forever.
    """
    found: set[bytes] = set()

    @given(hostile_events())
    @hsettings(max_examples=3 * n, database=None, deadline=None, derandomize=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
    def refused(raw: bytes) -> None:
        with pytest.raises(MalformedEvent):
            decode_label_event(raw)
        found.add(raw)

    refused()
    assert len(found) >= n, f"only {len(found)} distinct hostile records drawn"
    return sorted(found)


def test_a_thousand_hostile_events_are_dead_lettered_and_the_good_ones_around_them_stored(
    settings: Settings,
) -> None:
    hostile = _collect_hostile(1000)
    producer = make_producer(settings)
    good: list[str] = []
    for i, raw in enumerate(hostile):
        producer.send(settings.topic_proxy, value=raw)
        if i % 10 == 0:
            event = ProxyPreference(event_id=f"good-{i}", proxy_name="judge",
                                    item=FeatureTriple(x=[float(i)], y_w=1, y_l=0))
            publish(producer, settings.topic_proxy, event, wait=False)
            good.append(event.event_id)
    producer.flush()
    producer.close()

    with consumer_in_thread(settings) as thread:
        wait_until(lambda: len(read_topic(settings, settings.topic_dead_letter)) >= len(hostile)
              and len(_stored_ids(settings)) >= len(good), 180, "every event to be stored or dead-lettered")
    assert not thread.is_alive()

    assert sorted(_stored_ids(settings)) == sorted(good)
    letters = [json.loads(v) for v in read_topic(settings, settings.topic_dead_letter)]
    originals = {base64.b64decode(letter["original_b64"]): letter for letter in letters}
    assert set(originals) == set(hostile)
    assert all(letter["reason"] and letter["topic"] == settings.topic_proxy and letter["offset"] >= 0
               for letter in letters)
    assert all(len(letter["reason"]) < 2000 for letter in letters)  # a huge input does not make a huge reason

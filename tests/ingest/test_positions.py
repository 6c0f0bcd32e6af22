"""The consumer's position past the log's end: a committed offset from a lost log, a topic re-created while it runs.

Kafka answers such a fetch with OFFSET_OUT_OF_RANGE and kafka-python resets to the earliest offset; the embedded
Tansu answers "no records" with the lower high watermark, so without `ingest.positions.restart_past_the_end` the
consumer waited silently until the log grew past its old position and skipped everything before it.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.admin import NewTopic
from kafka.structs import OffsetAndMetadata

from ground.settings import Settings
from ingest.bus import make_producer, publish
from tests.conftest import consumer_in_thread, own_topics
from tests.ingest.test_producers import _preferences, _stored_soon

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(service_settings: Settings, kafka: str, tmp_path: Path) -> Settings:
    return own_topics(service_settings, tmp_path, topic_partitions=1)


def _send(settings: Settings, prefix: str, n: int) -> set[str]:
    producer = make_producer(settings)
    events = [e.model_copy(update={"event_id": f"{prefix}-{e.event_id}"}) for e in _preferences(n)]
    for event in events:
        publish(producer, settings.topic_proxy, event)
    producer.close()
    return {e.event_id for e in events}


def test_a_committed_offset_past_the_log_s_end_reads_the_log_from_its_beginning(settings: Settings) -> None:
    group = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=settings.consumer_group,
                          enable_auto_commit=False)
    group.commit({TopicPartition(settings.topic_proxy, 0): OffsetAndMetadata(1000, "", -1)})
    group.close()
    sent = _send(settings, "early", 3)
    with consumer_in_thread(settings):
        assert sent <= _stored_soon(settings, sent)


def test_a_topic_created_again_while_the_consumer_runs_is_read_from_its_beginning(settings: Settings) -> None:
    with consumer_in_thread(settings):
        old = _send(settings, "old", 5)
        assert old <= _stored_soon(settings, old)
        admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
        try:
            admin.delete_topics([settings.topic_proxy])
            deadline = time.monotonic() + 30
            while settings.topic_proxy in admin.list_topics() and time.monotonic() < deadline:
                time.sleep(0.2)
            admin.create_topics([NewTopic(settings.topic_proxy, 1, 1)])
        finally:
            admin.close()
        new = _send(settings, "new", 3)  # fewer than the consumer's old position (5)
        assert new <= _stored_soon(settings, new)

"""Where the consumer reads next, set back when a batch must be read again or the log is shorter than the position.

Both only move a position backward: the store upserts by event id and dead letters are keyed by position and hash,
so a record read twice is stored and dead-lettered once.
"""

from __future__ import annotations

import logging
from typing import Any

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

log = logging.getLogger("proxyloop.ingest")


def rewind(consumer: KafkaConsumer, records: list[Any]) -> None:
    """Back to the first record of the batch on each partition, so the batch is read again."""
    first: dict[TopicPartition, int] = {}
    for record in records:
        tp = TopicPartition(record.topic, record.partition)
        first[tp] = min(first.get(tp, record.offset), record.offset)
    for tp, offset in first.items():
        try:
            consumer.seek(tp, offset)
        except ValueError:  # kafka-python: "Unassigned partition"
            pass  # no longer ours after a rebalance: its new owner starts from the committed offset


def restart_past_the_end(consumer: KafkaConsumer) -> None:
    """Set partitions whose position is past the log's end (their high watermark) back to the log's beginning.

    Why: a topic deleted and created again under the same name, or a committed offset from a log that was
    lost, leaves the position past the new log's end. Kafka answers such a fetch with OFFSET_OUT_OF_RANGE
    and the consumer resets itself, but Tansu answers "no records" with a lower high watermark: the consumer
    would wait silently until the log grew past its position, and skip what came before. Called when a poll
    returns nothing, so it costs nothing while records flow.
    """
    for tp in consumer.assignment():
        try:
            end, position = consumer.highwater(tp), consumer.position(tp, timeout_ms=0)
        except KafkaError:  # e.g. revoked in between; the next empty poll looks again
            continue
        if end is not None and position is not None and position > end:
            log.error("%s[%d]: position %d is past the log's end %d (topic re-created, or a committed offset from "
                      "a lost log); reading it from its beginning", tp.topic, tp.partition, position, end)
            consumer.seek_to_beginning(tp)

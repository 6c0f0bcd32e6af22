"""What `proxyloop status` reports beyond process health: lag, queues, counts, runs, versions.

Each probe answers None when its service is unreachable, so status works on a half-up stack.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from ingest.bus import read_topic
from ingest.store import count_labels, latest_runs, make_engine
from policies.registry import aliases, list_policies
from proxyloop.settings import Settings


@dataclass
class Overview:
    consumer_lag: int | None = None
    dead_lettered: int | None = None
    queue_depths: dict[str, int] | None = None
    active_tasks: list[str] | None = None
    labels: dict[str, int] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)
    production: dict[str, int] = field(default_factory=dict)


def kafka_figures(settings: Settings) -> tuple[int | None, int | None]:
    """(consumer-group lag over the label topics, records in the dead-letter topic)."""
    from kafka import KafkaConsumer, TopicPartition

    try:
        consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=settings.consumer_group,
                                 enable_auto_commit=False, request_timeout_ms=3000)
    except Exception:  # noqa: BLE001 - broker down: report unknown
        return None, None
    try:
        def partitions(topic: str) -> list[TopicPartition]:
            return [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]

        labels = partitions(settings.topic_expert) + partitions(settings.topic_proxy)
        ends = consumer.end_offsets(labels)
        lag = sum(max(0, ends[tp] - (consumer.committed(tp) or 0)) for tp in labels)
        # Counted by reading: Tansu's offsets count produced batches, not records.
        return lag, len(read_topic(settings, settings.topic_dead_letter, idle_polls=2))
    finally:
        consumer.close()


def celery_figures(settings: Settings) -> tuple[dict[str, int] | None, list[str] | None]:
    """(queued messages per queue, tasks running on workers) via the broker and worker control."""
    import redis

    from workers.app import CPU_QUEUE, GPU_QUEUE, app

    try:
        client = redis.Redis.from_url(settings.celery_broker, socket_timeout=2)
        depths = {queue: int(client.llen(queue)) for queue in (GPU_QUEUE, CPU_QUEUE)}
    except Exception:  # noqa: BLE001 - broker down or not Redis
        depths = None
    try:
        active = app.control.inspect(timeout=1.0).active() or {}
        tasks = [f"{t['name']} {t['id']} on {worker}" for worker, running in active.items() for t in running]
    except Exception:  # noqa: BLE001
        tasks = None
    return depths, tasks


def overview(settings: Settings) -> Overview:
    view = Overview()
    view.consumer_lag, view.dead_lettered = kafka_figures(settings)
    view.queue_depths, view.active_tasks = celery_figures(settings)
    if settings.home_dir.exists():
        with Session(make_engine(settings.resolved_store_url)) as session:
            view.labels = count_labels(session)
            view.runs = [{"run_id": r.run_id, "status": r.status, "updated": f"{r.updated_at:%Y-%m-%d %H:%M:%S}",
                          "plan": (r.summary.get("conditions") or {}).get("plan"),
                          "gate": (r.summary.get("gate") or {}).get("decision"),
                          "version": (r.summary.get("release") or {}).get("version")}
                         for r in latest_runs(session, limit=10)]
    view.production = {name: aliases(settings.registry_dir, name).get("production", 0)
                       for name in list_policies(settings.registry_dir)}
    return view

"""Event → training task started, through the real stack, beside the Prefect and Celery floors.

Run: `.venv/bin/python -m bench.trigger_latency [--quick]`. Starts an isolated stack on free
loopback ports, crosses the retrain threshold `rounds` times, and for each round reads the
`dataset.updated` event's time (Kafka), the flow run's start (Prefect API) and the moment the
worker picked the training task up (`started.json` in the run directory). Floors measured in the
same run: an empty flow deployment triggered by an event, and an empty Celery task round trip.
The last line is JSON: `event_to_task_s` (median), `event_to_flow_s`, `prefect_floor_s`,
`celery_floor_s`, and `event_to_flow_parts_s` / `prefect_floor_parts_s`: where event → flow goes
(`emit`: event → received by the Prefect server; `trigger`: → flow run created by the automation;
`poll`: → Pending, the runner's poll; `process`: → Running, the flow subprocess's start and its
module's imports), and `flow_start`: how the runner started flow runs (`PROXYLOOP_FLOW_START`:
`forkserver`, the default, or `spawn`, Prefect's own; flows/warm_start.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx

from ground.schemas import DATASET_UPDATED_EVENT, ExpertLabel, ProxyPreference
from ground.settings import Settings
from ingest.bus import make_producer, publish, read_topic
from ingest.synthetic import appendix_d
from proxyloop import stack, testing


def _dataset_updates(settings: Settings) -> list[float]:
    values = read_topic(settings, settings.topic_dataset_updated, idle_polls=2)
    return sorted(datetime.fromisoformat(json.loads(v)["occurred_at"]).timestamp() for v in values)


def _flow_runs(settings: Settings, flow_name: str) -> list[dict[str, object]]:
    body = {"flows": {"name": {"any_": [flow_name]}}, "sort": "START_TIME_ASC", "limit": 50}
    runs: list[dict[str, object]] = httpx.post(f"{settings.prefect_api_url}/flow_runs/filter", json=body,
                                               timeout=30).json()
    return runs


def _wait(predicate, timeout_s: float) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("waited too long; see the stack's logs")
        time.sleep(0.2)


def _ts(value: object) -> float:
    return datetime.fromisoformat(str(value)).timestamp()


def _received_at(settings: Settings, event: str, event_at: float) -> float:
    """When the Prefect server received the first `event` since event_at (persisted within ~5 s)."""
    since = datetime.fromtimestamp(event_at - 0.01, tz=UTC).isoformat()  # occurred: at or after event_at
    body = {"filter": {"event": {"name": [event]}, "occurred": {"since": since}}, "limit": 10}
    found: list[dict[str, object]] = []

    def persisted() -> bool:
        found[:] = httpx.post(f"{settings.prefect_api_url}/events/filter", json=body, timeout=30).json()["events"]
        return bool(found)

    _wait(persisted, 30)
    return min(_ts(e["received"]) for e in found)


def _flow_start_parts(settings: Settings, run: dict[str, object], event: str, event_at: float) -> dict[str, float]:
    """event → received by Prefect (emit) → flow run created by the automation (trigger) → first Pending
    (runner poll) → Running (flow subprocess start + its module's imports)."""
    states = httpx.get(f"{settings.prefect_api_url}/flow_run_states/", params={"flow_run_id": str(run["id"])},
                       timeout=30).json()
    pending = min(_ts(s["timestamp"]) for s in states if s["type"] == "PENDING")
    received, created = _received_at(settings, event, event_at), _ts(run["created"])
    return {"emit": received - event_at, "trigger": created - received, "poll": pending - created,
            "process": _ts(run["start_time"]) - pending}


def _median_parts(parts: list[dict[str, float]]) -> dict[str, float]:
    return {k: round(statistics.median(p[k] for p in parts), 3) for k in parts[0]}


def measure_rounds(settings: Settings, rounds: int) -> tuple[list[float], list[float], list[dict[str, float]]]:
    producer = make_producer(settings)
    task = appendix_d(n_proxy=3000, n_expert=settings.retrain_min_expert * rounds, seed=0)
    for i, triple in enumerate(task.proxy):
        publish(producer, settings.topic_proxy, ProxyPreference(event_id=f"p{i}", proxy_name="bench", item=triple),
                wait=False)
    producer.flush()
    to_task, to_flow, parts = [], [], []
    per_round = settings.retrain_min_expert
    for r in range(rounds):
        for i, triple in enumerate(task.expert[r * per_round:(r + 1) * per_round]):
            publish(producer, settings.topic_expert, ExpertLabel(
                event_id=f"e{r}-{i}-{uuid.uuid4().hex[:6]}", annotator_id="bench", item=triple), wait=False)
        producer.flush()
        _wait(lambda r=r: len(_dataset_updates(settings)) > r, 120)
        event_at = _dataset_updates(settings)[r]
        _wait(lambda r=r: len([x for x in _flow_runs(settings, "retrain") if x.get("state_type") == "COMPLETED"]) > r,
              600)
        run = [x for x in _flow_runs(settings, "retrain") if x.get("state_type") == "COMPLETED"][r]
        started = json.loads((settings.runs_dir / str(run["id"]) / "started.json").read_text())["started_at"]
        to_task.append(started - event_at)
        to_flow.append(_ts(run["start_time"]) - event_at)
        parts.append(_flow_start_parts(settings, run, DATASET_UPDATED_EVENT, event_at))
        print(f"round {r + 1}: event → flow run started {to_flow[-1]:.2f} s "
              f"({', '.join(f'{k} {v:.2f}' for k, v in parts[-1].items())}), → training task started "
              f"{to_task[-1]:.2f} s", flush=True)
    producer.close()
    return to_task, to_flow, parts


def prefect_floor(settings: Settings, repeats: int) -> tuple[list[float], list[dict[str, float]]]:
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker

    from flows.probe import HEALTH_EVENT

    floors, parts = [], []
    for i in range(repeats):
        before = len(_flow_runs(settings, "health"))
        emitted = time.time()
        emit_event(event=HEALTH_EVENT, resource={"prefect.resource.id": "proxyloop.bench"})
        EventsWorker.drain_all(timeout=10)
        _wait(lambda b=before: len([x for x in _flow_runs(settings, "health") if x.get("start_time")]) > b, 120)
        run = [x for x in _flow_runs(settings, "health") if x.get("start_time")][before]
        floors.append(_ts(run["start_time"]) - emitted)
        parts.append(_flow_start_parts(settings, run, HEALTH_EVENT, emitted))
        print(f"prefect floor {i + 1}: event → empty flow run started {floors[-1]:.2f} s "
              f"({', '.join(f'{k} {v:.2f}' for k, v in parts[-1].items())})", flush=True)
    return floors, parts


def celery_floor(repeats: int) -> list[float]:
    from workers.app import PING_TASK, app

    floors = []
    for _ in range(repeats):
        started = time.perf_counter()
        app.send_task(PING_TASK).get(timeout=30)
        floors.append(time.perf_counter() - started)
    print(f"celery floor: empty task round trip median {statistics.median(floors) * 1000:.1f} ms", flush=True)
    return floors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round and fewer floor repeats")
    args = parser.parse_args()
    rounds = 1 if args.quick else 3
    with tempfile.TemporaryDirectory(prefix="proxyloop-bench-") as home:
        settings = testing.isolated_settings(Path(home))
        import os

        os.environ.update({k: v for k, v in stack.child_env(settings).items()
                           if k.startswith(("PROXYLOOP_", "PREFECT_"))})
        from ground.settings import get_settings

        get_settings.cache_clear()
        try:
            stack.up(settings, lambda m: print(m, flush=True))
            to_task, to_flow, parts = measure_rounds(settings, rounds)
            prefect, floor_parts = prefect_floor(settings, 3 if args.quick else 5)
            celery = celery_floor(20 if args.quick else 100)
        finally:
            stack.down(settings)
    result = {
        "event_to_task_s": round(statistics.median(to_task), 3),
        "event_to_flow_s": round(statistics.median(to_flow), 3),
        "prefect_floor_s": round(statistics.median(prefect), 3),
        "celery_floor_s": round(statistics.median(celery), 4),
        "event_to_flow_parts_s": _median_parts(parts),
        "prefect_floor_parts_s": _median_parts(floor_parts),
        "rounds": rounds,
        "flow_start": settings.flow_start,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()

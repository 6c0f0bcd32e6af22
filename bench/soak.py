"""Sustained load: proxy events at ~80 % of the measured ingest capacity, expert labels through the webhook.

Run: `.venv/bin/python bench/soak.py [--quick] [--minutes M] [--load 0.8] [--broker-storage s3|memory]` (needs
`make setup`).
Starts an isolated stack on free loopback ports (object store + durable Tansu broker, the HTTP app,
the ingest consumer; no Prefect, Redis or worker: the retrain thresholds are set out of reach).
Baseline from the same run: proxy events published as fast as kafka-python sends them for 20 s
(10 with `--quick`), timed from the first send to the last one stored (`capacity_eps`). Then for
10 minutes (2 with `--quick`) a steady-rate producer sends `load` × capacity proxy events/s (1 in
1000 not JSON, to be dead-lettered) while another thread posts 2 expert labels/s to the webhook in
Label Studio's ANNOTATION_CREATED format. Every 5 s: lag, RSS and CPU time of each stack process
(children included).

Lag is counted in records: acknowledged − stored − dead-lettered so far (`peak_lag`, `end_lag`).
The consumer group's offset lag (end offset − committed, `ingest.lag.measure_lag`, what `proxyloop
status` shows) is reported beside it (`peak_offset_lag`, `end_offset_lag`); on the embedded Tansu
broker end offsets may count produced batches rather than records, so it is not the headline.
`end_*` is taken after the producers stop and the consumer drained (at most 120 s; dead letters as
the consumer recorded them in the store). `dead_lettered` counts distinct refused records
(position + SHA-256) on the dead-letter topic. Every count covers the whole run, burst included, on
a fresh store and broker: `lost` = published − stored − dead-lettered (targets: lost = 0, end_lag = 0).
RSS growth per process = (RSS at the end − RSS after the warm-up) / RSS after the warm-up, where the
warm-up is the first 20 % of the soak, "after the warm-up" the median of the samples from 20 to 40 %
and "at the end" the median of the last 20 % (medians: one 5 s sample catches in-flight buffers);
`rss_growth` is the largest (target < 0.1). Also reported: the rate the consumer stored at during the
soak (`soak_stored_eps`) and the CPU cores each process used (`cpu_cores`). The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# Run as a script, this folder would shadow the `ingest` package with bench/ingest.py.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import httpx  # noqa: E402
import psutil  # noqa: E402 - installed with accelerate; reads RSS of a process and its children
from kafka import KafkaProducer  # noqa: E402
from sqlalchemy import func, select  # noqa: E402
from sqlalchemy.engine import Engine  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from ground.moments import utcnow  # noqa: E402
from ground.schemas import DeadLetter, FeatureTriple, PairwiseText, ProxyPreference  # noqa: E402
from ground.settings import Settings  # noqa: E402
from ingest.bus import ensure_topics, make_producer, publish, read_topic  # noqa: E402
from ingest.dead_letters import count_by_reason  # noqa: E402
from ingest.labelstudio import SECRET_HEADER, webhook_payload  # noqa: E402
from ingest.lag import LagUnavailable, measure_lag  # noqa: E402
from ingest.store import LabelRow, count_labels, make_engine  # noqa: E402
from proxyloop import stack, testing  # noqa: E402

COMPONENTS = ("objectstore", "kafka", "http", "consumer")
SAMPLE_EVERY_S = 5.0
WARM_UP_FRACTION = 0.2
MALFORMED_EVERY = 1000
EXPERT_PER_S = 2.0
DRAIN_TIMEOUT_S = 120.0


def _proxy_event(i: int) -> ProxyPreference:
    """Half feature triples, half ~1 KB pairwise texts (as bench/ingest.py), each with its own id and time."""
    if i % 2:
        item: FeatureTriple | PairwiseText = FeatureTriple(x=[0.1 * (i % 7)] * 5, y_w=i % 3, y_l=(i + 1) % 3)
    else:
        item = PairwiseText(prompt=f"prompt {i} " * 20, response_a="a " * 100, response_b="b " * 100, choice="a")
    return ProxyPreference(event_id=f"soak-{i}", proxy_name="judge", occurred_at=utcnow(), item=item)


class ProxyPublisher:
    """Sends proxy events (every MALFORMED_EVERY-th one not JSON) and counts the broker's acknowledgements.

    The counters are written by kafka-python's sender thread only (callbacks), read by anyone.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.producer: KafkaProducer = make_producer(settings)
        self.sent = self.malformed_sent = self.acked = self.malformed_acked = self.failed = 0
        self.last_error = ""

    def _ok(self, _metadata: object) -> None:
        self.acked += 1

    def _ok_malformed(self, _metadata: object) -> None:
        self.acked += 1
        self.malformed_acked += 1

    def _error(self, exc: BaseException) -> None:
        self.failed += 1
        self.last_error = repr(exc)

    def send_one(self) -> None:
        i = self.sent
        self.sent += 1
        if i % MALFORMED_EVERY == MALFORMED_EVERY - 1:
            self.malformed_sent += 1
            future = self.producer.send(self.settings.topic_proxy, key=f"soak-{i}".encode(),
                                        value=f"not json soak-{i}".encode())
            future.add_callback(self._ok_malformed)
        else:
            future = publish(self.producer, self.settings.topic_proxy, _proxy_event(i), wait=False)
            future.add_callback(self._ok)
        future.add_errback(self._error)

    def close(self) -> None:
        self.producer.flush()
        self.producer.close()


def steady(publisher: ProxyPublisher, rate: float, stop: threading.Event) -> None:
    """`rate` events/s on the monotonic clock (20 ms ticks; a late tick catches up) until `stop`."""
    start, already = time.monotonic(), publisher.sent
    while not stop.is_set():
        due = already + int((time.monotonic() - start) * rate) - publisher.sent
        for _ in range(due):
            publisher.send_one()
        stop.wait(0.02)


@dataclass
class LabelPoster:
    """Posts expert labels to the webhook at a steady rate; a 200 means Kafka acknowledged the label."""

    settings: Settings
    ok: int = 0
    failed: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    latencies_s: list[float] = field(default_factory=list)

    def _post(self, client: httpx.Client, n: int) -> None:
        y_a, y_b = n % 3, (n + 1) % 3
        data = {"prompt": f"soak label {n}", "x": [0.01 * (n % 100)] * 5, "y_a": y_a, "y_b": y_b,
                "answer_a": f"output {y_a}", "answer_b": f"output {y_b}"}
        payload = webhook_payload(task_id=n, annotation_id=n, data=data, selected="left" if n % 2 else "right")
        started = time.perf_counter()
        for attempt in range(3):  # a 5xx means no ack from Kafka; the annotation id makes a retry idempotent
            try:
                response = client.post("/webhooks/labelstudio", json=payload,
                                       headers={SECRET_HEADER: self.settings.webhook_secret})
                status = response.status_code
            except httpx.HTTPError:
                status = 0
            if 0 < status < 500:
                break
            time.sleep(0.5 * (attempt + 1))
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if status == 200:
            self.ok += 1
            self.latencies_s.append(time.perf_counter() - started)
        else:
            self.failed += 1

    def run(self, rate: float, stop: threading.Event) -> None:
        start, n = time.monotonic(), 0
        with httpx.Client(base_url=self.settings.http_url, timeout=30) as client:
            while not stop.is_set():
                if n < (time.monotonic() - start) * rate:
                    self._post(client, n)
                    n += 1
                else:
                    stop.wait(0.05)


def stored_total(engine: Engine) -> int:
    """Live labels of both kinds (`count_labels`: a scan of the table; for the final figure)."""
    with Session(engine) as session:
        return sum(count_labels(session).values())


def stored_rows(engine: Engine) -> int:
    """Rows in the labels table, read from an index: the same as `stored_total` here (this bench deletes
    nothing) at a fraction of the cost. Sampled every 5 s, a scan of the whole table (hundreds of MB by the
    end) would compete with the consumer for the CPU and hold WAL checkpoints back."""
    with Session(engine) as session:
        return int(session.scalar(select(func.count()).select_from(LabelRow)) or 0)


def dead_letters_in_store(engine: Engine) -> int:
    """The consumer's own record of the letters it sent (one row per refused record)."""
    with Session(engine) as session:
        return sum(count_by_reason(session).values())


def dead_letters_on_topic(settings: Settings) -> tuple[int, int]:
    """(distinct refused records, letters) on the dead-letter topic: a letter sent twice counts once."""
    values = read_topic(settings, settings.topic_dead_letter, idle_polls=3, timeout_s=60)
    letters = [DeadLetter.model_validate_json(v) for v in values]
    return len({(d.topic, d.partition, d.offset, d.sha256) for d in letters}), len(letters)


def offset_lag(settings: Settings) -> int | None:
    """The consumer group's lag over the label partitions in offsets (batches on Tansu); None if unknown."""
    try:
        return sum(p.lag for p in measure_lag(settings))
    except LagUnavailable:
        return None


def process_figures(settings: Settings) -> tuple[dict[str, int], dict[str, float]]:
    """RSS (bytes) and CPU time (s) of each stack process, its children included (0 if it is not running),
    and of this bench (`bench`: the producers and the sampling)."""
    sizes: dict[str, int] = {}
    cpu: dict[str, float] = {}
    for name in COMPONENTS:
        pid = stack.pid_of(settings, name)
        sizes[name], cpu[name] = 0, 0.0
        if pid is not None:
            try:
                process = psutil.Process(pid)
                for member in [process, *process.children(recursive=True)]:
                    sizes[name] += member.memory_info().rss
                    times = member.cpu_times()
                    cpu[name] += times.user + times.system
            except psutil.NoSuchProcess:
                pass
    times = psutil.Process().cpu_times()
    cpu["bench"] = times.user + times.system
    return sizes, cpu


@dataclass
class Sample:
    t: float
    published: int
    stored: int
    dead_lettered: int
    offset_lag: int | None
    rss: dict[str, int]
    cpu_s: dict[str, float]

    @property
    def lag(self) -> int:
        return self.published - self.stored - self.dead_lettered


def sample(settings: Settings, engine: Engine, t: float, published: Callable[[], int]) -> Sample:
    # Stored and dead letters first, published last: the record lag can only be overstated, never hidden.
    offsets = offset_lag(settings)
    dead, stored = dead_letters_in_store(engine), stored_rows(engine)
    return Sample(t, published(), stored, dead, offsets, *process_figures(settings))


def measure_capacity(settings: Settings, engine: Engine, publisher: ProxyPublisher, seconds: float) -> float:
    """The baseline: events sent as fast as kafka-python takes them for `seconds`, divided by the time from
    the first send until the last of them is stored. The consumer falls behind, so this is its rate."""
    before, sent_before, malformed_before = stored_rows(engine), publisher.sent, publisher.malformed_sent
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        for _ in range(100):
            publisher.send_one()
    publisher.producer.flush()
    sent_s = time.perf_counter() - started
    n = publisher.sent - sent_before
    target = before + n - (publisher.malformed_sent - malformed_before)
    while stored_rows(engine) < target:
        if time.perf_counter() - started > DRAIN_TIMEOUT_S:
            raise TimeoutError(f"burst of {n} not stored within {DRAIN_TIMEOUT_S:.0f} s; see "
                               f"{settings.home_dir}/logs/consumer.log")
        time.sleep(0.1)
    elapsed = time.perf_counter() - started
    print(f"burst: {n} events sent in {sent_s:.1f} s ({n / sent_s:,.0f}/s), stored after {elapsed:.1f} s", flush=True)
    return n / elapsed


def _mb(n: float) -> str:
    return f"{n / 2**20:.0f} MB"


def soak(settings: Settings, args: argparse.Namespace) -> dict[str, object]:
    engine = make_engine(settings.resolved_store_url)
    publisher = ProxyPublisher(settings)
    poster = LabelPoster(settings)
    try:
        # One event through the whole path first: the consumer has joined its group before the burst.
        publisher.send_one()
        publisher.producer.flush()
        deadline = time.monotonic() + 60
        while stored_rows(engine) < 1:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the first event was not stored in 60 s; see {settings.home_dir}/logs")
            time.sleep(0.2)
        capacity = measure_capacity(settings, engine, publisher, args.burst_s)
        rate = args.load * capacity
        duration = args.minutes * 60
        print(f"capacity {capacity:,.0f} events/s; soak at {rate:,.0f} proxy events/s + {EXPERT_PER_S:g} expert "
              f"labels/s for {duration:.0f} s", flush=True)

        def published() -> int:
            return publisher.acked + poster.ok

        stop = threading.Event()
        threads = [threading.Thread(target=steady, args=(publisher, rate, stop), name="proxy", daemon=True),
                   threading.Thread(target=poster.run, args=(EXPERT_PER_S, stop), name="expert", daemon=True)]
        sent_before, acked_before = publisher.sent, publisher.acked
        started = time.monotonic()
        first = sample(settings, engine, 0.0, published)
        for thread in threads:
            thread.start()
        samples: list[Sample] = []
        try:
            for k in range(1, int(duration // SAMPLE_EVERY_S) + 1):
                stop.wait(max(0.0, started + k * SAMPLE_EVERY_S - time.monotonic()))
                sampled = time.monotonic()
                s = sample(settings, engine, sampled - started, published)
                samples.append(s)
                rss = " ".join(f"{name} {_mb(size)}" for name, size in s.rss.items())
                print(f"t={s.t:5.0f} s published {s.published} stored {s.stored} dead {s.dead_lettered} "
                      f"lag {s.lag} (offsets {s.offset_lag}) rss {rss} (sampled in "
                      f"{time.monotonic() - sampled:.2f} s)", flush=True)
                for name in ("kafka", "http", "consumer"):
                    if s.rss[name] == 0:
                        raise RuntimeError(f"{name} is not running; see {settings.home_dir}/logs/{name}.log")
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=60)
            publisher.producer.flush()
        soak_s = time.monotonic() - started
        achieved = (publisher.acked - acked_before) / soak_s
        end = samples[-1]
        span = end.t - first.t
        ingested = (end.stored + end.dead_lettered - first.stored - first.dead_lettered) / span
        cores = {name: (end.cpu_s[name] - first.cpu_s[name]) / span for name in end.cpu_s}
        print(f"soak over: {publisher.sent - sent_before} proxy events sent ({achieved:,.0f}/s acknowledged), "
              f"{poster.ok} expert labels ({poster.failed} failed: {poster.statuses}); consumer stored "
              f"{ingested:,.0f}/s; CPU cores used: " + ", ".join(f"{k} {v:.2f}" for k, v in cores.items()), flush=True)

        drain_started = time.monotonic()
        while time.monotonic() - drain_started < DRAIN_TIMEOUT_S:
            last = sample(settings, engine, time.monotonic() - started, published)
            if last.lag <= 0:
                break
            time.sleep(1)
        drain_s = time.monotonic() - drain_started
        end_offsets = offset_lag(settings)
        stored, (dead, letters), total = stored_total(engine), dead_letters_on_topic(settings), published()
        print(f"drained in {drain_s:.1f} s: published {total}, stored {stored}, dead-lettered {dead} on the topic "
              f"({letters} letters; {dead_letters_in_store(engine)} in the store; {publisher.malformed_acked} "
              f"malformed sent), offset lag {end_offsets}", flush=True)

        warm = [s for s in samples if WARM_UP_FRACTION * duration <= s.t < 2 * WARM_UP_FRACTION * duration]
        tail = [s for s in samples if s.t >= (1 - WARM_UP_FRACTION) * duration]
        growth: dict[str, float] = {}
        for name in COMPONENTS:
            if not last.rss[name]:
                continue  # not started (the object store with --broker-storage memory)
            warm_rss = statistics.median(s.rss[name] for s in warm)
            end_rss = statistics.median(s.rss[name] for s in tail)
            growth[name] = (end_rss - warm_rss) / warm_rss
            print(f"rss {name}: {_mb(warm_rss)} after the warm-up → {_mb(end_rss)} at the end ({growth[name]:+.1%}); "
                  f"peak {_mb(max(s.rss[name] for s in samples))}, after the drain {_mb(last.rss[name])}", flush=True)
        offset_lags = [s.offset_lag for s in samples if s.offset_lag is not None]
        return {
            "published": total, "stored": stored, "dead_lettered": dead, "lost": total - stored - dead,
            "peak_lag": max(s.lag for s in samples), "end_lag": last.lag,
            "rss_growth": round(max(growth.values()), 4),
            "capacity_eps": round(capacity, 1), "soak_rate_eps": round(rate, 1),
            "achieved_rate_eps": round(achieved, 1), "soak_stored_eps": round(ingested, 1),
            "expert_labels": poster.ok, "webhook_failed": poster.failed,
            "webhook_p50_ms": round(1000 * statistics.median(poster.latencies_s), 1) if poster.latencies_s else None,
            "malformed_sent": publisher.malformed_acked, "publish_failed": publisher.failed,
            "peak_offset_lag": max(offset_lags, default=None), "end_offset_lag": end_offsets,
            "drain_s": round(drain_s, 1), "soak_s": round(soak_s, 1),
            "rss_growth_by_process": {k: round(v, 4) for k, v in growth.items()},
            "cpu_cores": {k: round(v, 2) for k, v in cores.items()},
            "store": "sqlite", "broker": f"tansu {settings.broker_storage}",
        }
    finally:
        publisher.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 minutes instead of 10, a 10 s burst instead of 20 s")
    parser.add_argument("--minutes", type=float, default=None, help="soak length (default 10, --quick 2)")
    parser.add_argument("--burst-s", type=float, default=None, help="seconds of sending in the capacity burst")
    parser.add_argument("--load", type=float, default=0.8, help="soak rate as a fraction of the burst capacity")
    parser.add_argument("--broker-storage", choices=["s3", "memory"], default="s3",
                        help="the embedded broker's log: in the SeaweedFS object store (default, durable) or memory")
    parser.add_argument("--keep-home", action="store_true", help="keep the stack's home (logs, store) afterwards")
    args = parser.parse_args()
    args.minutes = args.minutes or (2 if args.quick else 10)
    args.burst_s = args.burst_s or (10 if args.quick else 20)
    home = Path(tempfile.mkdtemp(prefix="proxyloop-soak-"))
    settings = testing.isolated_settings(home, broker_storage=args.broker_storage, retrain_min_expert=10**9,
                                       retrain_min_proxy=10**9)
    started: list[str] = []
    failed = True
    try:
        for name in COMPONENTS:
            component = stack.component(name)
            if not component.enabled(settings):
                continue
            if name == "http":
                ensure_topics(settings)
            stack.start_component(settings, component, lambda m: print(m, flush=True))
            started.append(name)
        result = soak(settings, args)
        failed = False
    finally:
        for name in reversed(started):
            stack.stop_component(settings, name)
        if failed or args.keep_home:
            print(f"stack home kept: {home}", flush=True)
        else:
            shutil.rmtree(home, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

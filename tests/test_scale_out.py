"""Scale-out by running more processes: two consumers share the partitions, two GPU workers the queue."""

import re
import subprocess
import sys
import time

import pytest
from sqlalchemy.orm import Session

from ground.schemas import FeatureTriple, ProxyPreference, TrainingRequest
from ingest.bus import ensure_topics, make_producer, publish
from ingest.store import count_labels, make_engine
from ingest.synthetic import appendix_d
from proxyloop import stack
from tests.conftest import export, stored_snapshot

pytestmark = pytest.mark.integration


def _spawn(settings, args, log_path):
    return subprocess.Popen([sys.executable, *args], env=stack.child_env(settings), stdout=open(log_path, "wb"),
                            stderr=subprocess.STDOUT)


def _stop(processes):
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def test_two_consumer_processes_share_partitions_and_lose_nothing(service_settings, kafka, tmp_path):
    settings = service_settings.model_copy(update={
        "store_url": f"sqlite:///{tmp_path}/store.db", "consumer_group": "scale-out",
        "topic_proxy": "proxy-scale-out", "topic_expert": "expert-scale-out",
        "retrain_min_expert": 10**6, "retrain_min_proxy": 10**6})
    ensure_topics(settings)
    consumers = [_spawn(settings, ["-m", "ingest.consumer"], tmp_path / f"consumer{i}.log") for i in range(2)]
    try:
        time.sleep(8)  # both join the group before data flows, so the partitions are split
        producer = make_producer(settings)
        for i in range(600):
            publish(producer, settings.topic_proxy, ProxyPreference(
                event_id=f"s{i}", proxy_name="judge", item=FeatureTriple(x=[float(i)], y_w=0, y_l=1)), wait=False)
        producer.flush()
        engine = make_engine(settings.resolved_store_url)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            with Session(engine) as session:
                if count_labels(session)["proxy"] >= 600:
                    break
            time.sleep(0.5)
    finally:
        _stop(consumers)
    with Session(make_engine(settings.resolved_store_url)) as session:
        assert count_labels(session) == {"expert": 0, "proxy": 600}
    stored_by = [sum(int(n) for n in re.findall(r"stored (\d+)", (tmp_path / f"consumer{i}.log").read_text()))
                 for i in range(2)]
    assert sum(stored_by) == 600 and all(n > 0 for n in stored_by), stored_by


def test_two_gpu_worker_processes_share_training_runs(service_settings, redis, tmp_path, monkeypatch):
    settings = service_settings.model_copy(update={"store_url": f"sqlite:///{tmp_path}/store.db"})
    export(settings, monkeypatch)
    snapshot_id = stored_snapshot(settings, appendix_d(n_proxy=1500, n_expert=30, seed=5))
    workers = [_spawn(settings, ["-m", "celery", "-A", "workers.app", "worker", "-Q", "gpu", "-c", "1", "-n",
                                 f"gpu{i}-{tmp_path.name}@%h"], tmp_path / f"worker{i}.log") for i in range(2)]
    from workers.app import make_app

    app = make_app()
    try:
        deadline = time.monotonic() + 120
        while len(app.control.ping(timeout=1)) < 2 and time.monotonic() < deadline:
            pass
        requests = [TrainingRequest(run_id=f"scale-{i}", snapshot_id=snapshot_id,
                                    store_url=settings.resolved_store_url, plan="two_stage",
                                    output_dir=str(tmp_path / f"run-{i}"), seed=i, stage1_epochs=40,
                                    stage2_epochs=20, checkpoint_every=10) for i in range(4)]
        sent = [app.send_task("proxyloop.train", args=[r.model_dump(mode="json")], queue="gpu", task_id=r.run_id)
                for r in requests]
        results = [s.get(timeout=300) for s in sent]
    finally:
        _stop(workers)
    assert [r["run_id"] for r in results] == [f"scale-{i}" for i in range(4)]
    assert len({r["worker"] for r in results}) == 2  # prefetch 1 + late acks: both workers got runs

"""The whole stack as separate processes: broker, Redis, Prefect, worker, HTTP app, consumer, flows."""

import json
import subprocess
import sys

import httpx
import pytest
from sqlalchemy.orm import Session

from ingest.store import SnapshotRow, count_labels, load_snapshot_triples, make_engine
from policies.registry import resolve
from proxyloop import stack
from tests.conftest import isolated_settings

pytestmark = pytest.mark.e2e


def _cli(settings, *args, timeout=600):
    return subprocess.run([sys.executable, "-m", "proxyloop.cli", *args], env=stack.child_env(settings),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    home = tmp_path_factory.mktemp("e2e")
    settings = isolated_settings(home)
    report_path = home / "report.json"
    try:
        demo = _cli(settings, "demo", "--report", str(report_path), "--keep-up")
        status = _cli(settings, "status", timeout=60)
        artifacts = httpx.post(f"{settings.prefect_api_url}/artifacts/filter", json={"limit": 100}, timeout=30).json()
    finally:
        down = _cli(settings, "down", timeout=120)
    assert demo.returncode == 0, demo.stdout[-4000:] + demo.stderr[-4000:]
    return settings, json.loads(report_path.read_text()), status, down, artifacts


def test_every_published_event_is_stored_and_bad_ones_dead_lettered(demo_run):
    settings, report, *_ = demo_run
    events = report["events"]
    assert events["stored"] == events["proxy_published"] + events["expert_published"] == 3060
    assert events["dead_lettered"] == events["malformed_published"] == 3
    with Session(make_engine(settings.resolved_store_url)) as session:
        assert count_labels(session) == {"expert": 60, "proxy": 3000}


def test_the_event_triggered_flow_trains_on_the_gpu_queue_and_releases(demo_run):
    settings, report, *_ = demo_run
    assert report["conditions"]["plan"] in ("two_stage", "proxy_as_is", "fine_tune", "expert_only")
    assert {c["name"] for c in report["conditions"]["checks"]} >= {"shared_level_sets", "image_containment"}
    assert report["training"]["queue"] == "gpu" and report["training"]["device"] == "cpu"
    assert report["training"]["worker"].startswith("gpu@")
    assert report["training"]["task_id"] == report["flow"]["run_id"]
    assert report["gate"]["decision"] in ("release", "pick_checkpoint") and report["gate"]["reasons"]
    release = report["release"]
    assert release["alias"] == "production" and release["event_seen"] is True
    version = resolve(settings.registry_dir, f"{release['policy']}@production")
    assert version.version == release["version"]
    assert version.lineage["snapshot"]["snapshot_id"] == report["snapshot"]["snapshot_id"]
    with Session(make_engine(settings.resolved_store_url)) as session:  # lineage → the exact stored labels
        snapshot = session.get(SnapshotRow, version.lineage["snapshot"]["snapshot_id"])
        cited = load_snapshot_triples(session, snapshot.snapshot_id)
    assert (len(cited["expert"]), len(cited["proxy"])) == (snapshot.n_expert, snapshot.n_proxy)
    assert snapshot.n_expert >= settings.retrain_min_expert and len(snapshot.event_ids) == snapshot.n_expert + 3000
    assert set(report["timings_s"]) >= {"stack_up", "publish_proxy", "post_expert", "ingest", "retrain", "serving"}


def test_serving_answers_with_the_released_version(demo_run):
    _, report, *_ = demo_run
    serving = report["serving"]
    assert serving["status"] == 200
    assert serving["version"] == report["release"]["version"]
    assert abs(sum(serving["probs"]) - 1) < 1e-5


def test_status_reports_health_and_counts_and_down_stops_everything(demo_run):
    settings, _, status, down, _ = demo_run
    assert status.returncode == 0, status.stdout
    assert status.stdout.count("healthy") == 7 and "proxy 3000" in status.stdout
    assert "consumer lag: 0" in status.stdout and "dead-lettered: 3" in status.stdout
    assert "kafka: stopped" in down.stdout
    assert not any(state.startswith("healthy") for state in stack.health(settings).values())


def test_the_flow_run_carries_the_operator_artifacts(demo_run):
    _, report, _, _, artifacts = demo_run
    by_key = {a["key"]: a for a in artifacts if a.get("key")}
    assert {"condition-checks", "condition-report", "checkpoint-evaluations", "gate-decision", "release"} <= set(by_key)
    checks = json.loads(by_key["condition-checks"]["data"]) if isinstance(by_key["condition-checks"]["data"], str) \
        else by_key["condition-checks"]["data"]
    assert {row["check"] for row in checks} == {c["name"] for c in report["conditions"]["checks"]}
    assert report["gate"]["decision"] in by_key["gate-decision"]["data"]
    assert all(a["flow_run_id"] for a in by_key.values())

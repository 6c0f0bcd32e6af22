"""The whole stack as separate processes: broker, Redis, Prefect, worker, HTTP app, consumer, flows."""

import json
import time

import httpx
import pytest
from sqlalchemy.orm import Session

from ground.schemas import ExpertLabel
from ingest.bus import make_producer, publish
from ingest.store import SnapshotRow, count_labels, load_snapshot_triples, make_engine
from ingest.synthetic import appendix_d
from policies.registry import resolve
from proxyloop import stack
from tests.conftest import isolated_settings, launch_chromium, run_cli, run_demo, stack_env, wait_until

pytestmark = pytest.mark.e2e

_ENDED = ("COMPLETED", "FAILED", "CRASHED")


def _bursts_during_a_run(settings, bursts=2):
    """Publish two threshold-crossing bursts back to back; return the retrain flow runs they caused."""
    before = {r["id"] for r in _retrain_runs(settings)}
    producer = make_producer(settings)
    task = appendix_d(n_proxy=0, n_expert=settings.retrain_min_expert * bursts, seed=9)
    for b in range(bursts):
        for i, triple in enumerate(task.expert[b * settings.retrain_min_expert:(b + 1) * settings.retrain_min_expert]):
            publish(producer, settings.topic_expert, ExpertLabel(event_id=f"burst-{b}-{i}", annotator_id="t",
                                                                 item=triple), wait=False)
        producer.flush()
        if b < bursts - 1:  # the next burst lands once this one's run is under way (polled: no fixed sleep)
            wait_until(lambda: any(r["state_type"] in ("RUNNING", *_ENDED) for r in _retrain_runs(settings)
                                   if r["id"] not in before), 120, "the first burst's retrain run to start")
    producer.close()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        runs = [r for r in _retrain_runs(settings) if r["id"] not in before]
        if len(runs) == bursts and all(r["state_type"] in _ENDED for r in runs):
            return runs
        time.sleep(0.5)
    raise AssertionError(f"retrain runs after the bursts: {[(r['name'], r['state_type']) for r in runs]}")


def _operator_view(settings, report_path, screenshot):
    """Open the finished retrain run's Artifacts tab in the Prefect UI, in headless Chromium."""
    from playwright.sync_api import sync_playwright

    run_id = json.loads(report_path.read_text())["flow"]["run_id"]
    ui = settings.prefect_api_url.removesuffix("/api")
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(f"{ui}/runs/flow-run/{run_id}", wait_until="networkidle", timeout=60_000)
            page.get_by_text("Artifacts", exact=True).first.click()
            page.get_by_text("gate-decision", exact=True).first.wait_for(timeout=30_000)
            page.screenshot(path=str(screenshot))
            return page.inner_text("body")
        finally:
            browser.close()


def _retrain_runs(settings):
    body = {"flows": {"name": {"any_": ["retrain"]}}, "sort": "START_TIME_ASC", "limit": 50}
    return httpx.post(f"{settings.prefect_api_url}/flow_runs/filter", json=body, timeout=30).json()


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    home = tmp_path_factory.mktemp("e2e")
    settings = isolated_settings(home)
    report_path = home / "report.json"
    # The second burst's run waits on the retrain deployment's concurrency limit; Prefect's server tries it again
    # this many seconds after each refusal. Its default, 30 s, mostly idles on after the first run has ended.
    slot_wait = {"PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "2"}
    try:
        with stack_env(**slot_wait):
            run_demo(settings, report_path)
        with Session(make_engine(settings.resolved_store_url)) as session:
            counts = count_labels(session)
        status = run_cli(settings, "status", timeout=60)
        artifacts = httpx.post(f"{settings.prefect_api_url}/artifacts/filter", json={"limit": 100}, timeout=30).json()
        ui_text = _operator_view(settings, report_path, home / "ui.png")
        burst_runs = _bursts_during_a_run(settings)
    finally:
        down = run_cli(settings, "down", timeout=120)
    return {"settings": settings, "report": json.loads(report_path.read_text()), "status": status, "down": down,
            "artifacts": artifacts, "counts": counts, "burst_runs": burst_runs, "ui_text": ui_text,
            "ui_png": home / "ui.png"}


def test_every_published_event_is_stored_and_bad_ones_dead_lettered(demo_run):
    events = demo_run["report"]["events"]
    assert events["stored"] == events["proxy_published"] + events["expert_published"] == 3060
    assert events["dead_lettered"] == events["malformed_published"] == 3
    assert demo_run["counts"] == {"expert": 60, "proxy": 3000}


def test_the_event_triggered_flow_trains_on_the_gpu_queue_and_releases(demo_run):
    settings, report = demo_run["settings"], demo_run["report"]
    assert report["conditions"]["plan"] in ("two_stage", "proxy_as_is", "fine_tune", "expert_only")
    assert {c["name"] for c in report["conditions"]["checks"]} >= {"shared_level_sets", "image_containment"}
    assert report["training"]["queue"] == "gpu" and report["training"]["device"] == "cpu"
    assert report["training"]["worker"].startswith("gpu@")
    assert report["training"]["task_id"] == report["flow"]["run_id"]
    assert report["gate"]["decision"] in ("release", "pick_checkpoint") and report["gate"]["reasons"]
    release = report["release"]
    assert release["alias"] == "production" and release["event_seen"] is True
    version = resolve(settings.registry_dir, f"{release['policy']}@{release['version']}")
    assert version.version == release["version"]
    assert version.lineage["snapshot"]["snapshot_id"] == report["snapshot"]["snapshot_id"]
    with Session(make_engine(settings.resolved_store_url)) as session:  # lineage → the exact stored labels
        snapshot = session.get(SnapshotRow, version.lineage["snapshot"]["snapshot_id"])
        cited = load_snapshot_triples(session, snapshot.snapshot_id)
    assert (len(cited["expert"]), len(cited["proxy"])) == (snapshot.n_expert, snapshot.n_proxy)
    assert snapshot.n_expert >= settings.retrain_min_expert and len(snapshot.event_ids) == snapshot.n_expert + 3000
    assert set(report["timings_s"]) >= {"stack_up", "publish_proxy", "post_expert", "ingest", "retrain", "serving"}


def test_serving_answers_with_the_released_version(demo_run):
    report = demo_run["report"]
    serving = report["serving"]
    assert serving["status"] == 200
    assert serving["version"] == report["release"]["version"]
    assert abs(sum(serving["probs"]) - 1) < 1e-5


def test_status_reports_health_and_counts_and_down_stops_everything(demo_run):
    settings, status, down = demo_run["settings"], demo_run["status"], demo_run["down"]
    assert status.returncode == 0, status.stdout
    always_on = [c for c in stack.COMPONENTS if not c.optional]  # Label Studio is off on embedded defaults
    assert status.stdout.count("healthy") == len(always_on) == 8 and "proxy 3000" in status.stdout
    assert "labelstudio" not in status.stdout
    assert "consumer lag: 0" in status.stdout and "dead-lettered: 3" in status.stdout, status.stdout
    assert "kafka: stopped" in down.stdout and "objectstore: stopped" in down.stdout
    assert not any(state.startswith("healthy") for state in stack.health(settings).values())


def test_the_flow_run_carries_the_operator_artifacts(demo_run):
    report, artifacts = demo_run["report"], demo_run["artifacts"]
    by_key = {a["key"]: a for a in artifacts if a.get("key")}
    assert {"condition-checks", "condition-report", "checkpoint-evaluations", "gate-decision", "release"} <= set(by_key)
    checks = json.loads(by_key["condition-checks"]["data"]) if isinstance(by_key["condition-checks"]["data"], str) \
        else by_key["condition-checks"]["data"]
    assert {row["check"] for row in checks} == {c["name"] for c in report["conditions"]["checks"]}
    assert report["gate"]["decision"] in by_key["gate-decision"]["data"]
    assert all(a["flow_run_id"] for a in by_key.values())


def test_bursts_during_a_run_trigger_retrains_that_never_overlap(demo_run):
    runs = demo_run["burst_runs"]
    assert len(runs) == 2 and all(r["state_type"] == "COMPLETED" for r in runs)
    first, second = sorted(runs, key=lambda r: r["start_time"])
    assert first["end_time"] <= second["start_time"]  # concurrency limit 1: the second waited


def test_an_operator_sees_the_run_artifacts_in_the_prefect_ui(demo_run):
    text = demo_run["ui_text"]
    for key in ("condition-checks", "condition-report", "checkpoint-evaluations", "gate-decision", "release"):
        assert key in text
    assert demo_run["ui_png"].stat().st_size > 10_000

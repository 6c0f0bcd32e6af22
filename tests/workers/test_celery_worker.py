"""A real Celery worker process on the `gpu` queue, against a real Redis broker."""


import pytest

from ground.schemas import Evaluation, EvaluationRequest, TrainingRequest
from ingest.synthetic import appendix_d
from tests.conftest import celery_worker, export, stored_snapshot

pytestmark = pytest.mark.integration


@pytest.fixture
def worker(service_settings, redis, tmp_path, monkeypatch):
    settings = service_settings.model_copy(update={"store_url": f"sqlite:///{tmp_path}/store.db"})
    export(settings, monkeypatch)
    with celery_worker(settings, "gpu,cpu", f"gpu-test-{tmp_path.name}", tmp_path / "worker.log") as app:
        yield settings, app


def test_training_task_runs_on_the_gpu_queue_in_a_worker_process(worker, tmp_path):
    settings, app = worker
    task = appendix_d(n_proxy=300, n_expert=24, seed=4)
    snapshot_id = stored_snapshot(settings, task)
    request = TrainingRequest(run_id="run-1", snapshot_id=snapshot_id, store_url=settings.resolved_store_url,
                              plan="two_stage", output_dir=str(tmp_path / "run-1"), stage1_epochs=30,
                              stage2_epochs=20, checkpoint_every=10)
    sent = app.send_task("proxyloop.train", args=[request.model_dump(mode="json")], queue="gpu", task_id="run-1")
    result = sent.get(timeout=120)
    assert result["device"] == "cpu"
    assert result["worker"].startswith("gpu-test-")
    assert [c["step"] for c in result["checkpoints"]] == [0, 10, 20]
    assert sent.info["run_id"] == "run-1"

    again = app.send_task("proxyloop.train", args=[request.model_dump(mode="json")], queue="gpu").get(timeout=60)
    assert again == result  # idempotent by run id: the finished run is not retrained

    request = EvaluationRequest(checkpoints=result["checkpoints"], store_url=settings.resolved_store_url,
                                snapshot_id=snapshot_id, seed=0)
    evaluation = Evaluation.model_validate(app.send_task("proxyloop.evaluate", queue="cpu", args=[
        request.model_dump(mode="json")]).get(timeout=120))
    assert [e.step for e in evaluation.evaluations] == [0, 10, 20]
    assert (evaluation.n_heldout, evaluation.language_model) == (8, False)  # every third of 24 expert triples
    assert evaluation.baseline_accuracy * 8 == round(evaluation.baseline_accuracy * 8)  # a share of the 8


def test_a_failing_task_reports_the_workers_error(worker):
    _, app = worker
    bad = TrainingRequest(run_id="run-missing", snapshot_id="nope", store_url=worker[0].resolved_store_url,
                          plan="two_stage", output_dir="/tmp/proxyloop-none")
    sent = app.send_task("proxyloop.train", args=[bad.model_dump(mode="json")], queue="gpu")
    with pytest.raises(Exception, match="snapshot 'nope' not in the store") as raised:
        sent.get(timeout=60)
    assert type(raised.value).__name__ == "SnapshotNotFound"  # the worker's own exception, not a transport error

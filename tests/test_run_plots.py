"""The HTTP app serves a run's plots to the links Prefect's UI shows, and nothing else of the run's folder: a static
mount of the whole runs directory served its training data and checkpoints to anyone with the URL, no key."""

from __future__ import annotations

from fastapi.testclient import TestClient

from proxyloop.http import create_app
from proxyloop.testing import isolated_settings

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16


def test_a_runs_plot_is_served_and_its_data_and_checkpoints_are_not(tmp_path):
    settings = isolated_settings(tmp_path, api_keys="k")
    run = settings.runs_dir / "run-1"
    (run / "data").mkdir(parents=True)
    (run / "training.png").write_bytes(PNG)
    (run / "data" / "expert.jsonl").write_text('{"prompt": "secret"}\n')
    (run / "conditions.json").write_text("{}")
    (run / "lm" / "checkpoint-000002").mkdir(parents=True)
    (run / "lm" / "checkpoint-000002" / "model.safetensors").write_bytes(b"weights")
    http = TestClient(create_app(settings))
    plot = http.get("/runs/run-1/training.png")
    assert plot.status_code == 200 and plot.content == PNG and plot.headers["content-type"] == "image/png"
    for path in ("/runs/run-1/data/expert.jsonl", "/runs/run-1/conditions.json",
                 "/runs/run-1/lm/checkpoint-000002/model.safetensors", "/runs/run-1/missing.png",
                 "/runs/..%2Frun-1/training.png", "/runs/run-1/..%2Fx.png", "/runs/run-1/"):
        assert http.get(path).status_code == 404, path

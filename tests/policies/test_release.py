"""Release → `policy.released` on Kafka → a consuming service sees the new version; rollback too."""

import json

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save_file

from ingest.bus import ensure_topics, read_topic
from policies.features.model import TwoStageConfig, TwoStagePolicy
from policies.promotion import move_alias, release_checkpoint
from proxyloop.http import create_app

pytestmark = pytest.mark.integration


def _checkpoint(path, seed):
    torch.manual_seed(seed)
    config = TwoStageConfig()
    path.mkdir(parents=True)
    save_file(TwoStagePolicy(config).state_dict(), str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"family": "two_stage", "model": config.to_dict()}))
    return path


def _released_events(settings):
    values = read_topic(settings, settings.topic_policy_released, stop_when=lambda v: len(v) >= 3)
    events = [json.loads(v) for v in values]
    return sorted(events, key=lambda e: e["occurred_at"])


def test_release_and_rollback_reach_a_consuming_service_without_restart(service_settings, kafka, tmp_path):
    settings = service_settings.model_copy(update={
        "registry_url": str(tmp_path / "registry"), "topic_policy_released": "released-test", "api_keys": "k"})
    ensure_topics(settings)
    http = TestClient(create_app(settings))

    def served_version():
        response = http.post(f"/v1/policies/{settings.policy_name}/predict", json={"x": [0.2] * 5},
                             headers={"Authorization": "Bearer k"})
        return response.json()["version"]

    first = release_checkpoint(settings, _checkpoint(tmp_path / "c1", 1), {"snapshot": "s1"})
    assert served_version() == 1
    second = release_checkpoint(settings, _checkpoint(tmp_path / "c2", 2), {"snapshot": "s2"})
    assert served_version() == 2
    move_alias(settings, first.version)
    assert served_version() == 1

    events = _released_events(settings)
    assert [(e["version"], e["alias"]) for e in events] == [(1, "production"), (2, "production"), (1, "production")]
    assert events[1]["uri"] == second.path

"""The registry mirrored to an fsspec URL: a service on another machine (another local dir) serves releases."""

import uuid

import torch
from fastapi.testclient import TestClient

from policies.features.model import TwoStageConfig, TwoStagePolicy
from policies.registry import register, resolve, set_alias, versions
from policies.registry_remote import pull, push
from proxyloop.http import create_app
from proxyloop.testing import isolated_settings


def _release(root, seed, alias="production"):
    torch.manual_seed(seed)
    config = TwoStageConfig()
    return register(root, "demo", TwoStagePolicy(config).state_dict(),
                    {"family": "two_stage", "model": config.to_dict()}, {"seed": seed}, alias=alias)


def test_push_then_pull_reproduces_versions_lineage_and_aliases(tmp_path):
    url = f"memory://registry-{uuid.uuid4().hex}"
    publisher, reader = tmp_path / "a", tmp_path / "b"
    _release(publisher, 0)
    _release(publisher, 1)
    push(publisher, url, "demo")
    pull(reader, url, "demo")
    assert versions(reader, "demo") == [1, 2]
    assert resolve(reader, "demo@production").version == 2
    assert resolve(reader, "demo@1").lineage["seed"] == 0
    assert (reader / "demo" / "1" / "model.safetensors").read_bytes() == \
        (publisher / "demo" / "1" / "model.safetensors").read_bytes()

    set_alias(publisher, "demo", "production", 1)  # rollback travels too
    push(publisher, url, "demo")
    pull(reader, url, "demo")
    assert resolve(reader, "demo@production").version == 1


def test_a_server_with_an_empty_local_registry_serves_what_was_pushed(tmp_path):
    url = f"memory://registry-{uuid.uuid4().hex}"
    _release(tmp_path / "publisher", 3)
    push(tmp_path / "publisher", url, "demo")
    settings = isolated_settings(tmp_path / "server", api_keys="k", registry_url=str(tmp_path / "server-registry"),
                                 registry_remote_url=url, registry_remote_poll_s=0)
    http = TestClient(create_app(settings))
    # The model check clients make first (LiteLLM, LangChain) pulls too: it was a 404 until a request had pulled.
    card = http.get("/v1/models/demo@production", headers={"Authorization": "Bearer k"})
    assert card.status_code == 200 and card.json()["version"] == 1
    response = http.post("/v1/policies/demo/predict", json={"x": [0.0] * 5}, headers={"Authorization": "Bearer k"})
    assert response.status_code == 200 and response.json()["version"] == 1


def test_concurrent_first_pulls_of_a_version_all_succeed_and_leave_no_staging(tmp_path, monkeypatch):
    """Several requests arriving before a release was pulled each pull it; a slow download (an object store)
    made them collide in one staging folder (500s, a stray `.pull-1`)."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    import fsspec.implementations.memory as memory

    url = f"memory://registry-{uuid.uuid4().hex}"
    _release(tmp_path / "publisher", 0)
    _release(tmp_path / "publisher", 1)
    push(tmp_path / "publisher", url, "demo")
    slow_get = memory.MemoryFileSystem.get

    def get(self, *args, **kwargs):
        time.sleep(0.3)
        return slow_get(self, *args, **kwargs)

    monkeypatch.setattr(memory.MemoryFileSystem, "get", get)
    reader, start = tmp_path / "reader", threading.Barrier(5)

    def first_pull(_):
        start.wait()
        pull(reader, url, "demo")
        return resolve(reader, "demo@production").version

    with ThreadPoolExecutor(5) as pool:
        assert list(pool.map(first_pull, range(5))) == [2] * 5
    assert sorted(p.name for p in (reader / "demo").iterdir()) == ["1", "2", "aliases.json"]


def test_names_not_released_here_share_one_pull_budget_and_the_cache_stays_bounded(tmp_path, monkeypatch):
    """300 requests for nosuch0..nosuch299 made 300 remote listings, and 300 entries that stayed for good."""
    from policies import registry_remote

    url = f"memory://registry-{uuid.uuid4().hex}"
    _release(tmp_path / "publisher", 0)
    push(tmp_path / "publisher", url, "demo")
    settings = isolated_settings(tmp_path / "server", registry_url=str(tmp_path / "server-registry"),
                                 registry_remote_url=url, registry_remote_poll_s=60)
    pulled: list[str] = []
    real = registry_remote.pull
    monkeypatch.setattr(registry_remote, "_last_pull", {})
    monkeypatch.setattr(registry_remote, "pull", lambda root, remote, name: (pulled.append(name),
                                                                            real(root, remote, name)))
    for i in range(300):
        registry_remote.refresh(settings, f"nosuch{i}@production")
    registry_remote.refresh(settings, "../etc")
    assert pulled == ["nosuch0"] and len(registry_remote._last_pull) == 1
    monkeypatch.setattr(registry_remote, "_last_pull", {})
    registry_remote.refresh(settings, "demo")  # a new release is still found at its first request
    registry_remote.refresh(settings, "demo@production")
    assert pulled[1:] == ["demo"] and versions(settings.registry_dir, "demo") == [1]

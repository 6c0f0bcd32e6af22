import json

import pytest
import torch
from fastapi.testclient import TestClient

from ingest.labelstudio import SECRET_HEADER, webhook_payload
from policies.features.model import TwoStageConfig, TwoStagePolicy
from policies.registry import register, set_alias
from proxyloop.http import create_app
from tests.conftest import isolated_settings

AUTH = {"Authorization": "Bearer k1"}


def _release(root, seed):
    torch.manual_seed(seed)
    config = TwoStageConfig()
    model = TwoStagePolicy(config)
    return register(root, "demo", model.state_dict(), {"family": "two_stage", "model": config.to_dict()}, {})


@pytest.fixture
def client(tmp_path):
    settings = isolated_settings(tmp_path, api_keys="k1,k2", registry_url=str(tmp_path / "reg"))
    return TestClient(create_app(settings)), settings


def test_requests_without_a_valid_key_get_401(client):
    http, _ = client
    assert http.get("/v1/models").status_code == 401
    assert http.get("/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401


def test_predict_serves_the_production_alias_and_follows_it(client):
    http, settings = client
    _release(settings.registry_dir, 0)
    _release(settings.registry_dir, 1)
    first = http.post("/v1/policies/demo/predict", json={"x": [0.1] * 5}, headers=AUTH)
    assert first.status_code == 200
    assert first.json()["version"] == 2 and abs(sum(first.json()["probs"]) - 1) < 1e-5
    set_alias(settings.registry_dir, "demo", "production", 1)
    rolled_back = http.post("/v1/policies/demo@production/predict", json={"x": [0.1] * 5}, headers=AUTH)
    assert rolled_back.json()["version"] == 1
    assert rolled_back.json()["probs"] != first.json()["probs"]
    models = http.get("/v1/models", headers=AUTH).json()["data"]
    assert [(m["id"], m["version"]) for m in models] == [("demo@production", 1)]


def test_unknown_policy_is_404_and_wrong_input_422(client):
    http, settings = client
    assert http.post("/v1/policies/none/predict", json={"x": [0.1] * 5}, headers=AUTH).status_code == 404
    _release(settings.registry_dir, 0)
    bad = http.post("/v1/policies/demo/predict", json={"x": [0.1] * 3}, headers=AUTH)
    assert bad.status_code == 422 and "expects 5" in bad.json()["detail"]


def test_predict_refuses_inputs_and_refs_it_cannot_serve_with_4xx(client, tmp_path):
    """Found by a client audit: each of these was a 500 (or a 200 with null probabilities)."""
    http, settings = client
    _release(settings.registry_dir, 0)
    nan = http.post("/v1/policies/demo/predict", content=b'{"x": [NaN, 0, 0, 0, 0]}',
                    headers={**AUTH, "content-type": "application/json"})
    assert nan.status_code == 422 and "finite" in nan.text
    # Finite in JSON, inf in float32: the probabilities came back null with a 200.
    huge = http.post("/v1/policies/demo/predict", json={"x": [1e39, -1e39, 0, 0, 0]}, headers=AUTH)
    assert huge.status_code == 422 and huge.json()["error"]["param"] == "x.0" and "less than or equal" in huge.text
    for tag in ("%C2%B2", "1" * 5000):  # "²" is str.isdigit() but not int(); a number past int()'s digit limit
        odd = http.post(f"/v1/policies/demo@{tag}/predict", json={"x": [0.1] * 5}, headers=AUTH)
        assert odd.status_code == 404 and "demo has no" in odd.json()["detail"]
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "config.json").write_text("{}")
    register(settings.registry_dir, "chat", None, {"family": "causal_lm"}, {}, directories={"model": tmp_path / "lm"})
    chat = http.post("/v1/policies/chat/predict", json={"x": [0.1] * 5}, headers=AUTH)
    assert chat.status_code == 400 and "/v1/chat/completions" in chat.json()["detail"]


@pytest.mark.integration
def test_webhook_is_acknowledged_only_with_the_secret_and_lands_in_kafka(service_settings, kafka):
    settings = service_settings.model_copy(update={"topic_expert": "expert-webhook-test"})
    from ingest.bus import ensure_topics, read_topic

    ensure_topics(settings)
    payload = webhook_payload(1, 99, {"x": [0.0] * 5, "y_a": 0, "y_b": 1}, "right")
    with TestClient(create_app(settings)) as http:
        assert http.post("/webhooks/labelstudio", json=payload).status_code == 401
        assert http.post("/webhooks/labelstudio", json={"action": "ANNOTATION_CREATED"},
                         headers={SECRET_HEADER: settings.webhook_secret}).status_code == 422
        ok = http.post("/webhooks/labelstudio", json=payload, headers={SECRET_HEADER: settings.webhook_secret})
    assert ok.status_code == 200 and ok.json()["event_id"] == "labelstudio-annotation-99"
    values = [json.loads(v) for v in read_topic(settings, settings.topic_expert, stop_when=bool)]
    assert [(v["event_id"], v["item"]["y_w"]) for v in values] == [("labelstudio-annotation-99", 1)]


def test_models_leave_out_an_alias_whose_version_is_gone_and_a_policy_whose_aliases_are_damaged(client):
    """Found by a release audit: both were a 500 for the whole listing."""
    import shutil

    http, settings = client
    root = settings.registry_dir
    _release(root, 0), _release(root, 1)
    set_alias(root, "demo", "staging", 1)
    register(root, "other", {"w": torch.ones(1)}, {"family": "direct"}, {})
    shutil.rmtree(root / "demo" / "2")  # production pointed here
    listed = http.get("/v1/models", headers=AUTH)
    assert listed.status_code == 200
    assert [(m["id"], m["version"]) for m in listed.json()["data"]] == [("demo@staging", 1), ("other@production", 1)]
    gone = http.post("/v1/policies/demo/predict", json={"x": [0.1] * 5}, headers=AUTH)
    # The operator's to mend, not a name nobody released: 503, where an unknown name is 404.
    assert gone.status_code == 503 and "points at version 2, whose folder" in gone.json()["detail"]
    (root / "demo" / "aliases.json").write_text("{not json")
    listed = http.get("/v1/models", headers=AUTH)
    assert listed.status_code == 200 and [m["id"] for m in listed.json()["data"]] == ["other@production"]
    damaged = http.post("/v1/policies/demo/predict", json={"x": [0.1] * 5}, headers=AUTH)
    assert damaged.status_code == 503 and "aliases.json cannot be read as JSON" in damaged.json()["detail"]


@pytest.mark.parametrize(("damage", "write"), [
    ("weights deleted", lambda v: (v / "model.safetensors").unlink()),
    ("weights garbage", lambda v: (v / "model.safetensors").write_bytes(b"garbage")),
    ("config not JSON", lambda v: (v / "config.json").write_text("{not json")),
    ("config of unknown keys", lambda v: (v / "config.json").write_text(
        json.dumps({"family": "two_stage", "model": {"bogus": 1}}))),
    ("config without the model", lambda v: (v / "config.json").write_text(json.dumps({"family": "two_stage"}))),
    ("config a list", lambda v: (v / "config.json").write_text("[1]")),
])
def test_a_released_version_damaged_by_hand_is_a_503_naming_it(client, damage, write, monkeypatch):
    """Each of these was a 500 of its own (the HTTP audit); a missing folder or lineage was already a 503."""
    from policies import serve

    monkeypatch.setattr(serve, "_cache", {})  # other tests' demo v1, loaded before its damage, would serve
    http, settings = client
    version = _release(settings.registry_dir, 0)
    write(settings.registry_dir / "demo" / str(version.version))
    reply = http.post("/v1/policies/demo/predict", json={"x": [0.1] * 5}, headers=AUTH)
    assert reply.status_code == 503, (damage, reply.text)
    assert "demo v1" in reply.json()["detail"] and "cannot be loaded" in reply.json()["detail"]


PREDICT, CHAT, CARD = ("post", "/v1/policies/demo/predict", {"x": [0.1] * 5}), ("post", "/v1/chat/completions", {
    "model": "demo", "messages": [{"role": "user", "content": "hi"}]}), ("get", "/v1/models/demo", None)


@pytest.mark.parametrize(("damage", "routes", "said"), [pytest.param(*case, id=case[0]) for case in [
    ("version folder deleted", (PREDICT, CHAT, CARD), "demo@production points at version 2, whose folder "
                                                      "<registry>/demo/2 is missing"),
    ("aliases damaged", (PREDICT, CHAT, CARD), "<registry>/demo/aliases.json cannot be read as JSON"),
    ("lineage deleted", (PREDICT, CHAT), "demo@2: cannot read <registry>/demo/2/lineage.json"),
    ("weights deleted", (PREDICT,), "demo v2 at <registry>/demo/2 cannot be loaded (FileNotFoundError"),
]])
def test_a_503_names_the_version_and_what_is_wrong_but_not_the_servers_paths(
    client, tmp_path, damage, routes, said, monkeypatch, caplog,
):
    """The answers said where the server keeps its registry ("/home/<user>/.proxyloop/registry/demo/2/..."): a client
    hears which version is broken and how, the server's log has the paths (the fixture's home and registry are both
    under tmp_path)."""
    import shutil

    from policies import openai_api, serve

    monkeypatch.setattr(serve, "_cache", {}), monkeypatch.setattr(openai_api, "_cache", {})
    http, settings = client
    root = settings.registry_dir
    _release(root, 0), _release(root, 1)
    {"version folder deleted": lambda: shutil.rmtree(root / "demo" / "2"),
     "aliases damaged": lambda: (root / "demo" / "aliases.json").write_text("{not json"),
     "lineage deleted": lambda: (root / "demo" / "2" / "lineage.json").unlink(),
     "weights deleted": lambda: (root / "demo" / "2" / "model.safetensors").unlink()}[damage]()
    for method, route, body in routes:
        caplog.clear()
        reply = http.request(method, route, json=body, headers=AUTH)
        assert reply.status_code == 503, (route, reply.text)
        assert said in reply.json()["detail"] and said in reply.json()["error"]["message"], (route, reply.text)
        assert all(path not in reply.text for path in (str(tmp_path), str(root.resolve()))), (route, reply.text)
        assert str(root / "demo") in caplog.text, route  # the operator still reads where


def test_paths_elsewhere_on_the_host_are_hidden_but_routes_and_urls_kept(client, tmp_path):
    """A LoRA release's missing base is named by its path, which may be outside home and the registry."""
    from policies.http_errors import without_server_paths

    _, settings = client
    message = (f"{settings.registry_dir}/chat/3/model is a LoRA adapter on the base {tmp_path.parent}/bases/qwen, "
               "which is not there; use /v1/policies/{name}/predict, or pull s3://bucket/registry/chat")
    assert without_server_paths(message, settings) == (
        "<registry>/chat/3/model is a LoRA adapter on the base <server path>, which is not there; use "
        "/v1/policies/{name}/predict, or pull s3://bucket/registry/chat")


def test_hiding_paths_reads_no_disk_so_a_client_cannot_probe_it_or_crash_it(client):
    """It once looked each path up on this host: a 300-byte folder name raised OSError (a 500 for a 404), and a
    client's "/work" came back hidden where "/nosuchdir" did not, which told it what the server's disk holds."""
    from policies.http_errors import without_server_paths

    _, settings = client
    assert without_server_paths("invalid policy name 'x /work'", settings) == "invalid policy name 'x <server path>'"
    assert without_server_paths("invalid policy name 'x /nosuchdir'", settings) == \
        "invalid policy name 'x <server path>'"
    long = "x /" + "é" * 130
    assert without_server_paths(long, settings) == "x <server path>"
    assert without_server_paths("read file:/srv/models/qwen/config.json", settings) == "read file:<server path>"

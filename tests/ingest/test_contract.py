import json
from pathlib import Path

from ingest.contract import json_schemas

DOCS = Path(__file__).resolve().parents[2] / "docs" / "contract"


def test_committed_json_schemas_match_the_models():
    generated = json_schemas()
    committed = {p.name: p.read_text() for p in DOCS.glob("*.schema.json")}
    assert committed == generated, "run `proxyloop contract docs/contract` and commit the result"


def test_schemas_state_the_version_and_the_required_identity_fields():
    expert = json.loads(json_schemas()["ExpertLabel.schema.json"])
    assert expert["properties"]["schema_version"]["default"] == 2
    assert expert["properties"]["schema_version"]["enum"] == [1, 2]
    # v2: the producer's clock orders versions, so the wire requires it.
    assert {"event_id", "annotator_id", "occurred_at"} <= set(expert["required"])
    assert "v2" in expert["$comment"]

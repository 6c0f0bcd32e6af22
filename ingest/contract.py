"""The event contract as JSON Schema, for producers and consumers that are not Python.

`proxyloop contract export docs/contract` writes one file per topic payload; a test keeps the
committed files equal to what the pydantic models generate, so docs never drift from the code.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from ground.schemas import SCHEMA_VERSION, DatasetUpdated, DeadLetter, ExpertLabel, PolicyReleased, ProxyPreference

# Topic setting → the model of its records.
TOPIC_MODELS: dict[str, type[BaseModel]] = {
    "topic_expert": ExpertLabel,
    "topic_proxy": ProxyPreference,
    "topic_dead_letter": DeadLetter,
    "topic_dataset_updated": DatasetUpdated,
    "topic_policy_released": PolicyReleased,
}


def json_schemas() -> dict[str, str]:
    """File name → JSON Schema text (validation mode: what a producer must send)."""
    out = {}
    for setting, model in TOPIC_MODELS.items():
        schema = model.model_json_schema(mode="validation")
        schema["$comment"] = (f"proxyloop event contract v{SCHEMA_VERSION}; "
                              f"records of the topic in PROXYLOOP_{setting.upper()}")
        out[f"{model.__name__}.schema.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return out


def export(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in json_schemas().items():
        path = directory / name
        path.write_text(text)
        written.append(path)
    return written

"""Releasing a checkpoint: registry version with lineage, alias move logged in the promotion history,
`policy.released` event.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from ground.schemas import PolicyReleased, PolicyVersion
from ground.settings import Settings
from ingest.bus import make_producer, publish
from policies.audit import ReleaseEvidence, record_move, record_release
from policies.registry import register, resolve
from policies.registry_remote import push


def announce(settings: Settings, version: PolicyVersion, alias: str, event_id: str) -> None:
    """Mirror the registry to its remote (if any), then publish `policy.released` so services reload."""
    if settings.registry_remote_url:
        push(settings.registry_dir, settings.registry_remote_url, version.policy)
    producer = make_producer(settings)
    try:
        publish(producer, settings.topic_policy_released, PolicyReleased(
            event_id=event_id, policy=version.policy, version=version.version, alias=alias, uri=version.path))
    finally:
        producer.close()


def release_checkpoint(
    settings: Settings, checkpoint_dir: Path, lineage: dict[str, Any], alias: str = "production",
    evidence: ReleaseEvidence | None = None,
) -> PolicyVersion:
    """Register the checkpoint, point `alias` at it, log who/why/gate/snapshot (`evidence`) and tell services."""
    tensors = load_file(str(checkpoint_dir / "model.safetensors"))
    config = json.loads((checkpoint_dir / "config.json").read_text())
    version = register(settings.registry_dir, settings.policy_name, tensors, config, lineage, alias=None)
    record_release(settings.registry_dir, version, alias, evidence or ReleaseEvidence())
    announce(settings, version, alias, event_id=f"released-{version.policy}-{version.version}")
    return version


def move_alias(
    settings: Settings, version: int, alias: str = "production", policy: str | None = None, reason: str = ""
) -> PolicyVersion:
    """Point an alias at an existing version (rollback or promote), log it with `reason` and the OS user,
    and tell services."""
    policy = policy or settings.policy_name
    record_move(settings.registry_dir, policy, alias, version, why=reason)
    moved = resolve(settings.registry_dir, f"{policy}@{version}")
    announce(settings, moved, alias, event_id=f"alias-{moved.policy}-{alias}-{version}-{uuid.uuid4().hex[:8]}")
    return moved

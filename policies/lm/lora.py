"""LoRA policies: a PEFT adapter released with a reference to its base model, not a copy of it.

A LoRA run's checkpoint holds the adapter (PEFT format: `adapter_config.json`, `adapter_model.safetensors`)
and the tokenizer. Copying the base into every release would cost the base's size per version for
a few megabytes of adapter, so a release records where the base is and a digest of its config and
weights (`lora_base.json`); loading checks that digest, so an adapter never runs on another base than
the one it was trained on, and a moved or retrained base fails with a message instead of serving
something else. Serving merges the adapter into the base by default (`PROXYLOOP_SERVE_MERGE_LORA`): a
merged model generates at the base's speed; unmerged keeps the base's weights untouched in memory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from policies.lm.model_digest import model_digest
from policies.lm.simplex_bottleneck import load_causal_lm_dir

ADAPTER_CONFIG = "adapter_config.json"
BASE_REFERENCE = "lora_base.json"


def is_lora_dir(path: Path | str) -> bool:
    return (Path(path) / ADAPTER_CONFIG).exists()


def base_reference(adapter_dir: Path | str) -> dict[str, str]:
    """The base the adapter was trained on: its directory (from PEFT's config) and its digest now."""
    base = str(json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text())["base_model_name_or_path"])
    if not (Path(base) / "config.json").exists():
        raise FileNotFoundError(f"the LoRA adapter in {adapter_dir} was trained on {base}, which holds no model")
    return {"path": base, "sha256": model_digest(base)}


def write_base_reference(adapter_dir: Path, out_dir: Path) -> None:
    (out_dir / BASE_REFERENCE).write_text(json.dumps(base_reference(adapter_dir), indent=2))


def load_lora_dir(path: Path | str, device: torch.device | str = "cpu", merge: bool = True) -> Any:
    """Base (checked against the release's digest, when there is one) with the adapter on top; merged if asked."""
    from peft import PeftModel

    recorded = Path(path) / BASE_REFERENCE
    if recorded.exists():
        reference = json.loads(recorded.read_text())
        if not (Path(reference["path"]) / "config.json").exists():
            raise FileNotFoundError(f"{path} is a LoRA adapter on the base {reference['path']}, which is not there: "
                                    "make the base available at that path on this host")
        if model_digest(reference["path"]) != reference["sha256"]:
            raise ValueError(f"the base at {reference['path']} is not the one the adapter in {path} was trained on "
                             "(its weights' digest differs)")
        base_dir = reference["path"]
    else:
        base_dir = base_reference(path)["path"]
    model = PeftModel.from_pretrained(load_causal_lm_dir(base_dir, device), str(path))
    return model.merge_and_unload() if merge else model

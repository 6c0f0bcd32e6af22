"""What identifies a saved model: a digest of the content of its config and weight files.

Two places need to know whether a model directory still holds the same model: a LoRA release checks
its base at load (`policies/lm/lora.py`), and the DPO reference cache keys reference log-probs by the
reference model (`workers/lm/training/reference_cache.py`, which memoises each file's digest). Content,
not paths or timestamps: a copy elsewhere is the same model, a base re-saved after training is not.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

WEIGHT_PATTERNS = ("config.json", "model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
                   "pytorch_model.bin.index.json")


def file_sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def model_digest(model_dir: Path | str, file_digest: Callable[[Path], str] = file_sha256) -> str:
    """sha256 over the names and `file_digest`s of the directory's config and weight files (not its tokenizer,
    optimiser state or logs)."""
    root = Path(model_dir)
    files = sorted({p for pattern in WEIGHT_PATTERNS for p in root.glob(pattern) if p.is_file()})
    if not any(p.name != "config.json" for p in files):
        raise ValueError(f"{root} holds no weight files matching {list(WEIGHT_PATTERNS)}")
    parts = {p.name: file_digest(p) for p in files}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

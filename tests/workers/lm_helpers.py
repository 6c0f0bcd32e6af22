"""Helpers for language-model worker tests: one tiny model per test process, small datasets."""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from functools import cache
from pathlib import Path

from workers.lm.models import build_tiny

PAIRS = [
    {"prompt": "What is 3 plus 4?", "chosen": " It is 7.", "rejected": " It is 9, the model says."},
    {"prompt": "the expert labels", "chosen": " the first response.", "rejected": " both drafts."},
    {"prompt": "a proxy judge ranks the longer reply and", "chosen": " it.",
     "rejected": " the question or the short answer."},
    {"prompt": "What is 5 plus 1?", "chosen": " It is 6.", "rejected": " It is 2."},
]


def process_temp_dir(prefix: str) -> Path:
    """A temporary directory removed when this process exits (a cached model outlives any one test's tmp_path)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


@cache
def tiny_model_dir() -> Path:
    """A 2-layer, 64-wide Llama with a locally trained tokenizer, built once per test process."""
    return build_tiny(process_temp_dir("proxyloop-tiny-") / "tiny", seed=0)


def write_pairs(path: Path, n: int) -> Path:
    """`n` preference rows cycling through PAIRS with varied numbers (varied lengths too)."""
    rows = []
    for i in range(n):
        base = PAIRS[i % len(PAIRS)]
        rows.append({"prompt": f"{base['prompt']} ({i})", "chosen": base["chosen"],
                     "rejected": base["rejected"] + " no." * (i % 3)})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path

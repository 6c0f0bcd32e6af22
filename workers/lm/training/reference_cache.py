"""Reference log-probs shared across runs, so a retrain runs the reference pass only over pairs it has not seen.

DPO's reference model is frozen: a pair's reference log-probs are a function of the tokens scored, the
reference weights and how a sequence is scored, nothing else. Without this cache every retrain re-scores
the whole snapshot; with it, a retrain after 500 new labels scores those 500.

An entry's key is sha256 over two parts:
- **the pair**: its token ids (prompt, chosen, rejected) as `tokenize_pairs` made them. Ids rather than
  text, because they carry the text, the tokenizer and the template (the appended EOS) at once: a
  changed tokenizer gives other ids and misses, however its files are named.
- **the context** (`reference_context`): the reference model's digest (`model_digest`), `max_length`
  (truncation), the log-prob reduction, the device type, the autocast dtype (bf16 on CUDA scores
  otherwise than fp32 on CPU) and the attention implementation, plus how the reference is formed
  (LoRA adapter disabled, simplex bottleneck attached at Θ̃ = 0). The last two give the base model's
  values exactly today; they are in the key so that a later change to either cannot serve stale values.

The model digest hashes the *content* of `config.json` and the weight files of the directory the
model was loaded from, so a stage-1 checkpoint used as the base of stage 2, or a base re-saved after
training, misses; a copy of the same model elsewhere hits. Reading a 135M-parameter model takes about
a second, so each file's digest is memoised by (path, size, mtime_ns) in the same database: a model is
read once per file version, not once per run.

Values are exact for the batches they were computed in. A pair's reference log-prob can differ in the
last float32 bits with the batch it shares (padding width, `logits_to_keep`), which the per-run
computation has always had; a cache hit returns the stored value bit for bit.

Storage: one SQLite file (`reference_logps.sqlite3`) under `PROXYLOOP_REFERENCE_CACHE_DIR` (default
`<home>/reference-cache`), in WAL mode with a busy timeout, each write one transaction of
`INSERT OR IGNORE`: workers writing the same pairs at once keep the first value and never see a half
write. SQLite's locking needs a local disk, so give each host its own directory rather than a network
share. Nothing is evicted; deleting the directory empties the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, closing
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from policies.lm.model_digest import file_sha256, model_digest
from workers.lm.training.data import TokenizedPair
from workers.lm.training.dpo import reference_logps
from workers.lm.training.dpo_config import DPOConfig

log = logging.getLogger("proxyloop.workers.lm.reference_cache")

DB_NAME = "reference_logps.sqlite3"
FORMAT = 2  # bump when the meaning of a stored value changes: every old entry then misses (2: long prompts keep
# their end, mode_mixture.kept_prompt)
LOOKUP_CHUNK = 500  # SQLite bounds the number of parameters of one statement


def pair_key(pair: TokenizedPair) -> bytes:
    """Digest of the token ids a pair is scored on."""
    ids = json.dumps([pair.prompt_ids, pair.chosen_ids, pair.rejected_ids], separators=(",", ":"))
    return hashlib.sha256(ids.encode()).digest()


def chunks(items: Sequence[bytes], size: int) -> Iterator[Sequence[bytes]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


class ReferenceCache:
    """The SQLite file of one cache directory; a connection per call, so it is safe to share across threads."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / DB_NAME
        with closing(self.connect()) as db, db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("CREATE TABLE IF NOT EXISTS logps (key BLOB PRIMARY KEY, chosen REAL NOT NULL, "
                       "rejected REAL NOT NULL) WITHOUT ROWID")
            db.execute("CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER NOT NULL, "
                       "mtime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL)")

    def connect(self) -> sqlite3.Connection:
        """A connection to the cache's SQLite file (also holds `workers/lm/terms_cache.py`'s table)."""
        return sqlite3.connect(self.path, timeout=60)  # waits out another worker's write transaction

    def lookup(self, keys: Sequence[bytes]) -> dict[bytes, tuple[float, float]]:
        found: dict[bytes, tuple[float, float]] = {}
        with closing(self.connect()) as db:
            for chunk in chunks(keys, LOOKUP_CHUNK):
                marks = ",".join("?" * len(chunk))
                rows = db.execute(f"SELECT key, chosen, rejected FROM logps WHERE key IN ({marks})", list(chunk))
                found.update({bytes(k): (c, r) for k, c, r in rows})
        return found

    def store(self, values: dict[bytes, tuple[float, float]]) -> None:
        """Add entries in one transaction; a key another worker stored first keeps its value."""
        with closing(self.connect()) as db, db:
            db.executemany("INSERT OR IGNORE INTO logps (key, chosen, rejected) VALUES (?, ?, ?)",
                           [(k, c, r) for k, (c, r) in values.items()])

    def file_digest(self, path: Path) -> str:
        """sha256 of a file's content, read once per (path, size, mtime_ns)."""
        path = path.resolve()
        stat = path.stat()
        with closing(self.connect()) as db:
            row = db.execute("SELECT sha256 FROM files WHERE path = ? AND size = ? AND mtime_ns = ?",
                             (str(path), stat.st_size, stat.st_mtime_ns)).fetchone()
        if row:
            return str(row[0])
        digest = file_sha256(path)
        with closing(self.connect()) as db, db:
            db.execute("INSERT OR REPLACE INTO files (path, size, mtime_ns, sha256) VALUES (?, ?, ?, ?)",
                       (str(path), stat.st_size, stat.st_mtime_ns, digest))
        return digest

    def model_digest(self, model_dir: Path) -> str:
        """The model's digest (`policies.lm.model_digest`), each file read once per version."""
        return model_digest(model_dir, self.file_digest)


def reference_context(model: Any, config: DPOConfig, device: torch.device,
                      autocast: AbstractContextManager[Any], reference_digest: str) -> bytes:
    """Digest of everything besides the pair that decides a reference log-prob (see the module docstring)."""
    dtype = autocast.fast_dtype if isinstance(autocast, torch.autocast) else None
    context = {"format": FORMAT, "model": reference_digest, "max_length": config.max_length,
               "reduction": config.reduction, "device": device.type, "autocast": str(dtype),
               "attention": getattr(model.config, "_attn_implementation", None),
               "lora_disabled": bool(config.lora_r), "simplex_dim": config.simplex_dim}
    return hashlib.sha256(json.dumps(context, sort_keys=True).encode()).digest()


def loaded_from(model: Any) -> Path:
    """The directory `model` (or, under LoRA, its base) was loaded from, as transformers recorded it."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return Path(base.config._name_or_path)


def cached_reference_logps(
    model: Any, pairs: Sequence[TokenizedPair], config: DPOConfig, pad_token_id: int, device: torch.device,
    autocast: AbstractContextManager[Any], cache: ReferenceCache,
) -> tuple[Tensor, Tensor]:
    """`reference_logps` of `pairs` [N], computing only the pairs `cache` lacks and storing those."""
    context = reference_context(model, config, device, autocast, cache.model_digest(loaded_from(model)))
    keys = [hashlib.sha256(context + pair_key(p)).digest() for p in pairs]
    known = cache.lookup(list(dict.fromkeys(keys)))
    missing = {k: p for k, p in zip(keys, pairs, strict=True) if k not in known}  # one computation per distinct pair
    if missing:
        chosen, rejected = reference_logps(model, list(missing.values()), config, pad_token_id, device, autocast)
        computed = {k: (float(c), float(r)) for k, c, r in zip(missing, chosen.tolist(), rejected.tolist(),
                                                                strict=True)}
        cache.store(computed)
        known.update(computed)
    log.info("reference log-probs of %d pairs: %d distinct ones computed, the rest cached", len(pairs), len(missing))
    values = torch.tensor([known[k] for k in keys], dtype=torch.float32).reshape(len(keys), 2)
    return values[:, 0].contiguous(), values[:, 1].contiguous()

"""A stage-1 mode mixture's terms of text pairs, kept across acquisition refreshes.

Why: every refresh of the chat tasks' scores (flows/acquisition_chat.py) reads the mixture's terms of every open
task and every labelled pair, and each costs the base model's forward over the prompt and both responses: on this
2-core CPU SmolLM2-135M encodes about 6 pairs a second, so 500 open tasks alone would take most of a minute and a
refresh has 60 s. A pair's terms depend on the checkpoint and the pair's text only (what changes between refreshes
is the relabelling the labels favour, refitted on the terms each time), so each pair is encoded once per
checkpoint and later refreshes encode only the tasks and labels that are new.

Key: sha256 over the checkpoint's identity and the pair's row (prompt and both responses as `preference_row` wrote
them). The identity (`checkpoint_identity`) is the content digest of the base's config and weights
(`policies.lm.model_digest`), of the mixture's state and spec, and of the tokenizer's files, with the version of the
encoding (`ENCODING`), so a retrained stage 1, another base, another tokenizer or another encoding misses; file
digests are memoised by the reference cache's table. Values are the terms' float64 row as computed in the batch it
was first encoded in (another batch can differ in the last bits through padding, as it always could). Storage: a
table of the reference cache's SQLite file (`PROXYLOOP_REFERENCE_CACHE_DIR`; WAL mode, its connection settings),
`INSERT OR IGNORE`; nothing is evicted.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from contextlib import closing
from pathlib import Path

import numpy as np

from policies.lm.conditions import MixtureTerms
from workers.lm.training.reference_cache import LOOKUP_CHUNK, ReferenceCache, chunks

IDENTITY_FILES = ("mode_mixture.safetensors", "mode_mixture.json", "tokenizer.json", "tokenizer_config.json",
                  "chat_template.jinja")
FIELDS = ("log_weights", "mode_chosen", "mode_rejected", "base_chosen", "base_rejected", "prompt_code")
# How a pair is encoded, beyond the checkpoint's files: "cut-v1" since `encode_pairs` cuts each sequence to the
# recipe's max_length (the recipe is in mode_mixture.json); terms stored before were of whole pairs, so a long pair's
# value would be stale. Change it whenever the encoding changes, and every earlier entry misses.
ENCODING = "cut-v1"


def checkpoint_identity(checkpoint: Path, files: ReferenceCache) -> str:
    """Digest of what a pair's terms depend on in a mixture checkpoint directory."""
    parts = {"model": files.model_digest(checkpoint), "encoding": ENCODING}
    parts.update({name: files.file_digest(checkpoint / name) for name in IDENTITY_FILES
                  if (checkpoint / name).is_file()})
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def row_key(identity: str, row: dict[str, str]) -> bytes:
    text = json.dumps([identity, row["prompt"], row["chosen"], row["rejected"]], separators=(",", ":"))
    return hashlib.sha256(text.encode()).digest()


class TermsCache:
    """The `mixture_terms` table of a reference cache directory's SQLite file; a connection per call. Rows are
    stored as the float64 concatenation of FIELDS."""

    def __init__(self, directory: Path) -> None:
        self.files = ReferenceCache(directory)
        with closing(self.files.connect()) as db, db:
            db.execute("CREATE TABLE IF NOT EXISTS mixture_terms (key BLOB PRIMARY KEY, value BLOB NOT NULL) "
                       "WITHOUT ROWID")

    def lookup(self, keys: Sequence[bytes]) -> dict[bytes, np.ndarray]:
        found: dict[bytes, np.ndarray] = {}
        with closing(self.files.connect()) as db:
            for chunk in chunks(keys, LOOKUP_CHUNK):
                marks = ",".join("?" * len(chunk))
                rows = db.execute(f"SELECT key, value FROM mixture_terms WHERE key IN ({marks})", list(chunk))
                found.update({bytes(k): np.frombuffer(v, dtype=np.float64) for k, v in rows})
        return found

    def store(self, values: dict[bytes, np.ndarray]) -> None:
        with closing(self.files.connect()) as db, db:
            db.executemany("INSERT OR IGNORE INTO mixture_terms (key, value) VALUES (?, ?)",
                           [(k, np.ascontiguousarray(v, dtype=np.float64).tobytes()) for k, v in values.items()])


def terms_rows(terms: MixtureTerms) -> np.ndarray:
    """[n, 3D + 2 + P]: each pair's terms as one row."""
    columns = [np.asarray(getattr(terms, f), dtype=np.float64) for f in FIELDS]
    return np.hstack([c if c.ndim == 2 else c[:, None] for c in columns])


def rows_terms(rows: np.ndarray, dim: int, beta: float) -> MixtureTerms:
    """The inverse of `terms_rows` for D = `dim` modes."""
    d = dim
    return MixtureTerms(rows[:, :d], rows[:, d:2 * d], rows[:, 2 * d:3 * d], rows[:, 3 * d], rows[:, 3 * d + 1],
                        rows[:, 3 * d + 2:], beta)

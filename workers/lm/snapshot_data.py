"""A snapshot's pairwise-text labels → the JSONL files `proxyloop.train_lm` trains and evaluates on.

Prompts are rendered in ChatML (the chat template of the tiny base model and of SmolLM2-Instruct),
so the released model is trained on exactly what `/v1/chat/completions` feeds it; responses end
with `<|im_end|>`, where the serving loop stops.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from ground.schemas import ChatData, PairwiseText
from ingest.store import make_engine
from ingest.text_snapshot import copy_groups, load_snapshot_pairs, split_heldout

PROXY_FILE = "proxy.jsonl"
EXPERT_FILE = "expert.jsonl"
HELDOUT_FILE = "heldout.jsonl"
END_OF_TURN = "<|im_end|>"


class NoTextPairs(ValueError):
    """A snapshot routed to language-model training has too few distinct expert tasks to train on and judge: the run
    is refused with this reason (flows/retrain.py), not failed, and never retried (the snapshot will not change)."""


def chat_prompt(user_message: str) -> str:
    """ChatML rendering of one user turn followed by the assistant's generation prompt."""
    return f"<|im_start|>user\n{user_message}<|im_end|>\n<|im_start|>assistant\n"


def preference_row(pair: PairwiseText, source: str) -> dict[str, str]:
    """One JSONL row: `choice` says which of a/b was chosen."""
    chosen, rejected = ((pair.response_a, pair.response_b) if pair.choice == "a"
                        else (pair.response_b, pair.response_a))
    return {"prompt": chat_prompt(pair.prompt), "chosen": chosen + END_OF_TURN, "rejected": rejected + END_OF_TURN,
            "source": source}


def write_jsonl(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """`rows` as a JSONL file, written under a `.partial` name and renamed (a reader never sees half a dataset).
    Here, not beside `training.data.load_jsonl`, because flows import this module and must not import torch."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text("".join(json.dumps(row) + "\n" for row in rows))
    partial.rename(path)
    return path


def write_snapshot_datasets(store_url: str, snapshot_id: str, out_dir: Path) -> ChatData:
    """Write `proxy.jsonl` (stage 1), `expert.jsonl` (the expert train split) and `heldout.jsonl` (held-out expert
    pairs, for the gate only). Returns the paths and counts, with the snapshot id, for the run's lineage.
    """
    with Session(make_engine(store_url)) as session:
        pairs = load_snapshot_pairs(session, snapshot_id)
    expert_train, heldout = split_heldout(pairs["expert"])
    if not heldout or not expert_train:
        tasks = len(set(copy_groups(pairs["expert"])))
        raise NoTextPairs(f"snapshot {snapshot_id} has {len(pairs['expert'])} expert text pairs on {tasks} distinct "
                          "tasks (a prompt with its two responses: copies from several annotators count once); at "
                          "least 2 distinct tasks are needed, one to train on and one held out for the gate")
    proxy = ""
    if pairs["proxy"]:
        proxy = str(write_jsonl([preference_row(p, "proxy") for p in pairs["proxy"]], out_dir / PROXY_FILE))
    expert = write_jsonl([preference_row(p, "expert") for p in expert_train], out_dir / EXPERT_FILE)
    held = write_jsonl([preference_row(p, "expert") for p in heldout], out_dir / HELDOUT_FILE)
    return ChatData(snapshot_id=snapshot_id, proxy=proxy, expert=str(expert), heldout=str(held),
                    n_expert_train=len(expert_train), n_proxy=len(pairs["proxy"]), n_heldout=len(heldout))

"""Pairwise-text snapshots: which kind of item a snapshot holds and its text pairs, split as the store splits.

Their condition tests need a trained stage-1 model, so they run on the workers (workers.lm.text_conditions).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Literal

from pydantic import TypeAdapter
from sqlalchemy import select
from sqlalchemy.orm import Session

from ground.schemas import Item, PairwiseText
from ingest.store import HELDOUT_EVERY, LabelKind, LabelRow, SnapshotNotFound, SnapshotRow, split_by_group

ItemKind = Literal["features", "pairwise_text"]
_item_adapter: TypeAdapter[Item] = TypeAdapter(Item)


def _snapshot_rows(session: Session, snapshot_id: str) -> list[LabelRow]:
    snapshot = session.get(SnapshotRow, snapshot_id)
    if snapshot is None:
        raise SnapshotNotFound(f"snapshot {snapshot_id!r} not in the store; freeze one first")
    wanted = set(snapshot.event_ids)
    return [row for row in session.scalars(select(LabelRow).order_by(LabelRow.event_id)) if row.event_id in wanted]


def snapshot_item_kind(session: Session, snapshot_id: str) -> ItemKind:
    """The kind of the snapshot's most recently stored label: the data that triggered this retrain.

    A store may hold both kinds (a feature task and a chat task fed to one stack); each retrain
    trains on the kind its newest data has, and ignores the other kind's items.
    """
    rows = _snapshot_rows(session, snapshot_id)
    if not rows:
        return "features"
    newest = max(rows, key=lambda row: row.seq)
    return "pairwise_text" if newest.item.get("type") == "pairwise_text" else "features"


def load_snapshot_pairs(session: Session, snapshot_id: str) -> dict[LabelKind, list[PairwiseText]]:
    """The pairwise-text items of a snapshot, split by kind, in event-id order (deterministic)."""
    out: dict[LabelKind, list[PairwiseText]] = {"expert": [], "proxy": []}
    for row in _snapshot_rows(session, snapshot_id):
        item = _item_adapter.validate_python(row.item)
        if isinstance(item, PairwiseText):
            out["expert" if row.kind == "expert" else "proxy"].append(item)
    return out


def copy_groups(items: Sequence[PairwiseText]) -> list[int]:
    """Per item, its copy group: one prompt with one unordered pair of responses is one group, whoever labelled it
    and whichever way, numbered by first appearance (all distinct: 0..n-1)."""
    seen: dict[tuple[str, frozenset[str]], int] = {}
    return [seen.setdefault((t.prompt, frozenset((t.response_a, t.response_b))), len(seen)) for t in items]


def prompt_groups(items: Sequence[PairwiseText]) -> list[int]:
    """Per item, its prompt's group, numbered by first appearance: every pair on one prompt is one group."""
    seen: dict[str, int] = {}
    return [seen.setdefault(t.prompt, len(seen)) for t in items]


# Fewer distinct prompts than this and the split falls back to copy groups: a third of one or two prompts is none.
MIN_PROMPTS_TO_SPLIT = 2 * HELDOUT_EVERY


def _held_out_prompts(prompts: Sequence[int]) -> set[int]:
    """Prompt groups (numbered by first appearance) held out so that their pairs are about 1/HELDOUT_EVERY of all:
    in order, a prompt goes to the gate when the held-out pairs with it stay within that share (rounded up) of
    the pairs seen so far. One pair per prompt gives every third prompt from the first, as the store's split does;
    a prompt with most of the pairs stays in training (every third prompt had held out 104 of 112 pairs)."""
    sizes = Counter(prompts)
    held: set[int] = set()
    seen = taken = 0
    for group in sorted(sizes):
        seen += sizes[group]
        if taken + sizes[group] <= math.ceil(seen / HELDOUT_EVERY):
            held.add(group)
            taken += sizes[group]
    return held


def split_heldout(items: Sequence[PairwiseText]) -> tuple[list[PairwiseText], list[PairwiseText]]:
    """(train, held-out) with no prompt on both sides (`_held_out_prompts`): the expert pairs a policy is trained on
    share no prompt with those the gate scores it on. A held-out pair on a training prompt (another pair of
    responses, or a copy of a training pair: the audit had 16 of 16 held-out pairs copies) scored what was trained
    on. Stage 1's proxy pairs may still hold a held-out prompt. With fewer than MIN_PROMPTS_TO_SPLIT distinct
    prompts, or a side left empty, the store's rule over copy groups (`copy_groups`): at least no pair is on both."""
    prompts = prompt_groups(items)
    held = _held_out_prompts(prompts) if len(set(prompts)) >= MIN_PROMPTS_TO_SPLIT else set()
    train = [t for g, t in zip(prompts, items, strict=True) if g not in held]
    if not held or not train:
        return split_by_group(items, copy_groups(items))
    return train, [t for g, t in zip(prompts, items, strict=True) if g in held]

"""Pairwise-text snapshots: which kind of item a snapshot holds and its text pairs, split as the store splits.

Their condition tests need a trained stage-1 model, so they run on the workers (workers.lm.text_conditions).
"""

from __future__ import annotations

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


# Fewer distinct prompts than this and the split falls back to copy groups: by prompt, every third prompt's pairs go to
# the gate, and one or two prompts would leave training nothing or the gate everything.
MIN_PROMPTS_TO_SPLIT = 2 * HELDOUT_EVERY


def split_heldout(items: Sequence[PairwiseText]) -> tuple[list[PairwiseText], list[PairwiseText]]:
    """(train, held-out) by the store's rule (`split_by_group`) over prompts (`prompt_groups`): the gate scores a
    policy on prompts it was not trained on, as it will be served. A held-out pair on a training prompt (another
    pair of responses, or a copy of a training pair: the audit had 16 of 16 held-out pairs copies) scored what was
    trained on. With fewer than MIN_PROMPTS_TO_SPLIT distinct prompts, over copy groups (`copy_groups`): at least no
    pair is on both sides."""
    prompts = prompt_groups(items)
    enough = len(set(prompts)) >= MIN_PROMPTS_TO_SPLIT
    return split_by_group(items, prompts if enough else copy_groups(items))

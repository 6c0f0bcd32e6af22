"""User profiles for personalised serving (paper 3): what a user wrote or approved, and the prompt
builder that puts it where it matters.

Paper 3 found that a profile helps through the user's own responses (inputs can be dropped to fit
more items) and that items near the beginning of the context count more. The defaults follow
that: response-only items, most relevant first, at the start, within a token budget. Order,
position and format are settings so the claim can be ablated (bench/profile.py).

Position has two renderings that differ in tokens even for a single-turn prompt:
- "start": the profile is a system message at the very beginning of the context, ahead of any
  system prompt and every turn (paper 3's reading: the beginning of the input counts most).
- "end": the profile is appended to the last user turn, after the question, so it is the text
  nearest to the reply (the usual retrieval-augmented reading: "right before generation").
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import Literal

from pydantic import ValidationError
from rank_bm25 import BM25Okapi
from sqlalchemy import DateTime, Integer, String, Text, delete, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from ground.moments import utcnow
from ground.schemas import PairwiseText
from ground.settings import Settings
from ground.validation import validation_problems
from ingest.store import make_engine

Position = Literal["start", "end"]
Order = Literal["relevance", "recency"]
ProfileSource = Literal["api", "expert_label", "accepted_completion"]
TokenCounter = Callable[[str], int]


class ProfileBase(DeclarativeBase):
    pass


class ProfileItem(ProfileBase):
    __tablename__ = "profile_items"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[str] = mapped_column(String(256), index=True)
    response: Mapped[str] = mapped_column(Text)
    query: Mapped[str | None] = mapped_column(Text, nullable=True)
    source: Mapped[str] = mapped_column(String(32))
    source_id: Mapped[str | None] = mapped_column(String(256), nullable=True, unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ErasedUser(ProfileBase):
    """Only a hash of an erased user's id, so label sync never re-creates their profile."""

    __tablename__ = "profile_erasures"
    user_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    erased_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


def _user_hash(user_id: str) -> str:
    return hashlib.sha256(user_id.encode()).hexdigest()


def create_tables(engine: Engine) -> None:
    """Create the profile tables if missing. Another process (a second server worker) may create them between
    SQLAlchemy's check and its CREATE: then the tables exist, which is all that was asked."""
    try:
        ProfileBase.metadata.create_all(engine)
    except OperationalError:
        ProfileBase.metadata.create_all(engine)  # checks again: raises only if the tables are still missing


# The user ids the profile endpoints can address (/v1/users/{id}): a profile is only ever built under one of them, so
# whatever is served from a profile can also be listed and erased (policies/profile_api.py, policies/openai_api.py).
log = logging.getLogger(__name__)
USER_ID_PATTERN = r"^[A-Za-z0-9_.@:-]{1,256}$"
_ENGINE_LOCK = threading.Lock()


@lru_cache(maxsize=8)
def _cached_engine(store_url: str) -> Engine:
    engine = make_engine(store_url)
    create_tables(engine)
    return engine


def profile_engine(store_url: str) -> Engine:
    """The store's engine with the profile tables created, once per process (not per request). The lock:
    `lru_cache` lets concurrent first requests all run the body, and their CREATE TABLEs would collide."""
    with _ENGINE_LOCK:
        return _cached_engine(store_url)


def add_item(session: Session, user_id: str, response: str, query: str | None = None,
             source: ProfileSource = "api", source_id: str | None = None) -> ProfileItem:
    """Store one response; a known `source_id` (e.g. a label's event id) is stored once, also when two requests
    store it at the same time: the loser's insert is rolled back to a savepoint and it returns the winner's row."""
    existing = _item_from(session, source_id)
    if existing is not None:
        return existing
    item = ProfileItem(user_id=user_id, response=response, query=query, source=source, source_id=source_id)
    try:
        with session.begin_nested():
            session.add(item)
    except IntegrityError:
        existing = _item_from(session, source_id)
        if existing is None:  # not the unique source_id: a real refusal
            raise
        return existing
    return item


def _item_from(session: Session, source_id: str | None) -> ProfileItem | None:
    if source_id is None:
        return None
    return session.scalar(select(ProfileItem).where(ProfileItem.source_id == source_id))


def items_of(session: Session, user_id: str) -> list[ProfileItem]:
    return list(session.scalars(select(ProfileItem).where(ProfileItem.user_id == user_id)
                                .order_by(ProfileItem.created_at.desc(), ProfileItem.id.desc())))


def erase_user(session: Session, user_id: str) -> int:
    """Delete every stored item of a user; returns how many were removed."""
    result = session.execute(delete(ProfileItem).where(ProfileItem.user_id == user_id))
    session.merge(ErasedUser(user_hash=_user_hash(user_id)))
    return int(getattr(result, "rowcount", 0) or 0)


def sync_expert_labels(session: Session, user_id: str | None = None) -> int:
    """Chosen responses of text expert labels become their annotator's profile items (idempotent); returns how
    many were added.

    Keyed by the annotator id as stored (e.g. `labelstudio-user-7`). The profile follows the labels as the store
    has them now: a label edited since (another choice) updates its item, and a retracted label's item is removed
    (before, both stayed in the profile for good). Erased users are skipped: their labels remain training data,
    retracted through Label Studio like any other label.
    """
    from ingest.store import LabelRow

    labels = select(LabelRow).where(LabelRow.kind == "expert")
    synced = select(ProfileItem).where(ProfileItem.source == "expert_label")
    if user_id is not None:
        labels, synced = labels.where(LabelRow.source_id == user_id), synced.where(ProfileItem.user_id == user_id)
    erased = set(session.scalars(select(ErasedUser.user_hash)))
    items = {item.source_id: item for item in session.scalars(synced)}
    added = 0
    for row in session.scalars(labels):
        item = items.get(row.event_id)
        if row.deleted:
            if item is not None:
                session.delete(item)
            continue
        if not row.item or row.item.get("type") != "pairwise_text" or _user_hash(row.source_id) in erased:
            continue
        try:
            label = PairwiseText.model_validate(row.item)
        except ValidationError as exc:  # stored by an older contract: one label skipped, not every sync failed
            log.warning("profile sync skips label %s: its stored item is no longer a valid text pair (%s)",
                        row.event_id, validation_problems(exc, limit=2))
            continue
        chosen = label.response_a if label.choice == "a" else label.response_b
        if "\x00" in chosen or "\x00" in label.prompt:  # a profile item is text, which PostgreSQL's refuses
            log.warning("profile sync skips label %s: its text holds a NUL character", row.event_id)
            continue
        if item is None:
            add_item(session, row.source_id, chosen, label.prompt, "expert_label", source_id=row.event_id)
            added += 1
        elif (item.response, item.query) != (chosen, label.prompt):
            item.response, item.query = chosen, label.prompt
    return added


@dataclass(frozen=True)
class ProfileConfig:
    budget_tokens: int = 256
    position: Position = "start"
    include_query: bool = False
    order: Order = "relevance"
    max_items: int = 32
    header: str = "Responses this user wrote or approved before (match their style):"

    def __post_init__(self) -> None:
        if self.budget_tokens < 1:
            raise ValueError(f"budget_tokens must be ≥ 1, got {self.budget_tokens}")
        if self.position not in ("start", "end"):
            raise ValueError(f"position must be 'start' or 'end', got {self.position!r}")
        if self.order not in ("relevance", "recency"):
            raise ValueError(f"order must be 'relevance' or 'recency', got {self.order!r}")


def profile_config(settings: Settings) -> ProfileConfig:
    """The serving layout from settings (PROXYLOOP_PROFILE_*)."""
    return ProfileConfig(budget_tokens=settings.profile_budget_tokens, position=settings.profile_position,
                         include_query=settings.profile_include_query, order=settings.profile_order)


@dataclass
class BuildReport:
    """What the builder chose: item ids in context order, and the tokens they use."""

    item_ids: list[int] = field(default_factory=list)
    tokens: int = 0
    position: Position = "start"

    def header_value(self) -> str:
        return f"items={len(self.item_ids)}; tokens={self.tokens}; position={self.position}; " \
               f"ids={','.join(map(str, self.item_ids))}"


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def render_item(item: ProfileItem, include_query: bool) -> str:
    if include_query and item.query:
        return f"- Q: {item.query}\n  A: {item.response}"
    return f"- {item.response}"


def rank(items: Sequence[ProfileItem], request_text: str, config: ProfileConfig) -> list[ProfileItem]:
    if config.order == "recency" or not items:
        return sorted(items, key=lambda i: (i.created_at, i.id), reverse=True)
    corpus = [_words(render_item(i, config.include_query)) or ["_"] for i in items]
    scores = BM25Okapi(corpus).get_scores(_words(request_text))
    return [item for _, _, item in sorted(zip(scores, [-i.id for i in items], items, strict=True),
                                          key=lambda t: (t[0], t[1]), reverse=True)]


def build_messages(
    messages: list[dict[str, str]], items: Sequence[ProfileItem], config: ProfileConfig, count_tokens: TokenCounter
) -> tuple[list[dict[str, str]], BuildReport]:
    """Insert the best items that fit the budget, at `config.position` (see the module docstring).

    "start": `[system(profile), *messages]`. "end": the last user turn becomes
    `question + "\n\n" + profile` (with no user turn, a trailing system message). Response-only
    items render as `- response`; with `include_query`, as `- Q: query` / `  A: response`.
    """
    report = BuildReport(position=config.position)
    request_text = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    lines: list[str] = []
    used = count_tokens(config.header)
    for item in rank(items, request_text, config)[: config.max_items]:
        line = render_item(item, config.include_query)
        if line in lines:  # the same response posted again: one line, and the room for another item
            continue
        cost = count_tokens(line + "\n")
        if used + cost > config.budget_tokens:
            continue  # a shorter, less relevant item may still fit
        lines.append(line)
        used += cost
        report.item_ids.append(item.id)
    # Pieces were counted apart; the joined text is what the model sees, so check it and trim.
    while lines and count_tokens(config.header + "\n" + "\n".join(lines)) > config.budget_tokens:
        lines.pop()
        report.item_ids.pop()
    if not lines:
        return list(messages), BuildReport(position=config.position)
    content = config.header + "\n" + "\n".join(lines)
    report.tokens = count_tokens(content)
    if config.position == "start":
        return [{"role": "system", "content": content}, *messages], report
    last_user = next((i for i in range(len(messages) - 1, -1, -1) if messages[i]["role"] == "user"), None)
    if last_user is None:
        return [*messages, {"role": "system", "content": content}], report
    turn = dict(messages[last_user])
    turn["content"] = f"{turn['content']}\n\n{content}"
    return [*messages[:last_user], turn, *messages[last_user + 1:]], report

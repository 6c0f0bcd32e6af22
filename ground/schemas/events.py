"""The contract's wire half: events on Kafka, their items and limits, and what the dead-letter topic holds.

Imports nothing of ours but ground.moments. Every event carries `schema_version`; a change that breaks readers
bumps it, and readers refuse versions they do not know (the event goes to the dead letters).

Version 2 (this one) requires `occurred_at` on the wire: the producer's moment of the change. A
reader never stamps its own clock, so a redelivered copy cannot look newer than the stored one.
Between two versions of one event id the later `occurred_at` wins; equal moments are ordered by
content hash; an identical copy is a no-op whatever its timestamp (ingest.upsert.upsert_events).
Version 1 events are still read when they carry `occurred_at` (they meant the same).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from ground.moments import Moment, utcnow
from ground.validation import StoredText

SCHEMA_VERSION = 2
READABLE_SCHEMA_VERSIONS = (1, 2)

# Prefect event the consumer emits when new labels cross the retrain thresholds; triggers `retrain`.
DATASET_UPDATED_EVENT = "proxyloop.dataset.updated"
ACQUISITION_REQUESTED_EVENT = "proxyloop.acquisition.requested"  # Label Studio's ML-backend webhook saw a label

# ExpertLabel's default source: from Label Studio, no project named (events from before labels named theirs).
LABELSTUDIO_SOURCE = "labelstudio"

Plan = Literal["two_stage", "proxy_as_is", "fine_tune", "expert_only", "refuse"]
Decision = Literal["release", "block", "pick_checkpoint"]


# Output ids index a softmax over max(id) + 1 outputs and a D×D adapter, so 10**30 would size both absurdly far
# downstream; 4096 outputs (a 16.8M-weight adapter) is far above any label set we train.
MAX_OUTPUT_ID = 4095
MAX_TEXT_CHARS = 100_000  # per text field: four at the bound in ASCII (400 KB) fit Settings.max_event_bytes' default


def _null_is_nan(value: object) -> object:
    return float("nan") if value is None else value


# A figure that may be undefined (an indicator of a degenerate checkpoint, a loss of a stage that did not run): NaN in
# Python, "NaN" in JSON (`_Readings`), and NaN again when read back; null, as records before that held it, reads NaN.
Reading = Annotated[float, BeforeValidator(_null_is_nan)]


class _Readings(BaseModel):
    """A record with figures that may be NaN: JSON (the run record, a Celery result) writes them as "NaN", read back as
    NaN, so an undefined top-k mass stays apart from one that does not apply (None)."""

    model_config = ConfigDict(ser_json_inf_nan="strings")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


MAX_FEATURE = 1e38  # |x| below float32's largest value (3.4e38)


class FeatureTriple(_Strict):
    """Paper 1's setting: input vector x, preferred output y_w over y_l (ids in a finite Y)."""

    type: Literal["features"] = "features"
    # NaN/inf are refused: they are not JSON, and PostgreSQL would reject the row later; so is a value float32 (what
    # every model reads) cannot hold: 1e40 became inf there and the condition tests' fits NaN.
    x: list[Annotated[float, Field(allow_inf_nan=False, ge=-MAX_FEATURE, le=MAX_FEATURE)]] = Field(
        min_length=1, max_length=4096)
    y_w: int = Field(ge=0, le=MAX_OUTPUT_ID)
    y_l: int = Field(ge=0, le=MAX_OUTPUT_ID)

    @model_validator(mode="after")
    def _distinct(self) -> FeatureTriple:
        if self.y_w == self.y_l:
            raise ValueError(f"y_w and y_l must differ, both are {self.y_w}")
        return self


class PairwiseText(_Strict):
    """A prompt, two text responses and which one was chosen."""

    type: Literal["pairwise_text"] = "pairwise_text"
    # A NUL character is allowed here: the item is stored as JSON, which takes it on SQLite and PostgreSQL alike
    # (their text columns do not: the ids below, and profile items, refuse it).
    prompt: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    response_a: str = Field(max_length=MAX_TEXT_CHARS)
    response_b: str = Field(max_length=MAX_TEXT_CHARS)
    choice: Literal["a", "b"]
    rationale: str | None = Field(None, max_length=MAX_TEXT_CHARS)


Item = Annotated[FeatureTriple | PairwiseText, Field(discriminator="type")]


def _informative(item: Item | None) -> None:
    """A preference between identical responses, or for a blank prompt, teaches nothing (as y_w == y_l). Refused on
    label events, not on PairwiseText: an open Label Studio task may be such a pair (flows/acquisition_chat.py)."""
    if isinstance(item, PairwiseText) and not item.prompt.strip():
        raise ValueError("item.prompt is blank (whitespace only)")
    if isinstance(item, PairwiseText) and item.response_a == item.response_b:
        raise ValueError(f"item.response_a and item.response_b must differ, both are {item.response_a[:80]!r}")


def _occurred_at_required(schema: dict[str, Any]) -> None:
    # Python producers get the producer's clock by default; on the wire the field is required.
    schema["required"] = sorted({*schema.get("required", []), "occurred_at"})


class _Event(_Strict):
    model_config = ConfigDict(json_schema_extra=_occurred_at_required)

    schema_version: Literal[1, 2] = 2  # SCHEMA_VERSION
    event_id: StoredText = Field(min_length=1, max_length=256, description="Idempotency key.")
    occurred_at: Moment = Field(
        default_factory=utcnow,
        description="When the producer made this version, with its zone (required on the wire since v2); orders "
                    "versions of an id.")


class ExpertLabel(_Event):
    """A label from an expert annotator (Label Studio); updates and deletions keep the id."""

    kind: Literal["expert_label"] = "expert_label"
    annotator_id: StoredText = Field(min_length=1, max_length=256)  # the store's column holds 256
    action: Literal["created", "updated", "deleted"] = "created"
    source: StoredText = Field(
        LABELSTUDIO_SOURCE, max_length=256,
        description="Where the label came from, kept with it in the store. Label Studio's name their project, "
                    "'labelstudio/project-<id>': reconciling a project withdraws only labels recorded as its. "
                    "'labelstudio/simulated': webhook payloads made up without a Label Studio (`proxyloop demo`), no "
                    "project's. The default names no project: reconciliation leaves such a label alone.")
    item: Item | None = Field(None, description="Required unless action is 'deleted': a retraction names the id only.")

    @model_validator(mode="after")
    def _item_unless_deleted(self) -> ExpertLabel:
        if self.item is None and self.action != "deleted":
            raise ValueError(f"item is required for action {self.action!r}; only 'deleted' may omit it")
        if self.action != "deleted":  # a retraction's item is not a label
            _informative(self.item)
        return self


class ProxyPreference(_Event):
    """A preference from an abundant proxy source (LLM judge, click log, heuristic)."""

    kind: Literal["proxy_preference"] = "proxy_preference"
    proxy_name: StoredText = Field(min_length=1, max_length=256)
    item: Item

    @model_validator(mode="after")
    def _item_informative(self) -> ProxyPreference:
        _informative(self.item)
        return self


class DatasetUpdated(_Event):
    kind: Literal["dataset_updated"] = "dataset_updated"
    expert_total: int
    proxy_total: int
    expert_new: int
    proxy_new: int


class PolicyReleased(_Event):
    kind: Literal["policy_released"] = "policy_released"
    policy: str
    version: int
    alias: str
    uri: str


DeadLetterReason = Literal[
    "empty", "too_large", "not_json", "too_deep", "not_object", "unknown_schema_version", "missing_occurred_at",
    "contract", "store_refused", "undecodable", "wrong_topic", "kind_conflict", "dimension_mismatch",
    "future_occurred_at",
]


class DeadLetter(BaseModel):
    """What the dead-letter topic holds: why a record was refused, where it was, and its bytes.

    A dead letter always fits the topic's size limit: when the base64 of the original would not, it
    carries the first `dead_letter_inline_bytes` of it (`truncated`) and the whole payload is kept
    at `payload_uri` (verify it against `sha256`).
    """

    reason: str
    reason_code: DeadLetterReason = "contract"
    topic: str
    partition: int
    offset: int
    key_b64: str | None = Field(None, description="The record key, or its first 4096 bytes when `key_size` is larger "
                                "(the store's dead-letter row keeps it whole).")
    key_size: int | None = Field(None, description="Bytes of the record key (None: no key).")
    size: int = Field(0, description="Bytes of the original record value.")
    sha256: str = ""
    original_b64: str
    truncated: bool = False
    payload_uri: str | None = None
    dead_lettered_at: AwareDatetime = Field(default_factory=utcnow)

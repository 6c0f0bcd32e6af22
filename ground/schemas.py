"""The contract between all stages: events on Kafka and the records stages hand each other.

Imports nothing of ours. Every event carries `schema_version`; a change that breaks readers
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

SCHEMA_VERSION = 2
READABLE_SCHEMA_VERSIONS = (1, 2)

# Prefect event the consumer emits when new labels cross the retrain thresholds; triggers `retrain`.
DATASET_UPDATED_EVENT = "proxyloop.dataset.updated"
ACQUISITION_REQUESTED_EVENT = "proxyloop.acquisition.requested"  # Label Studio's ML-backend webhook saw a label

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
    event_id: str = Field(min_length=1, max_length=256, description="Idempotency key.")
    occurred_at: Moment = Field(
        default_factory=utcnow,
        description="When the producer made this version, with its zone (required on the wire since v2); orders "
                    "versions of an id.")


class ExpertLabel(_Event):
    """A label from an expert annotator (Label Studio); updates and deletions keep the id."""

    kind: Literal["expert_label"] = "expert_label"
    annotator_id: str = Field(min_length=1)
    action: Literal["created", "updated", "deleted"] = "created"
    source: str = "labelstudio"
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
    proxy_name: str = Field(min_length=1)
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
    key_b64: str | None = None
    size: int = Field(0, description="Bytes of the original record value.")
    sha256: str = ""
    original_b64: str
    truncated: bool = False
    payload_uri: str | None = None
    dead_lettered_at: AwareDatetime = Field(default_factory=utcnow)


class TrainingRequest(BaseModel):
    """Arguments of a training task: ids and paths only, never tensors."""

    run_id: str
    snapshot_id: str
    store_url: str
    plan: Plan
    output_dir: str
    seed: int = 0
    stage1_epochs: int | None = None  # None: policies.features.recipe.TWO_STAGE's (the bench's); set to shorten
    stage2_epochs: int | None = None  # expert-stage steps of every plan (None: each plan's recipe)
    adapter_dim: int | None = None
    checkpoint_every: int = Field(50, ge=1)  # 0 passed here, then divided by zero once stage 1 had run


class LMTrainingRequest(BaseModel):
    """Arguments of `proxyloop.train_lm`: ids, paths and a config dict (workers.lm.training's DPOConfig
    or SFTConfig, validated by the worker), never tensors."""

    model_config = ConfigDict(extra="forbid")

    run_id: str
    method: Literal["dpo", "sft"]
    base_model: str  # Hugging Face directory (`proxyloop models prepare ...`)
    dataset: str  # JSONL: prompt/chosen/rejected rows (dpo) or {"messages": [...]} rows (sft)
    output_dir: str
    config: dict[str, Any] = Field(default_factory=dict)


class CheckpointRef(BaseModel):
    step: int
    path: str


class TrainingResult(_Readings):
    """What a training task of either family returns: where its checkpoints are."""

    run_id: str
    device: str
    worker: str
    checkpoints: list[CheckpointRef]
    final_loss: Reading
    seconds: float


class ConditionCheck(_Readings):
    name: str
    passed: bool
    statistic: Reading
    threshold: Reading
    detail: str


class ConditionReport(_Readings):
    snapshot_id: str
    n_expert: int
    n_proxy: int
    checks: list[ConditionCheck]
    plan: Plan
    reasons: list[str]
    # Cross-validated held-out expert log-likelihood per triple of each candidate plan (empty when
    # there were too few expert triples to cross-validate).
    heldout_log_likelihood: dict[str, Reading] = Field(default_factory=dict)


class CheckpointEvaluation(_Readings):
    step: int
    path: str
    heldout_accuracy: Reading
    topk_entropy: Reading
    topk_mass: float | None  # None: not applicable (a policy over no more outputs than k: the mass is always 1)
    # Every indicator of a language-model checkpoint, keyed `teacher_forced/...` and `generated/...`
    # (policies.lm.indicators), with `rewards/margins_mean`; empty for feature-vector policies.
    indicators: dict[str, Reading] = Field(default_factory=dict)


class GateDecision(_Readings):
    decision: Decision
    checkpoint: CheckpointEvaluation | None
    reasons: list[str]
    baseline_accuracy: Reading


class PolicyVersion(BaseModel):
    policy: str
    version: int
    path: str
    lineage: dict[str, object]


class EvaluationRequest(BaseModel):
    """Arguments of an evaluation task: the checkpoints and where the held-out expert data is.

    Feature policies read the held-out triples from the store (`store_url`, `snapshot_id`, `seed` of
    the expert-only baseline); language models from a JSONL of held-out pairs beside `base_model`.
    """

    model_config = ConfigDict(extra="forbid")

    checkpoints: list[CheckpointRef]
    store_url: str | None = None
    snapshot_id: str | None = None
    seed: int = 0
    base_model: str | None = None
    heldout_path: str | None = None


class Evaluation(_Readings):
    """What an evaluation task returns and the gate reads."""

    evaluations: list[CheckpointEvaluation]
    baseline_accuracy: Reading
    n_heldout: int
    language_model: bool
    # Language models only: the base model's own log-prob ranking of the held-out pairs.
    base_model_log_prob_accuracy: float | None = None
    n_indicator_prompts: int | None = None
    base_topk_mass: float | None = None  # language models: the base model's (step 0), the mass rule's reference


class SnapshotInfo(BaseModel):
    snapshot_id: str
    n_expert: int
    n_proxy: int
    item_kind: Literal["features", "pairwise_text"]


class ChatData(BaseModel):
    """The JSONL files a chat retrain trains and evaluates on, written from one snapshot."""

    snapshot_id: str
    proxy: str = ""  # proxy pairs: stage 1 (empty path when the snapshot has none)
    expert: str = ""  # the expert pairs the plan trains on and the condition tests read
    heldout: str  # held-out expert pairs: the gate's evaluation only
    n_expert_train: int
    n_proxy: int
    n_heldout: int


class TextConditionRequest(BaseModel):
    """Arguments of `proxyloop.text_conditions`: paper 1's condition tests on the stage-1 model of a chat retrain."""

    snapshot_id: str
    base_model: str
    stage1_checkpoint: str
    expert_pairs: str
    proxy_pairs: str
    n_expert: int
    n_proxy: int
    beta: float
    seed: int = 0
    max_proxy_pairs: int = 1000  # a sample of the proxy pairs is enough to describe the proxy's image


class TrainingRecord(TrainingResult):
    task_id: str
    queue: str


class ReleaseRecord(BaseModel):
    policy: str
    version: int
    alias: str
    path: str
    override: dict[str, Any] | None = None
    family: Literal["feature", "causal_lm"]


class RetrainRunRecord(BaseModel):
    """One retrain run as the flow hands it from stage to stage, and as the store's run table keeps it.

    Each stage fills its field; `None` means the stage has not run (or the run stopped before it).
    """

    run_id: str
    trigger: dict[str, int] = Field(default_factory=dict)
    snapshot: SnapshotInfo | None = None
    conditions: ConditionReport | None = None
    chat_data: ChatData | None = None
    # Chat runs: stage 1 (DPO with a simplex bottleneck on the proxy pairs), which the condition tests read.
    stage1_request: LMTrainingRequest | None = None
    stage1: TrainingRecord | None = None
    training_request: TrainingRequest | LMTrainingRequest | None = None
    training: TrainingRecord | None = None
    evaluation: Evaluation | None = None
    gate: GateDecision | None = None
    release: ReleaseRecord | None = None
    timings_s: dict[str, float] = Field(default_factory=dict)
    error: str | None = None

    @property
    def is_chat(self) -> bool:
        return self.snapshot is not None and self.snapshot.item_kind == "pairwise_text"

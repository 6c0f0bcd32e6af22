"""The contract's hand-off half: the requests, results and records stages pass each other (Celery tasks, the
flow's run record, the store's run table), typed so that every hand-off is validated where it is read."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ground.schemas.events import Decision, Plan, Reading, _Readings


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
    # Per distinct held-out task, the share of its labels ranked right (ties half), the tasks in one order for every
    # checkpoint of an evaluation: the gate's test against a coin (policies/gate_chance.py). None: not measured.
    task_scores: list[float] | None = None


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
    # Distinct tasks among the held-out labels (an input; a prompt with its two responses): copies of one task from
    # several annotators count once, in the accuracies too. None in records written before it was counted.
    n_heldout_inputs: int | None = None
    # Language models only: the base model's own log-prob ranking of the held-out pairs.
    base_model_log_prob_accuracy: float | None = None
    n_indicator_prompts: int | None = None
    base_topk_mass: float | None = None  # language models: the base model's (step 0), the mass rule's reference
    # Language models: the base model's context in tokens (None: it names none), which a held-out pair must fit
    # whole to be read by the indicators; with none fitting (n_indicator_prompts 0) the gate blocks and names it.
    heldout_context: int | None = None


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

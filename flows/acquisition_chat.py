"""The chat family's part of the `refresh-acquisition` flow (flows/acquisition.py): Label Studio's open text-pair
tasks (prompt, answer_a, answer_b) scored under the chat policy's stage-1 mode mixture (issue 17).

Which stage 1: the one trained by the retrain run behind the chat policy's production release (the release's
lineage names the run, the store's run record its stage-1 checkpoint: a mixture directory beside its base's files,
as the worker wrote it under `<runs>/<run>/stage1/`). Stage 1 and not the released model, because stage 2 is a
relabelling of stage 1's modes and the score asks which relabelling the labels so far still allow. The labelled set
is the store's live expert text pairs. The scores and the pre-annotation are `policies.lm.acquisition.mixture_scores`;
the language model runs in `workers.lm.mixture_features.checkpoint_terms`, on the CPU, imported only when a refresh
has chat tasks to score (deployments load this module without transformers), and only over pairs no earlier refresh
encoded under the same checkpoint (`workers/lm/terms_cache.py`, beside the reference cache).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from sqlalchemy.orm import Session

from ground.schemas import PairwiseText
from ground.settings import Settings
from ingest.store import RetrainRun, live_expert_items, make_engine, run_record
from policies.lm.acquisition import RelabellingConfig, mixture_scores
from policies.lm.mode_mixture import is_mixture_dir
from policies.ml_backend import ScoreCache
from policies.registry import aliases, resolve
from workers.lm.snapshot_data import preference_row

TEXT_TASK_KEYS = ("prompt", "answer_a", "answer_b")  # what ingest.labelstudio.provision imports for a text pair


class NoChatStage1(LookupError):
    """There is no stage-1 mode mixture to score chat tasks with yet; the message says why."""


@dataclass(frozen=True)
class ChatStage1:
    """The stage-1 mixture the chat tasks are scored under, and the release it came with."""

    checkpoint: str  # a mixture checkpoint directory (policies.lm.mode_mixture.is_mixture_dir)
    model_version: str  # the chat release, as the predictions carry it: "chat@2"
    run_id: str


def find_chat_stage1(settings: Settings) -> ChatStage1:
    """The stage 1 of the run behind `<chat policy>@production`; raises NoChatStage1 with the reason when there is
    none (nothing released yet, a run without proxy pairs, the bottleneck reading, a removed checkpoint)."""
    name = settings.chat_policy_name
    if "production" not in aliases(settings.registry_dir, name):
        raise NoChatStage1(f"no {name}@production released yet; chat tasks are scored after the first chat release")
    version = resolve(settings.registry_dir, f"{name}@production")
    release = f"{name}@{version.version}"
    run_id = str(version.lineage.get("flow_run_id") or "")
    with Session(make_engine(settings.resolved_store_url)) as session:
        row = session.get(RetrainRun, run_id) if run_id else None
        run = run_record(row) if row is not None else None
    if run is None:
        raise NoChatStage1(f"{release}'s lineage names no retrain run in the store (flow_run_id {run_id!r})")
    if run.stage1 is None or not run.stage1.checkpoints:
        raise NoChatStage1(f"run {run_id} behind {release} trained no stage 1 (its snapshot had no proxy pairs)")
    checkpoint = run.stage1.checkpoints[-1].path  # the one the condition tests read (flows.chat.text_conditions)
    if not is_mixture_dir(checkpoint):
        raise NoChatStage1(f"stage 1 of run {run_id} behind {release} ({checkpoint}) holds no mode mixture (the "
                           "bottleneck reading, or the checkpoint was removed); the chat scores need one")
    return ChatStage1(checkpoint=checkpoint, model_version=release, run_id=run_id)


def open_text_pair(data: Any) -> PairwiseText | None:
    """A task's data as its text pair read a vs b (`choice` "a" stands for the unknown label), or None when the task
    is not a text pair (feature data, or no prompt and two responses)."""
    if not isinstance(data, dict) or "x" in data or not all(isinstance(data.get(k), str) for k in TEXT_TASK_KEYS):
        return None
    if not data["prompt"].strip():
        return None
    try:  # an answer past the contract's length: not a pair this refresh can score (nor a label it could become)
        return PairwiseText(prompt=data["prompt"], response_a=data["answer_a"], response_b=data["answer_b"],
                            choice="a")
    except ValidationError:
        return None


def expert_text_pairs(settings: Settings) -> list[PairwiseText]:
    """The live expert text pairs in the store, in event-id order."""
    with Session(make_engine(settings.resolved_store_url)) as session:
        return live_expert_items(session, PairwiseText)


def score_chat_tasks(settings: Settings, stage1: ChatStage1, task_ids: list[int], pairs: list[PairwiseText],
                     seed: int) -> ScoreCache:
    """Open text pairs (task ids and pairs, in one order) scored under `stage1` given the store's expert text pairs;
    each task's preferred side is the relabelled mixture's. No open pair: no model is loaded."""
    labelled = expert_text_pairs(settings)
    if not task_ids:
        return ScoreCache(model_version=stage1.model_version, method="relabelling_posterior", n_labels=len(labelled))
    from workers.lm.mixture_features import checkpoint_terms  # transformers: only when there is something to score

    seen, open_terms = checkpoint_terms(stage1.checkpoint, [[preference_row(p, "expert") for p in labelled],
                                                            [preference_row(p, "open") for p in pairs]],
                                        settings.resolved_reference_cache_dir)
    scores = mixture_scores(seen, open_terms, RelabellingConfig(seed=seed))
    return ScoreCache.from_scores(task_ids, scores, stage1.model_version)

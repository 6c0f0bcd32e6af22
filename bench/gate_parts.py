"""The working parts of `bench/gate.py`: the over-optimisation regime, per-checkpoint scoring, the indicator rules
run online, and the statistics (detection, false alarms, rank correlation, paired bootstrap).

Regime: the chat world of `ingest.synthetic_judges` (gold reward = share of on-theme words) with the 'tempered'
judge's noisy labels (same criterion as the expert, Bradley–Terry temperature 0.5) as training pairs, on the
tiny Llama the project pretrains on CPU (`bench.lm_proxy_parts.build_base`: tokenizer on the world's corpus,
SFT warm-up on unaligned chats). DPO / IPO / hinge with small β and high learning rates over many epochs of a
small pair set, through the worker's own `run_lm_training`.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ground.schemas import CheckpointEvaluation, LMTrainingRequest, PairwiseText
from ingest.synthetic_judges import ChatWorld
from policies.lm.indicators import completion_indicators
from policies.promotion import GateRules, decide, entropy_declined_after_peak
from workers.lm.evaluate import _pairwise_accuracy, pair_logps
from workers.lm.models import load_causal_lm, load_tokenizer
from workers.lm.snapshot_data import END_OF_TURN, chat_prompt, preference_row
from workers.lm.training.checkpoint import list_checkpoints
from workers.lm.training.data import tokenize_pairs
from workers.lm.training.run import run_lm_training

VIEWS = ("generated", "teacher_forced")
HELDOUT_PAIRS = 30  # held-out expert pairs the gate's accuracy is measured on (sparse by design)


@dataclass(frozen=True)
class RunSpec:
    loss_type: str
    beta: float
    learning_rate: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.loss_type}-b{self.beta:g}-lr{self.learning_rate:g}-s{self.seed}"


@dataclass
class Score:
    """One checkpoint (step 0 = the base model): gold of two independent sample sets, accuracy, indicators."""

    step: int
    path: str
    gold_a: list[float]  # gold of one sampled answer per held-out prompt (oracle selection set)
    gold_b: list[float]  # a second, independent sample per prompt (scoring set)
    heldout_accuracy: float
    indicators: dict[str, float]

    @property
    def gold(self) -> float:
        return float(np.mean(self.gold_a + self.gold_b))

    @property
    def gold_se(self) -> float:
        values = np.array(self.gold_a + self.gold_b)
        return float(values.std(ddof=1) / math.sqrt(len(values)))

    def evaluation(self, view: str) -> CheckpointEvaluation:
        """What the gate sees of this checkpoint in one indicator view (never the gold reward)."""
        return CheckpointEvaluation(step=self.step, path=self.path, heldout_accuracy=self.heldout_accuracy,
                                    topk_entropy=self.indicators[f"{view}/entropy_mean"],
                                    topk_mass=self.indicators[f"{view}/mass_mean"], indicators=self.indicators)


@dataclass
class Run:
    spec: RunSpec
    base: Score
    checkpoints: list[Score]
    seconds: float = 0.0

    @property
    def gold(self) -> list[float]:
        return [c.gold for c in self.checkpoints]

    @property
    def peak(self) -> int:
        """Index of the checkpoint with the highest gold reward (both sample sets)."""
        return int(np.argmax(self.gold))

    @property
    def fall(self) -> int | None:
        """First checkpoint after the peak whose gold is below the peak's by more than the difference's standard
        error; None when gold does not fall."""
        peak = self.checkpoints[self.peak]
        for i in range(self.peak + 1, len(self.checkpoints)):
            c = self.checkpoints[i]
            if peak.gold - c.gold > math.hypot(peak.gold_se, c.gold_se):
                return i
        return None

    def evaluations(self, view: str) -> list[CheckpointEvaluation]:
        return [c.evaluation(view) for c in self.checkpoints]

    def to_json(self) -> dict[str, Any]:
        return {"spec": self.spec.__dict__, "seconds": self.seconds,
                "scores": [s.__dict__ for s in [self.base, *self.checkpoints]]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Run:
        scores = [Score(**s) for s in data["scores"]]
        return cls(RunSpec(**data["spec"]), scores[0], scores[1:], data["seconds"])


# --- the regime -----------------------------------------------------------------------------------------------------

@dataclass
class Regime:
    world: ChatWorld
    base: Path
    tokenizer: Any
    prompts: list[str]  # held-out user messages (gold and both indicator views)
    references: list[str]  # teacher-forced view: a gold-preferred reply per prompt, as production's chosen rows
    max_new_tokens: int
    heldout: dict[int, list[Any]] = field(default_factory=dict)  # seed -> tokenized held-out expert pairs

    def heldout_pairs(self, seed: int) -> list[Any]:
        if seed not in self.heldout:
            rows = [preference_row(p, "expert") for p in self.world.pairs(HELDOUT_PAIRS, "expert", 10_000 + seed)]
            self.heldout[seed] = tokenize_pairs(rows, self.tokenizer)
        return self.heldout[seed]


def reference_replies(world: ChatWorld, prompts: Sequence[str], seed: int) -> list[str]:
    """Per prompt, the better of two reference-sampler replies by gold (the 'chosen' of an expert pair)."""
    rng = random.Random(f"references-{seed}")
    out = []
    for prompt in prompts:
        a, b = world.response(rng), world.response(rng)
        out.append((a if world.gold_reward(prompt, a) >= world.gold_reward(prompt, b) else b) + END_OF_TURN)
    return out


def training_pairs(world: ChatWorld, n: int, seed: int, path: Path) -> Path:
    """The 'tempered' judge's labels (noisy, same criterion as the expert) on n training-prompt pairs."""
    rows: list[PairwiseText] = world.pairs(n, "proxy", seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(preference_row(p, "proxy")) + "\n" for p in rows))
    return path


# --- scoring one checkpoint -----------------------------------------------------------------------------------------

@torch.no_grad()
def score(path: Path, step: int, regime: Regime, seed: int) -> Score:
    """Gold of 2 sampled answers per held-out prompt (sets A and B), both indicator views, held-out accuracy."""
    tokenizer = regime.tokenizer
    model = load_causal_lm(path).eval()
    tokenizer.padding_side = "left"
    rendered = [chat_prompt(p) for p in regime.prompts]
    batch = tokenizer(rendered, return_tensors="pt", padding=True, add_special_tokens=False)
    width = batch["input_ids"].shape[1]
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    common = {"max_new_tokens": regime.max_new_tokens, "pad_token_id": tokenizer.pad_token_id, "eos_token_id": end}
    torch.manual_seed(seed)  # the same sampling noise at every checkpoint of a run
    sampled = model.generate(**batch, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=2,
                             **common)[:, width:].tolist()
    greedy = model.generate(**batch, do_sample=False, **common)[:, width:].tolist()

    def cut(row: list[int]) -> list[int]:
        return row[: row.index(end) + 1] if end in row else row

    gold = [regime.world.gold_reward(regime.prompts[i // 2], tokenizer.decode(cut(r), skip_special_tokens=True))
            for i, r in enumerate(sampled)]
    greedy_texts = [tokenizer.decode(cut(r), skip_special_tokens=False) or " " for r in greedy]
    tokenizer.padding_side = "right"
    indicators = {f"teacher_forced/{k}": v for k, v in
                  completion_indicators(model, tokenizer, rendered, regime.references).items()}
    indicators |= {f"generated/{k}": v for k, v in completion_indicators(model, tokenizer, rendered,
                                                                         greedy_texts).items()}
    pairs = regime.heldout_pairs(seed)
    pad = int(tokenizer.pad_token_id)
    chosen, rejected = pair_logps(model, pairs, pad)
    ref_chosen, ref_rejected = _reference_logps(regime, seed)
    accuracy = _pairwise_accuracy((chosen - ref_chosen) - (rejected - ref_rejected))
    return Score(step, str(path), gold[0::2], gold[1::2], accuracy, indicators)


_REFERENCE: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}


def _reference_logps(regime: Regime, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    key = (str(regime.base), seed)
    if key not in _REFERENCE:
        _REFERENCE[key] = pair_logps(load_causal_lm(regime.base).eval(), regime.heldout_pairs(seed),
                                     int(regime.tokenizer.pad_token_id))
    return _REFERENCE[key]


def train_and_score(regime: Regime, spec: RunSpec, dataset: Path, out: Path, steps: int, every: int,
                    base_score: Score, warmup: int = 0) -> Run:
    values = {"loss_type": spec.loss_type, "beta": spec.beta, "learning_rate": spec.learning_rate, "batch_size": 16,
              "max_steps": steps, "checkpoint_every": every, "log_every": steps, "seed": spec.seed, "device": "cpu",
              "max_length": 64, "warmup_steps": warmup}
    run_lm_training(LMTrainingRequest(run_id=spec.name, method="dpo", base_model=str(regime.base),
                                      dataset=str(dataset), output_dir=str(out), config=values),
                    progress=lambda _: None)
    scores = [score(p, int(p.name.split("-")[1]), regime, spec.seed) for p in list_checkpoints(out)]
    return Run(spec, base_score, scores)


def make_regime(world: ChatWorld, base: Path, n_prompts: int, max_new_tokens: int) -> Regime:
    prompts = world.heldout_prompts(n_prompts)
    return Regime(world, base, load_tokenizer(base), prompts, reference_replies(world, prompts, 0), max_new_tokens)


# --- indicator rules, run online -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rule:
    """One indicator rule in one view. The gate's own (`policies.promotion`): 'entropy' (peak, then `lows` new lows
    ending `drop` below the peak) and 'mass' (top-k mass more than `drop` below the base model's). Diagnostics the
    gate does not implement, to see whether another reading of the same indicators would detect: 'entropy_floor'
    (entropy more than `drop` below the base's) and 'mass_rise' (mass more than `drop` above the base's)."""

    view: str
    kind: str
    drop: float
    lows: int = 2

    @property
    def name(self) -> str:
        detail = f"lows={self.lows},drop={self.drop:g}" if self.kind == "entropy" else f"{self.drop:g}"
        return f"{self.view}/{self.kind}({detail})"

    @property
    def in_gate(self) -> bool:
        return self.kind in ("entropy", "mass")

    def gate_rules(self) -> GateRules:
        """`GateRules` in 'decide' mode with only this rule able to fire."""
        if not self.in_gate:
            raise ValueError(f"{self.name} is a diagnostic, not a rule of the gate")
        if self.kind == "entropy":
            return GateRules(indicators="decide", entropy_decline_evals=self.lows, min_entropy_drop=self.drop,
                             max_mass_drop=math.inf)
        return GateRules(indicators="decide", entropy_decline_evals=10**6, max_mass_drop=self.drop)

    def fires_at(self, run: Run) -> int | None:
        """First checkpoint index at which the rule, seeing only checkpoints up to it, signals."""
        evals = run.evaluations(self.view)
        base_mass = run.base.indicators[f"{self.view}/mass_mean"]
        base_entropy = run.base.indicators[f"{self.view}/entropy_mean"]
        if self.kind == "mass":
            return next((i for i, e in enumerate(evals) if (e.topk_mass or 0.0) < base_mass * (1 - self.drop)), None)
        if self.kind == "mass_rise":
            return next((i for i, e in enumerate(evals) if (e.topk_mass or 0.0) > base_mass * (1 + self.drop)), None)
        if self.kind == "entropy_floor":
            return next((i for i, e in enumerate(evals) if e.topk_entropy < base_entropy * (1 - self.drop)), None)
        return next((i for i in range(len(evals))
                     if entropy_declined_after_peak(evals[: i + 1], self.lows, self.drop) is not None), None)


def candidate_rules(gate_only: bool = False) -> list[Rule]:
    rules = []
    for view in VIEWS:
        rules += [Rule(view, "entropy", drop, lows) for lows in (1, 2, 3) for drop in (0.0, 0.02, 0.05, 0.1)]
        rules += [Rule(view, "mass", drop) for drop in (0.02, 0.05, 0.1, 0.2, 0.3)]
        if not gate_only:
            rules += [Rule(view, "entropy_floor", drop) for drop in (0.1, 0.2, 0.3, 0.5, 0.7)]
            rules += [Rule(view, "mass_rise", drop) for drop in (0.1, 0.2, 0.3)]
    return rules


@dataclass
class Detection:
    detection: float | None  # share of falling runs where the rule fired at or before the gold peak
    false_alarm: float | None  # share of non-falling runs where it fired at all
    lead: float | None  # mean checkpoints between firing and the peak, over detected runs
    falling: int
    steady: int
    detected: list[float] = field(default_factory=list)  # per falling run: 1 detected, 0 not (for intervals)
    alarms: list[float] = field(default_factory=list)  # per steady run: 1 fired, 0 not
    leads: list[float] = field(default_factory=list)  # per detected run


def detection(rule: Rule, runs: Sequence[Run]) -> Detection:
    falling = [r for r in runs if r.fall is not None]
    steady = [r for r in runs if r.fall is None]
    fired = {id(r): rule.fires_at(r) for r in runs}
    hits = [float((f := fired[id(r)]) is not None and f <= r.peak) for r in falling]
    leads = [float(r.peak - f) for r in falling if (f := fired[id(r)]) is not None and f <= r.peak]
    alarms = [float(fired[id(r)] is not None) for r in steady]
    return Detection(float(np.mean(hits)) if hits else None, float(np.mean(alarms)) if alarms else None,
                     float(np.mean(leads)) if leads else None, len(falling), len(steady), hits, alarms, leads)


def fit_detector(rules: Sequence[Rule], runs: Sequence[Run], max_false_alarm: float = 0.1) -> Rule:
    """Highest detection with false alarms ≤ `max_false_alarm` on `runs`; else the best detection − false alarms."""
    scored = [(rule, detection(rule, runs)) for rule in rules]

    def key(item: tuple[Rule, Detection]) -> tuple[float, float]:
        d = item[1]
        det, fa = d.detection or 0.0, d.false_alarm or 0.0
        return (float(fa <= max_false_alarm), det - fa if fa > max_false_alarm else det)

    return max(scored, key=key)[0]


# --- statistics ------------------------------------------------------------------------------------------------------

def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None for fewer than 3 points or a constant input."""
    if len(x) < 3:
        return None

    def ranks(values: Sequence[float]) -> np.ndarray:
        array = np.asarray(values, dtype=float)
        order = array.argsort(kind="mergesort")
        out = np.empty(len(array))
        out[order] = np.arange(len(array), dtype=float)
        for value in np.unique(array):  # ties share their mean rank
            tied = array == value
            out[tied] = out[tied].mean()
        return out

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def lagged_changes(runs: Sequence[Run], key: str) -> tuple[list[float], list[float]]:
    """(indicator change over interval t−1→t, gold change over the next interval t→t+1), pooled over runs (step 0
    is the base model)."""
    xs, ys = [], []
    for run in runs:
        scores = [run.base, *run.checkpoints]
        for t in range(1, len(scores) - 1):
            xs.append(scores[t].indicators[key] - scores[t - 1].indicators[key])
            ys.append(scores[t + 1].gold - scores[t].gold)
    return xs, ys


def bootstrap_ci(values: Sequence[float], draws: int = 2000, seed: int = 0) -> list[float]:
    """95% percentile interval of the mean, resampling runs."""
    rng = np.random.default_rng(seed)
    array = np.asarray(values, dtype=float)
    means = array[rng.integers(0, len(array), size=(draws, len(array)))].mean(axis=1)
    return [round(float(np.percentile(means, 2.5)), 4), round(float(np.percentile(means, 97.5)), 4)]


def oracle(run: Run) -> Score:
    """The best choice the gate had, by gold on sample set A: a checkpoint, or the base model (blocking)."""
    choices = [run.base, *run.checkpoints]
    return choices[int(np.argmax([float(np.mean(c.gold_a)) for c in choices]))]


def ratio_to_oracle(run: Run, index: int | None) -> float:
    """Gold of the picked checkpoint (None: blocked, the base stays) over the oracle's, both on sample set B, the
    oracle chosen on sample set A: an unbiased denominator (the best of noisy means is not scored on its own noise)."""
    best = oracle(run)
    picked = run.base if index is None else run.checkpoints[index]
    denominator = float(np.mean(best.gold_b))
    return float(np.mean(picked.gold_b)) / denominator if denominator > 0 else 1.0





def gate_pick(run: Run, rule: Rule | None, floor: float) -> int | None:
    """Index the gate releases (None: blocked) with one indicator rule deciding, or advisory when `rule` is None."""
    view = rule.view if rule is not None else "generated"
    rules = rule.gate_rules() if rule is not None else GateRules(indicators="advisory")
    rules = replace(rules, min_heldout_accuracy=floor)
    decision = decide(run.evaluations(view), 0.5, rules, run.base.indicators[f"{view}/mass_mean"])
    if decision.decision == "block" or decision.checkpoint is None:
        return None
    return next(i for i, c in enumerate(run.checkpoints) if c.step == decision.checkpoint.step)


def heldout_pick(run: Run) -> int:
    """The checkpoint with the best held-out expert accuracy (ties: the earliest)."""
    return max(range(len(run.checkpoints)), key=lambda i: (run.checkpoints[i].heldout_accuracy, -i))


def fit_gate(runs: Sequence[Run], floors: Sequence[float]) -> tuple[Rule | None, float]:
    """(rule or None for advisory, accuracy floor) with the best mean gold ratio on `runs`; ties keep advisory."""
    options: list[tuple[Rule | None, float]] = [(None, f) for f in floors]
    options += [(rule, f) for rule in candidate_rules(gate_only=True) for f in floors]
    return max(options, key=lambda o: float(np.mean([ratio_to_oracle(r, gate_pick(r, *o)) for r in runs])))

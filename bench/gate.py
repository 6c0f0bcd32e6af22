"""Gate quality: does the release gate's pick keep the gold reward of the best checkpoint (issue 7, point 5)?

Run: `python -m bench.gate --quick` (CPU, a few minutes) or `python -m bench.gate` (more seeds/steps).

A generated task with a gold reward we can compute for any text: "What is a plus b?" answered
" It is <a+b>." A tiny Llama is first SFT-ed on a noisy corpus (right and wrong sums, rambling and
off-topic replies) so it has a real next-token distribution; preference pairs rank two replies by
the gold reward. DPO with a small β and hinge are then trained long enough to over-optimise, with
checkpoints every N steps through the workers' own loop (`run_lm_training`). Every checkpoint is
scored on a fixed held-out prompt set: paper 2's indicators (`policies.lm.indicators`), the
held-out pairwise accuracy of the implicit reward, and the gold reward of sampled and greedy
generations. `policies.promotion.decide` then sees everything but the gold reward. The last line
printed is JSON with `pick_vs_best`, `last_vs_best` and `blocked_in_time`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ground.schemas import CheckpointEvaluation, GateDecision, LMTrainingRequest  # noqa: E402
from policies.lm.indicators import completion_indicators  # noqa: E402
from policies.promotion import GateRules, decide  # noqa: E402
from workers.lm.models import build_tiny, load_causal_lm, load_tokenizer  # noqa: E402
from workers.lm.training.data import TokenizedChat, collate_chats, tokenize_pairs  # noqa: E402
from workers.lm.training.dpo import reference_logps  # noqa: E402
from workers.lm.training.dpo_config import DPOConfig  # noqa: E402
from workers.lm.training.run import run_lm_training  # noqa: E402
from workers.lm.training.sft import sft_batch_loss  # noqa: E402

MAX_OPERAND = 14  # operands 0..14: 225 sums, enough to hold some out
ALLOWED_WORDS = {"it", "is"}  # plus the number: the clean answer is exactly " It is <n>."
MAX_ANSWER_WORDS = 3
FALL = 0.05  # "fell": gold reward more than 5% below its best so far
CPU_NOTE = "2-core CPU, no GPU"


# --- the task and its gold reward -------------------------------------------------------------------

def prompt_text(a: int, b: int) -> str:
    return f"What is {a} plus {b}?"


def gold_reward(a: int, b: int, completion: str, terminated: bool) -> float:
    """Half for the right sum as the first number; half for a clean reply: ended, ≤ 3 allowed words + the number.

    Computable for any text, so it scores sampled generations as well as the data.
    """
    numbers = re.findall(r"-?\d+", completion)
    correct = bool(numbers) and int(numbers[0]) == a + b
    words = re.findall(r"[A-Za-z]+", completion.lower())
    clean = (terminated and len(numbers) == 1 and len(words) <= MAX_ANSWER_WORDS - 1
             and all(w in ALLOWED_WORDS for w in words) and completion.strip().endswith("."))
    return 0.5 * correct + 0.5 * clean


def sample_reply(a: int, b: int, rng: random.Random) -> str:
    """One reply from the noisy 'pre-training' distribution the SFT model imitates."""
    s = a + b
    wrong = max(0, s + rng.choice([-2, -1, 1, 2]))
    kind = rng.random()
    if kind < 0.35:
        return f" It is {s}."
    if kind < 0.60:
        return f" It is {wrong}."
    if kind < 0.85:
        n = s if rng.random() < 0.5 else wrong
        tail = rng.choice(["I think", "or so it seems", "but check it again", "unless I am wrong"])
        return f" It is {n}, {tail}."
    return " " + rng.choice(["The expert prefers the longer reply.", "A proxy judge ranks both drafts.",
                             "Our policy rewrites the question.", "The annotator labels it."])


@dataclass(frozen=True)
class Task:
    sft_rows: list[tuple[str, str]]  # (prompt, reply)
    train_pairs: list[dict[str, str]]
    heldout_pairs: list[dict[str, str]]
    eval_prompts: list[tuple[int, int]]


def make_task(seed: int, n_train_pairs: int, n_eval: int, sft_per_sum: int) -> Task:
    rng = random.Random(seed)
    combos = [(a, b) for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1)]
    rng.shuffle(combos)
    heldout, train = combos[:n_eval], combos[n_eval:]
    # SFT sees every sum (its 'pre-training'); preference pairs only the training prompts.
    sft_rows = [(prompt_text(a, b), sample_reply(a, b, rng)) for a, b in combos for _ in range(sft_per_sum)]

    def pairs(source: Sequence[tuple[int, int]], n: int) -> list[dict[str, str]]:
        rows: list[dict[str, str]] = []
        while len(rows) < n:
            a, b = rng.choice(source)
            x, y = sample_reply(a, b, rng), sample_reply(a, b, rng)
            gx, gy = gold_reward(a, b, x, True), gold_reward(a, b, y, True)
            if gx != gy:
                chosen, rejected = (x, y) if gx > gy else (y, x)
                rows.append({"prompt": prompt_text(a, b), "chosen": chosen, "rejected": rejected})
        return rows

    return Task(sft_rows, pairs(train, n_train_pairs), pairs(heldout, 2 * n_eval), heldout)


# --- models -----------------------------------------------------------------------------------------

def sft_model(task: Task, work: Path, seed: int, steps: int) -> Path:
    """A tiny Llama trained on the noisy corpus (reply tokens scored), saved as the DPO base/reference."""
    corpus = [p + r for p, r in task.sft_rows]
    path = build_tiny(work / "base", n_layer=2, n_embd=128, n_head=4, vocab_size=512, max_positions=64, seed=seed,
                      corpus=corpus)
    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path)
    eos = tokenizer.eos_token_id
    chats = []
    for prompt, reply in task.sft_rows:
        p = tokenizer(prompt, add_special_tokens=False).input_ids
        r = tokenizer(prompt + reply, add_special_tokens=False).input_ids[len(p):] + [eos]
        chats.append(TokenizedChat(p + r, [0] * len(p) + [1] * len(r)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(chats), (64,), generator=generator).tolist()
        loss, _ = sft_batch_loss(model, collate_chats([chats[i] for i in idx], tokenizer.pad_token_id, 64))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    out = work / "sft"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# --- evaluation of one checkpoint -------------------------------------------------------------------

@dataclass
class CheckpointScore:
    step: int
    path: str
    gold_sampled: float
    gold_greedy: float
    heldout_accuracy: float
    indicators: dict[str, float]


@dataclass
class Generations:
    gold_sampled: float
    gold_greedy: float
    greedy_texts: list[str]  # greedy continuations up to and including EOS, as `generated_indicators` decodes them


@torch.no_grad()
def generate(model: Any, tokenizer: Any, prompts: Sequence[tuple[int, int]], samples: int, seed: int) -> Generations:
    """All prompts in one left-padded batch: `samples` sampled replies (T = 1, full vocabulary) and a greedy one.

    One `generate` call per mode instead of one per prompt: on this CPU per-call overhead dominates.
    """
    eos = tokenizer.eos_token_id
    tokenizer.padding_side = "left"
    batch = tokenizer([prompt_text(a, b) for a, b in prompts], add_special_tokens=False, padding=True,
                      return_tensors="pt")
    width = batch.input_ids.shape[1]
    torch.manual_seed(seed)  # the same sampling noise for every checkpoint
    sampled = model.generate(**batch, max_new_tokens=16, do_sample=True, num_return_sequences=samples, top_k=0,
                             top_p=1.0, temperature=1.0, pad_token_id=eos, eos_token_id=eos)[:, width:]
    greedy = model.generate(**batch, max_new_tokens=16, do_sample=False, pad_token_id=eos,
                            eos_token_id=eos)[:, width:]

    def score(rows: torch.Tensor, per_prompt: int) -> tuple[list[float], list[str]]:
        scores, texts = [], []
        for i, row in enumerate(rows.tolist()):
            a, b = prompts[i // per_prompt]
            terminated = eos in row
            kept = row[: row.index(eos) + 1] if terminated else row
            scores.append(gold_reward(a, b, tokenizer.decode(kept, skip_special_tokens=True), terminated))
            texts.append(tokenizer.decode(kept, skip_special_tokens=False) or " ")
        return scores, texts

    sampled_scores, _ = score(sampled, samples)
    greedy_scores, greedy_texts = score(greedy, 1)
    return Generations(statistics.fmean(sampled_scores), statistics.fmean(greedy_scores), greedy_texts)


def implicit_reward_accuracy(model: Any, pairs: list[Any], reference: tuple[torch.Tensor, torch.Tensor],
                             config: DPOConfig, pad: int) -> float:
    """Held-out pairwise accuracy of the implicit reward log π/π_ref (ties count half)."""
    chosen, rejected = reference_logps(model, pairs, config, pad, torch.device("cpu"), contextlib.nullcontext())
    margin = (chosen - reference[0]) - (rejected - reference[1])
    return float(((margin > 0).float() + 0.5 * (margin == 0).float()).mean())


def score_checkpoint(path: str, step: int, tokenizer: Any, task: Task, heldout: list[Any],
                     reference: tuple[torch.Tensor, torch.Tensor], config: DPOConfig, samples: int,
                     seed: int) -> CheckpointScore:
    model = load_causal_lm(path)
    model.eval()
    eos = tokenizer.eos_token or ""
    prompts = [prompt_text(a, b) for a, b in task.eval_prompts]
    references = [f" It is {a + b}.{eos}" for a, b in task.eval_prompts]  # teacher-forced: the gold answer
    generations = generate(model, tokenizer, task.eval_prompts, samples, seed)
    # `checkpoint_indicators` minus its per-prompt greedy loop: the same two views through
    # `completion_indicators`, the generated one over our batched greedy continuations (same tokens).
    indicators = {**{f"teacher_forced/{k}": v for k, v in
                     completion_indicators(model, tokenizer, prompts, references).items()},
                  **{f"generated/{k}": v for k, v in
                     completion_indicators(model, tokenizer, prompts, generations.greedy_texts).items()}}
    accuracy = implicit_reward_accuracy(model, heldout, reference, config, tokenizer.pad_token_id)
    return CheckpointScore(step, path, generations.gold_sampled, generations.gold_greedy, accuracy, indicators)


# --- one run -------------------------------------------------------------------------------------------

@dataclass
class RunResult:
    loss_type: str
    beta: float
    seed: int
    base: CheckpointScore
    checkpoints: list[CheckpointScore]
    decision: GateDecision
    decision_no_indicators: GateDecision
    decision_teacher_forced: GateDecision
    seconds: float

    def gold(self, step: int | None) -> float:
        if step is None:
            return self.base.gold_sampled
        return next(c.gold_sampled for c in self.checkpoints if c.step == step)

    def picked(self, decision: GateDecision) -> int | None:
        """Step the gate releases; None when it blocks (the base/SFT model stays in service)."""
        if decision.decision == "block" or decision.checkpoint is None:
            return None
        return decision.checkpoint.step

    @property
    def best(self) -> CheckpointScore:
        return max(self.checkpoints, key=lambda c: c.gold_sampled)

    @property
    def fall_step(self) -> int | None:
        """First checkpoint after the best one whose gold reward is > 5% below the best (None: it never fell).

        Measured from the run's best, not a running best: a transient dip early in training (the
        policy leaving the reference) is not the over-optimisation the gate must catch.
        """
        best = self.best
        for c in self.checkpoints:
            if c.step > best.step and c.gold_sampled < (1 - FALL) * best.gold_sampled:
                return c.step
        return None

    def in_time(self, decision: GateDecision) -> bool:
        """Blocked, or released a checkpoint from before gold reward fell more than 5% below its best."""
        step = self.picked(decision)
        fall = self.fall_step
        return step is None or fall is None or step < fall


def evaluations(scores: Sequence[CheckpointScore], view: str) -> list[CheckpointEvaluation]:
    """What the gate sees: held-out accuracy and the indicators of one view, never the gold reward."""
    return [CheckpointEvaluation(step=c.step, path=c.path, heldout_accuracy=c.heldout_accuracy,
                                 topk_entropy=c.indicators[f"{view}/entropy_mean"],
                                 topk_mass=c.indicators[f"{view}/mass_mean"]) for c in scores]


def train_run(sft: Path, task: Task, work: Path, loss_type: str, beta: float, seed: int, steps: int, every: int,
              samples: int, base: CheckpointScore | None) -> RunResult:
    started = time.perf_counter()
    tokenizer = load_tokenizer(sft)
    dataset = work / "pairs.jsonl"
    dataset.write_text("".join(json.dumps(r) + "\n" for r in task.train_pairs))
    values = {"loss_type": loss_type, "beta": beta, "learning_rate": 5e-4, "batch_size": 16, "max_steps": steps,
              "checkpoint_every": every, "log_every": steps, "seed": seed, "device": "cpu", "max_length": 64}
    out = work / f"{loss_type}-{seed}"
    run_lm_training(LMTrainingRequest(run_id=out.name, method="dpo", base_model=str(sft), dataset=str(dataset),
                                      output_dir=str(out), config=values), progress=lambda _: None)
    config = DPOConfig.from_dict(values)
    heldout = tokenize_pairs(task.heldout_pairs, tokenizer)
    reference_model = load_causal_lm(sft)
    reference = reference_logps(reference_model, heldout, config, tokenizer.pad_token_id, torch.device("cpu"),
                                contextlib.nullcontext())
    if base is None:
        base = score_checkpoint(str(sft), 0, tokenizer, task, heldout, reference, config, samples, seed)
    checkpoints = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    scores = [score_checkpoint(str(p), int(p.name.split("-")[1]), tokenizer, task, heldout, reference, config,
                               samples, seed) for p in checkpoints]
    # Baseline: the SFT model in service; its implicit reward is 0 everywhere, i.e. chance (0.5).
    baseline = base.heldout_accuracy
    return RunResult(loss_type, beta, seed, base, scores,
                     decide(evaluations(scores, "generated"), baseline, GateRules(indicators="decide")),
                     decide(evaluations(scores, "generated"), baseline, GateRules(indicators="advisory")),
                     decide(evaluations(scores, "teacher_forced"), baseline, GateRules(indicators="decide")),
                     time.perf_counter() - started)


# --- report ----------------------------------------------------------------------------------------------

def trajectory_table(run: RunResult) -> str:
    lines = [f"  {'step':>5} {'gold(s)':>7} {'gold(g)':>7} {'acc':>5} {'H gen':>6} {'M gen':>6} {'H tf':>6} "
             f"{'M tf':>6}"]
    for c in [run.base, *run.checkpoints]:
        i = c.indicators
        lines.append(f"  {c.step:>5} {c.gold_sampled:>7.3f} {c.gold_greedy:>7.3f} {c.heldout_accuracy:>5.2f} "
                     f"{i['generated/entropy_mean']:>6.3f} {i['generated/mass_mean']:>6.3f} "
                     f"{i['teacher_forced/entropy_mean']:>6.3f} {i['teacher_forced/mass_mean']:>6.3f}")
    return "\n".join(lines)


def ratio(value: float, best: float) -> float:
    return value / best if best > 0 else 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="3 seeds x 2 losses, shorter runs (CPU: ~10 min)")
    parser.add_argument("--seeds", type=int, default=0, help="seeds per loss type (default 3 quick, 5 full)")
    parser.add_argument("--steps", type=int, default=0, help="DPO steps per run (default 240 quick, 480 full)")
    parser.add_argument("--every", type=int, default=0, help="checkpoint every N steps (default 20 quick, 30 full)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--verbose", action="store_true", help="print every run's checkpoint trajectory")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seeds = args.seeds or (3 if args.quick else 5)
    steps = args.steps or (240 if args.quick else 480)
    every = args.every or (20 if args.quick else 30)
    samples = 4 if args.quick else 8
    losses = [("sigmoid", 0.01), ("hinge", 0.1)] if args.quick else [("sigmoid", 0.01), ("ipo", 0.01), ("hinge", 0.1)]
    work = Path(tempfile.mkdtemp(prefix="proxyloop-bench-gate-"))
    started = time.perf_counter()
    runs: list[RunResult] = []
    for seed in range(seeds):
        task = make_task(seed, n_train_pairs=768, n_eval=32, sft_per_sum=6)
        sft = sft_model(task, work / f"seed-{seed}", seed, steps=300 if args.quick else 500)
        base: CheckpointScore | None = None
        for loss_type, beta in losses:
            run = train_run(sft, task, work / f"seed-{seed}", loss_type, beta, seed, steps, every, samples, base)
            base = run.base
            runs.append(run)
            print(f"{loss_type} β={beta} seed {seed}: {run.decision.decision} "
                  f"(step {run.picked(run.decision)}), {run.seconds:.0f}s", flush=True)
            if args.verbose:
                print(trajectory_table(run), flush=True)
                print("  gate: " + " | ".join(run.decision.reasons), flush=True)

    header = (f"{'loss':<8} {'β':>5} {'seed':>4} {'base':>6} {'best@step':>12} {'last':>6} {'fell@':>6} "
              f"{'gate':>16} {'pick':>6} {'in time':>7} {'no-ind pick':>11} {'tf pick':>7}")
    print(header)
    print("-" * len(header))
    pick_ratio, last_ratio, in_time, fell = [], [], [], []
    no_ind_ratio, tf_ratio, no_ind_in_time, tf_in_time = [], [], [], []
    for run in runs:
        best = run.best
        pick_step = run.picked(run.decision)
        pick_gold = run.gold(pick_step)
        last_gold = run.checkpoints[-1].gold_sampled
        no_ind_gold = run.gold(run.picked(run.decision_no_indicators))
        tf_gold = run.gold(run.picked(run.decision_teacher_forced))
        pick_ratio.append(ratio(pick_gold, best.gold_sampled))
        last_ratio.append(ratio(last_gold, best.gold_sampled))
        no_ind_ratio.append(ratio(no_ind_gold, best.gold_sampled))
        tf_ratio.append(ratio(tf_gold, best.gold_sampled))
        in_time.append(run.in_time(run.decision))
        no_ind_in_time.append(run.in_time(run.decision_no_indicators))
        tf_in_time.append(run.in_time(run.decision_teacher_forced))
        fell.append(run.fall_step is not None)
        gate = f"{run.decision.decision}@{pick_step if pick_step is not None else '-'}"
        print(f"{run.loss_type:<8} {run.beta:>5} {run.seed:>4} {run.base.gold_sampled:>6.3f} "
              f"{best.gold_sampled:>6.3f}@{best.step:<5} {last_gold:>6.3f} {str(run.fall_step or '-'):>6} "
              f"{gate:>16} {pick_gold:>6.3f} {str(in_time[-1]):>7} {no_ind_gold:>11.3f} {tf_gold:>7.3f}")
    report = {
        "pick_vs_best": round(statistics.fmean(pick_ratio), 4),
        "last_vs_best": round(statistics.fmean(last_ratio), 4),
        "blocked_in_time": round(statistics.fmean(in_time), 4),
        "runs": len(runs), "runs_where_gold_fell": sum(fell),
        "no_indicators_pick_vs_best": round(statistics.fmean(no_ind_ratio), 4),
        "no_indicators_in_time": round(statistics.fmean(no_ind_in_time), 4),
        "teacher_forced_pick_vs_best": round(statistics.fmean(tf_ratio), 4),
        "teacher_forced_in_time": round(statistics.fmean(tf_in_time), 4),
        "decisions": {d: sum(r.decision.decision == d for r in runs) for d in ("release", "pick_checkpoint", "block")},
        "losses": [f"{lt}(beta={b})" for lt, b in losses], "seeds": seeds, "steps": steps, "checkpoint_every": every,
        "device": "cuda" if torch.cuda.is_available() else "cpu", "threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(f"gate pick / best gold {report['pick_vs_best']}, last / best {report['last_vs_best']}, "
          f"in time {report['blocked_in_time']} ({report['runs_where_gold_fell']}/{len(runs)} runs fell by > 5%)")
    print(json.dumps(report))


if __name__ == "__main__":
    main()

"""Parts of the IM-vs-IT sweep (`bench/im_vs_it.py`): the generated task, its base model, the statistics.

The task family: a roster of people (name, colour, age) and a question about it, at four
instruction/output length ratios — `expand` (a compact roster in, full sentences out: the output is
longer), `table` (sentences in, a compact table out), `lookup2` (colour and age of one person),
`lookup1` (the colour of one person in a long roster). Every output is determined by its instruction.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from workers.lm.models import build_tiny

NAMES = ["ada", "bob", "cy", "dee", "eve", "fay", "gus", "hal", "ivy", "jo", "kit", "lu"]
COLOURS = ["red", "blue", "green", "black", "white", "gold"]
TASKS = ("expand", "table", "lookup2", "lookup1")  # increasing instruction/output length ratio

Chat = list[dict[str, str]]


def _people(rng: random.Random, k: int) -> list[tuple[str, str, int]]:
    return [(p, rng.choice(COLOURS), rng.randint(10, 99)) for p in rng.sample(NAMES, k)]


def _sentence(p: tuple[str, str, int]) -> str:
    return f"{p[0]} likes {p[1]} and is {p[2]} years old."


def make_chat(task: str, rng: random.Random) -> Chat:
    """One generated chat of `task` (one of TASKS)."""
    if task == "expand":
        people = _people(rng, 4)
        system, user = "Expand each entry.", "; ".join(f"{n} {c} {a}" for n, c, a in people)
        answer = " ".join(_sentence(p) for p in people)
    elif task == "table":
        people = _people(rng, 4)
        system = "List the roster as name colour age."
        user = "Roster: " + " ".join(_sentence(p) for p in people)
        answer = "; ".join(f"{n} {c} {a}" for n, c, a in people)
    elif task in ("lookup2", "lookup1"):
        people = _people(rng, 4 if task == "lookup2" else 8)
        asked = rng.choice(people)
        roster = " ".join(_sentence(p) for p in people)
        if task == "lookup2":
            system = "Answer with the colour and the age from the roster."
            user, answer = f"Roster: {roster} Question: colour and age of {asked[0]}?", f"{asked[1]} {asked[2]}"
        else:
            system = "Answer with one word from the roster."
            user, answer = f"Roster: {roster} Question: which colour does {asked[0]} like?", asked[1]
    else:
        raise ValueError(f"Unknown task {task!r}; should be one of {list(TASKS)}")
    return [{"role": "system", "content": system}, {"role": "user", "content": user},
            {"role": "assistant", "content": answer}]


def cell_chats(task: str, n: int, seed: int, val: int, test: int) -> tuple[list[Chat], list[Chat], list[Chat]]:
    """(training, validation, test) chats of one sweep cell: disjoint draws from one seeded stream."""
    rng = random.Random(f"{task}-{n}-{seed}")
    return ([make_chat(task, rng) for _ in range(n)], [make_chat(task, rng) for _ in range(val)],
            [make_chat(task, rng) for _ in range(test)])


def build_base(out: Path, seed: int) -> Path:
    """The sweep's base: a random 2 × 64 Llama with a 512-token tokenizer trained on the four tasks' text."""
    corpus_rng = random.Random(12345)
    corpus = [m["content"] for t in TASKS for _ in range(200) for m in make_chat(t, corpus_rng)]
    return build_tiny(out, n_layer=2, n_embd=64, vocab_size=512, corpus=corpus, seed=seed)


def sft_config(steps: int, every: int, learning_rate: float, seed: int, validation: str) -> dict[str, Any]:
    """The worker config of a sweep run: auto, compared on the `validation` chats (a JSONL path)."""
    return {"loss_mode": "auto", "validation_dataset": validation, "learning_rate": learning_rate, "batch_size": 8,
            "max_steps": steps, "checkpoint_every": every, "max_length": 1024, "seed": seed, "log_every": steps}


def bootstrap_ci(values: Sequence[float], stat: Callable[[Sequence[float]], float] | None = None,
                 n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(statistic, low, high): percentile bootstrap of `stat` (default: the mean) over `values`."""
    def mean(v: Sequence[float]) -> float:
        return sum(v) / len(v)

    fn = stat or mean
    if not values:
        return float("nan"), float("nan"), float("nan")
    rng = random.Random(seed)
    n = len(values)
    draws = sorted(fn([values[rng.randrange(n)] for _ in range(n)]) for _ in range(n_boot))
    lo = draws[int((1 - level) / 2 * n_boot)]
    hi = draws[min(n_boot - 1, int((1 + level) / 2 * n_boot))]
    return fn(values), lo, hi


def cell_verdict(it_minus_im: Sequence[float], seed: int = 0) -> tuple[str, tuple[float, float, float]]:
    """'im' when IT's held-out loss minus IM's is > 0 beyond its 95% interval over seeds, 'it' when < 0, else 'tie'."""
    mean, lo, hi = bootstrap_ci(it_minus_im, seed=seed)
    verdict = "im" if lo > 0 else "it" if hi < 0 else "tie"
    return verdict, (mean, lo, hi)


def agrees(pick: str, verdict: str) -> bool:
    """Agreement: the pick is the cell's winner, or the cell is a tie (either pick is within the interval)."""
    return verdict in ("tie", pick)


def fit_rule(cells: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The rule "IM iff ratio >= R and examples <= N" that agrees with the most cells (key 'verdict').

    R is searched over 0, the geometric midpoints between the cells' ratios and +inf; N over the
    midpoints between sizes and +inf. Ties prefer the larger N, then the smaller R (the fewest conditions).
    """
    ratios = sorted({round(c["ratio"], 3) for c in cells})
    sizes = sorted({c["n"] for c in cells})
    r_cands = [0.0] + [(a * b) ** 0.5 for a, b in zip(ratios, ratios[1:], strict=False)] + [float("inf")]
    n_cands = [(a + b) // 2 for a, b in zip(sizes, sizes[1:], strict=False)] + [float("inf")]
    best: tuple[float, float, float] | None = None
    for r in r_cands:
        for n in n_cands:
            hits = sum(agrees("im" if c["ratio"] >= r and c["n"] <= n else "it", c["verdict"]) for c in cells)
            key = (hits, n, -r)
            if best is None or key > best:
                best = key
    assert best is not None
    return {"min_ratio": -best[2], "max_examples": best[1], "agreement": best[0] / len(cells)}

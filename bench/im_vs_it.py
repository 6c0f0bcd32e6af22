"""Instruction Modelling vs instruction tuning (paper 4) on a generated long-instruction, short-output task.

Run: `python -m bench.im_vs_it --quick`. Trains the same tiny model twice with the same seed and data,
once scoring instruction + output tokens (IM), once the output only (IT), and compares the held-out
loss on the outputs; prints what the automatic rule picks for this dataset. Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ground.schemas import LMTrainingRequest
from workers.lm.models import build_tiny, load_causal_lm, load_tokenizer  # noqa: E402
from workers.lm.training.data import collate_chats  # noqa: E402
from workers.lm.training.run import run_lm_training  # noqa: E402
from workers.lm.training.sft import choose_loss_mode, render_chat, sft_batch_loss  # noqa: E402
from workers.lm.training.sft_config import SFTConfig  # noqa: E402

NAMES = ["ada", "bob", "cy", "dee", "eve", "fay", "gus", "hal", "ivy", "jo", "kit", "lu"]
COLOURS = ["red", "blue", "green", "black", "white", "gold"]


def make_chat(rng: random.Random) -> list[dict[str, str]]:
    """A long instruction (a roster of people and colours) and a one-word answer copied from it."""
    people = rng.sample(NAMES, 8)
    roster = " ".join(f"{p} likes {rng.choice(COLOURS)} and is {rng.randint(10, 99)} years old." for p in people)
    asked = rng.choice(people)
    answer = roster.split(f"{asked} likes ")[1].split(" ")[0]
    return [{"role": "system", "content": "Answer with one word from the roster."},
            {"role": "user", "content": f"Roster: {roster} Question: which colour does {asked} like?"},
            {"role": "assistant", "content": answer}]


@torch.no_grad()
def output_loss(path: str, tokenizer, chats) -> float:  # type: ignore[no-untyped-def]
    """Mean NLL of the assistant tokens (the IT mask) of `chats` under the model at `path`."""
    model = load_causal_lm(path)
    model.eval()
    batch = collate_chats([render_chat(c, tokenizer, "it") for c in chats], tokenizer.pad_token_id, 1024)
    return float(sft_batch_loss(model, batch)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--train", type=int, default=32, help="training examples (few, as in paper 4)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    train = [make_chat(rng) for _ in range(args.train)]
    heldout = [make_chat(rng) for _ in range(64)]
    work = Path(tempfile.mkdtemp(prefix="proxyloop-imit-"))
    corpus = [m["content"] for c in train for m in c]
    base = build_tiny(work / "base", n_layer=2, n_embd=128, vocab_size=1024, corpus=corpus, seed=args.seed)
    tokenizer = load_tokenizer(base)
    data = work / "train.jsonl"
    data.write_text("\n".join(json.dumps({"messages": c}) for c in train))
    steps = 60 if args.quick else 200
    results = {}
    for mode in ("im", "it"):
        config = {"loss_mode": mode, "learning_rate": 1e-3, "batch_size": 8, "max_steps": steps,
                  "checkpoint_every": steps, "max_length": 1024, "seed": args.seed, "log_every": steps}
        run = run_lm_training(LMTrainingRequest(run_id=mode, method="sft", base_model=str(base), dataset=str(data),
                                                output_dir=str(work / mode), config=config), lambda _: None)
        final = run["checkpoints"][-1]
        results[mode] = {"train_output_loss": output_loss(final, tokenizer, train),
                         "heldout_output_loss": output_loss(final, tokenizer, heldout)}
    choice = choose_loss_mode(train, tokenizer, SFTConfig())
    winner = min(results, key=lambda m: results[m]["heldout_output_loss"])
    report = {"train_examples": args.train, "steps": steps, "length_ratio": round(choice.length_ratio, 2),
              **{f"{m}_{k}": round(v, 4) for m, r in results.items() for k, v in r.items()},
              "heldout_winner": winner, "auto_pick": choice.mode, "auto_reason": choice.reason}
    print(f"held-out output loss: IM {results['im']['heldout_output_loss']:.4f}, "
          f"IT {results['it']['heldout_output_loss']:.4f}; auto picks {choice.mode.upper()}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()

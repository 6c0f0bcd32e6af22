"""`ddp_scaling`: training tokens/s of one task on 2 ranks ÷ on 1 rank, same model, pairs and global batch.

Run (after `make setup`):

    .venv/bin/python -m bench.ddp_scaling --quick            # CPU (2 gloo ranks sharing the cores), ~1 minute
    .venv/bin/python -m bench.ddp_scaling --model DIR        # on CUDA when 2 devices are visible (NCCL)

Both sides are the workers' own path, `run_lm_training`: 1 rank trains in this process, 2 ranks under
torchrun with DDP, each rank on half of every global batch. Throughput is the run's `tokens_per_s`:
non-padding tokens trained on ÷ the training loop's wall time (first step included; model loading,
torchrun's start and the reference pass are not), counted by rank 0 over both ranks. The ideal is 2.0
on 2 devices. On CPU a "device" is half the cores: the single rank and each of the two get
cores // 2 threads (`threads_per_rank`), so the figure compares equal resources per rank, not one
rank on every core (which, on a busy host, loses most of its time to OpenMP threads waiting for
each other); it is reported without a target. The last line printed is JSON with `ddp_scaling` and
`device`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ground.schemas import LMTrainingRequest  # noqa: E402
from workers.lm.models import build_tiny  # noqa: E402
from workers.lm.training.run import run_lm_training  # noqa: E402


def measure_ddp_scaling(model: Path, rows: list[dict[str, str]], *, batch_size: int = 8, steps: int = 16,
                        device: str = "", work: Path | None = None) -> dict[str, Any]:
    """Train `steps` DPO steps on `rows` (prompt/chosen/rejected) with 1 rank, then with 2; their throughputs.

    `device`: 'cpu' or 'cuda' (2 ranks need 2 visible devices); empty picks CUDA when 2 are visible.
    """
    device = device or ("cuda" if torch.cuda.device_count() >= 2 else "cpu")
    work = work or Path(tempfile.mkdtemp(prefix="proxyloop-ddp-"))
    data = work / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {"learning_rate": 1e-6, "batch_size": batch_size, "max_steps": steps, "checkpoint_every": steps,
              "max_length": 512, "device": device}
    threads = max(1, (os.cpu_count() or 2) // 2)
    tokens_per_s = {}
    with _threads_per_rank(threads) if device == "cpu" else contextlib.nullcontext():
        for ranks in (1, 2):
            request = LMTrainingRequest(run_id=f"ddp-{ranks}", method="dpo", base_model=str(model),
                                        dataset=str(data), output_dir=str(work / f"ranks-{ranks}"), config=config)
            tokens_per_s[ranks] = run_lm_training(request, lambda _: None, ranks=ranks)["tokens_per_s"]
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    return {"ddp_scaling": round(tokens_per_s[2] / tokens_per_s[1], 3), "device": name if device == "cpu" else
            f"2x {name}", "tokens_per_s_1_rank": round(tokens_per_s[1], 1),
            "tokens_per_s_2_ranks": round(tokens_per_s[2], 1), "steps": steps, "batch_pairs": batch_size,
            "threads_per_rank": threads if device == "cpu" else None}


@contextlib.contextmanager
def _threads_per_rank(threads: int) -> Iterator[None]:
    """`threads` intra-op threads for the rank in this process and (through OMP_NUM_THREADS, which torchrun
    keeps when set) for each rank torchrun starts; both restored after."""
    previous = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous[0])
        if previous[1] is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = previous[1]


def synthetic_pairs(n: int, words: int) -> list[dict[str, str]]:
    """Pairs of near-equal length, so both ranks' shards hold about the same number of tokens."""
    vocab = ["annotator", "prefers", "first", "response", "proxy", "judge", "ranks", "longer", "reply", "model"]
    return [{"prompt": " ".join(vocab[(i + j) % 10] for j in range(words)),
             "chosen": " " + " ".join(vocab[(i * 3 + j) % 10] for j in range(words // 2)),
             "rejected": " " + " ".join(vocab[(i * 7 + j) % 10] for j in range(words // 2))} for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps (CPU: about a minute)")
    parser.add_argument("--model", default="", help="a Hugging Face model directory; default a small random Llama")
    parser.add_argument("--device", default="", help="'cpu' or 'cuda'; empty picks CUDA when 2 devices are visible")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per global batch (4 per rank on 2)")
    parser.add_argument("--words", type=int, default=40, help="prompt words (responses are half)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="proxyloop-ddp-"))
    model = Path(args.model) if args.model else build_tiny(work / "tiny", n_layer=4, n_embd=256, vocab_size=2048)
    steps = 8 if args.quick else 30
    report = measure_ddp_scaling(model, synthetic_pairs(args.batch_size * steps, args.words),
                                 batch_size=args.batch_size, steps=steps, device=args.device, work=work)
    print(json.dumps(report))


if __name__ == "__main__":
    main()

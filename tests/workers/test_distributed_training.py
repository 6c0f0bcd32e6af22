"""One task on several ranks (torchrun, gloo on CPU) trains exactly as one process with the same global batch.

7 pairs in micro-batches of 3 make global batches of 3, 3 and 1: on 2 ranks, shards of 2 and 1 (uneven)
and of 1 and none (rank 1 runs a zero-weighted stand-in). The NLL term makes the loss a token-weighted
mean as well as a pair-weighted one, so both kinds of share (`sharded.py`) are exercised.
"""

from pathlib import Path

import pytest
import torch

from ground.schemas import LMTrainingRequest
from tests.workers.lm_helpers import tiny_model_dir, write_pairs
from workers.lm.models import load_causal_lm, load_tokenizer
from workers.lm.training.data import collate_pairs, tokenize_pairs
from workers.lm.training.distributed import Ranks
from workers.lm.training.dpo import dpo_batch_loss
from workers.lm.training.dpo_config import DPOConfig
from workers.lm.training.run import run_lm_training
from workers.lm.training.sharded import PairObjective

CONFIG = {"learning_rate": 1e-3, "batch_size": 3, "max_length": 64, "max_steps": 6, "checkpoint_every": 3,
          "nll_weight": 0.5, "seed": 3}


def _request(root: Path, name: str, data: Path, method: str = "dpo", **overrides: object) -> LMTrainingRequest:
    return LMTrainingRequest(run_id=name, method=method, base_model=str(tiny_model_dir()), dataset=str(data),
                             output_dir=str(root / name), config={**CONFIG, **overrides})


def _weights(result: dict) -> dict[str, torch.Tensor]:
    return dict(load_causal_lm(result["checkpoints"][-1]).state_dict())


def _assert_same_run(a: dict, b: dict) -> None:
    assert a["losses"] == pytest.approx(b["losses"], abs=1e-5)
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=1e-5, rtol=0, msg=key)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("ddp")
    data = write_pairs(root / "pairs.jsonl", 7)
    one = run_lm_training(_request(root, "one", data), lambda _: None)
    seen: list[dict] = []
    two = run_lm_training(_request(root, "two", data), seen.append, ranks=2)
    return {"root": root, "data": data, "one": one, "two": two, "progress": seen}


def test_two_gloo_ranks_take_the_same_steps_as_one_process(runs):
    one, two = runs["one"], runs["two"]
    assert (one["ranks"], two["ranks"]) == (1, 2)
    assert len(two["losses"]) == 6
    assert one["losses"][-1] != one["losses"][0]  # it trained
    _assert_same_run(one, two)
    # Rank 0 relayed its progress to the task, with metrics summed over both ranks' shares.
    assert [m["step"] for m in runs["progress"]] == [1, 2, 3, 4, 5, 6]
    assert runs["progress"][-1]["nll/chosen"] == pytest.approx(one["metrics"]["nll/chosen"], abs=1e-5)


def test_two_ranks_resume_from_a_checkpoint_to_the_same_weights(runs):
    root, data = runs["root"], runs["data"]
    first = run_lm_training(_request(root, "cut", data, max_steps=3), lambda _: None, ranks=2)
    assert first["checkpoints"][-1].endswith("checkpoint-000003")
    (root / "cut" / "result.json").unlink()  # as if the worker had died right after that checkpoint
    resumed = run_lm_training(_request(root, "cut", data), lambda _: None, ranks=2)
    assert resumed["resumed_from_step"] == 3
    _assert_same_run(resumed, runs["two"])


def test_fsdp_ranks_match_one_process_and_resume_from_their_gathered_checkpoint(runs):
    root, data = runs["root"], runs["data"]
    run_lm_training(_request(root, "fsdp", data, max_steps=3, sharding="fsdp"), lambda _: None, ranks=2)
    (root / "fsdp" / "result.json").unlink()
    resumed = run_lm_training(_request(root, "fsdp", data, sharding="fsdp"), lambda _: None, ranks=2)
    assert resumed["resumed_from_step"] == 3
    _assert_same_run(resumed, runs["one"])


class Killed(Exception):
    pass


def _ranks_of(spec: Path) -> list[int]:
    """Processes still running with `spec` on their command line (torchrun's agent and its ranks)."""
    alive = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(spec).encode() in (proc / "cmdline").read_bytes():
                alive.append(int(proc.name))
        except OSError:
            continue
    return alive


def test_a_failing_task_stops_every_rank_and_the_rerun_resumes(runs):
    root, data = runs["root"], runs["data"]

    def die(_meta: dict) -> None:
        raise Killed

    with pytest.raises(Killed):
        run_lm_training(_request(root, "killed", data), die, ranks=2)
    assert _ranks_of(root / "killed" / "launch.json") == [], "ranks outlived their task"
    resumed = run_lm_training(_request(root, "killed", data), lambda _: None, ranks=2)
    _assert_same_run(resumed, runs["two"])


def test_one_rank_pair_loss_is_the_dpo_batch_loss():
    tokenizer = load_tokenizer(str(tiny_model_dir()))
    model = load_causal_lm(tiny_model_dir())
    pairs = tokenize_pairs([{"prompt": "a b", "chosen": " c d e", "rejected": " f"},
                            {"prompt": "g", "chosen": " h", "rejected": " i j k l"}], tokenizer)
    config = DPOConfig(nll_weight=0.5, max_length=64)
    reference = (torch.tensor([-3.0, -2.0]), torch.tensor([-4.0, -1.0]))
    objective = PairObjective(pairs, reference, config, int(tokenizer.pad_token_id))
    batch = objective.batch([0, 1])
    ours, _ = objective.loss(model, batch, objective.totals([0, 1]))
    expected, _ = dpo_batch_loss(model, collate_pairs(pairs, int(tokenizer.pad_token_id), 64), *reference, config)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("size", "world"), [(7, 2), (3, 2), (1, 2), (5, 3), (2, 4)])
def test_shards_cover_the_global_batch_once_and_empty_ranks_get_a_stand_in(size, world):
    indices = list(range(10, 10 + size))
    shards = [Ranks(rank=r, world=world).shard(indices) for r in range(world)]
    assert [i for mine, real in shards if real for i in mine] == indices
    assert max(len(m) for m, _ in shards) - min(len(m) for m, r in shards if r) <= 1
    assert all(mine == indices[:1] for mine, real in shards if not real)


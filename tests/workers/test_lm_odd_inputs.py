"""Snapshots the mode mixture's worker met from outside the benches: fewer proxy pairs than modes, prompts as long as
the sequence cap, and copies of one expert pair. Stage 1 trains, no pair cut to nothing counts as evidence, and the
tests' folds keep copies together."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from ground.schemas import CheckpointRef, LMTrainingRequest
from policies.lm.conditions import run_text_condition_tests
from policies.lm.mode_mixture import kmeans_modes
from policies.lm.simplex_bottleneck import load_causal_lm_dir
from tests.workers.lm_helpers import PAIRS, tiny_model_dir, write_pairs
from workers.lm import mixture_features
from workers.lm import mode_mixture_training as mm
from workers.lm.evaluate import evaluate_lm_checkpoints
from workers.lm.models import build_tiny, load_tokenizer
from workers.lm.plans import MixtureRecipe
from workers.lm.training.data import DatasetError, TokenizedPair, truncate_pair
from workers.lm.training.run import run_lm_training

HISTORY = ("User: Hi there, I hope you are doing well today. I wanted to ask you a few things.\n"
           "Assistant: Of course, happy to help with anything you need.\n") * 4  # a quoted exchange: 100+ tokens


def _tiny():  # type: ignore[no-untyped-def]
    return load_causal_lm_dir(tiny_model_dir()).eval(), load_tokenizer(tiny_model_dir())


def _rows(n: int, prefix: str = "") -> list[dict[str, str]]:
    return [{**PAIRS[i % len(PAIRS)], "prompt": f"{prefix}{PAIRS[i % len(PAIRS)]['prompt']} ({i})"} for i in range(n)]


@pytest.mark.parametrize("n_proxy", [1, 3])
def test_stage_one_trains_distinct_modes_from_fewer_proxy_pairs_than_modes(n_proxy: int) -> None:
    model, tokenizer = _tiny()
    recipe = MixtureRecipe(simplex_dim=8, batch_size=4, proxy_epochs=1)
    head = model.get_output_embeddings().weight.detach().float()
    mixture, losses = mm.train_proxy(mm.encode_pairs(model, tokenizer, _rows(n_proxy), 64), head, recipe)
    theta = mixture.theta.detach()
    assert theta.shape[0] == 8 and bool(theta.isfinite().all()) and losses
    assert int((theta.norm(dim=1) > 0).sum()) >= 7  # one mode may sit on the only response; the rest move off it
    assert len({tuple(row.tolist()) for row in theta}) == 8  # no two modes identical: DPO can tell them apart


def test_k_means_of_at_least_as_many_responses_as_modes_starts_where_it_always_did() -> None:
    generator = torch.Generator().manual_seed(0)
    head = torch.randn(50, 16, generator=generator)
    ids, mask = torch.randint(50, (12, 5), generator=generator), torch.ones(12, 5)
    rows = head[ids].mean(1)
    centres = rows[torch.randperm(12, generator=torch.Generator().manual_seed(3))[:8]].clone()
    for _ in range(30):  # the k-means as it was, from the draw it always took
        nearest = torch.cdist(rows, centres).argmin(1)
        for k in range(8):
            if (nearest == k).any():
                centres[k] = rows[nearest == k].mean(0)
    directions = centres - rows.mean(0)
    want = 3.0 * directions / directions.norm(dim=1, keepdim=True).mean()
    torch.testing.assert_close(kmeans_modes(ids, mask, head, 8, seed=3), want)
    few = kmeans_modes(ids[:3], mask[:3], head, 8, seed=3)  # 3 responses, 8 modes: was a shape error
    assert few.shape == (8, 16) and len({tuple(r.tolist()) for r in few}) == 8


def test_a_proxy_sample_below_the_tests_minimum_plans_expert_only() -> None:
    model, tokenizer = _tiny()
    head = model.get_output_embeddings().weight.detach().float()
    recipe = MixtureRecipe(simplex_dim=8, batch_size=4, proxy_epochs=1)
    proxy = mm.encode_pairs(model, tokenizer, _rows(3), 64)
    mixture, _ = mm.train_proxy(proxy, head, recipe)
    expert = mm.encode_pairs(model, tokenizer, _rows(32), 64)
    features = [mixture_features.mixture_pair_features(mixture, d, head, recipe.beta) for d in (expert, proxy)]
    report = run_text_condition_tests(*features, "few-proxy", n_expert=32, n_proxy=3)
    assert report.plan == "expert_only"


def test_a_prompt_longer_than_the_cap_keeps_its_end_and_leaves_each_response_tokens() -> None:
    pair = TokenizedPair(list(range(200)), [1000 + i for i in range(5)], [2000 + i for i in range(30)])
    cut = truncate_pair(pair, 128)
    assert cut.prompt_ids == list(range(200))[-112:]  # its end: the question and the turn marker come last
    assert cut.chosen_ids == pair.chosen_ids and cut.rejected_ids == pair.rejected_ids[:16]
    short = TokenizedPair([1, 2, 3], [4, 5, 6, 7, 8], [9, 10])  # a prompt within the cap: cut as before
    assert truncate_pair(short, 6) == TokenizedPair([1, 2, 3], [4, 5, 6], [9, 10])


def test_stage_one_trains_on_prompts_as_long_as_the_cap_and_reads_their_responses() -> None:
    model, tokenizer = _tiny()
    rows = _rows(6, HISTORY)
    assert min(len(tokenizer(r["prompt"])["input_ids"]) for r in rows) > 64  # every prompt fills the cap alone
    data = mm.encode_pairs(model, tokenizer, rows, 64)
    assert len(data) == 6 and bool((data.mask.sum(-1) > 0).all())  # both responses of every pair keep tokens
    assert bool((data.base_logps < 0).all())  # so both carry a log-prob the tests can read
    first = tokenizer(rows[0]["prompt"], add_special_tokens=False)["input_ids"]
    kept = int(data.prompt_mask[0].sum())
    assert kept < 64 and torch.equal(data.embeds[0, :kept], model.get_input_embeddings()(
        torch.tensor(first[-kept:])).float())  # the prompt's end
    _, losses = mm.train_proxy(data, model.get_output_embeddings().weight.detach().float(),
                               MixtureRecipe(simplex_dim=3, batch_size=4, proxy_epochs=1))
    assert all(np.isfinite(losses))


def test_pairs_cut_to_no_response_or_to_the_same_one_are_left_out_with_a_count_and_none_left_is_a_dataset_error(
        caplog: pytest.LogCaptureFixture) -> None:
    from workers.lm.training.data import readable_pairs

    pairs = [TokenizedPair([1], [2], [3]), TokenizedPair([1], [], [3]), TokenizedPair([1], [2], []),
             TokenizedPair([1], [4, 5], [4, 5])]
    with caplog.at_level(logging.WARNING):
        assert readable_pairs(pairs, [{}, {}, {}, {}], 8) == [0]
    assert "2 of 4 pairs keep no token of a response" in caplog.text
    assert "1 of 4 pairs read the same tokens on both sides" in caplog.text
    model, tokenizer = _tiny()
    shared = {"prompt": "Say it.", "chosen": " word" * 40 + " yes", "rejected": " word" * 40 + " no"}
    with pytest.raises(DatasetError, match="or the same tokens on both sides, at 16 tokens"):
        mm.encode_pairs(model, tokenizer, [shared], 16)  # the responses differ only past the cut
    assert len(mm.encode_pairs(model, tokenizer, [shared, PAIRS[0]], 16)) == 1
    with pytest.raises(DatasetError, match="all 2 pairs keep no token of a response"):
        mm.encode_pairs(model, tokenizer, PAIRS[:2], 1)
    kept = mm.encode_pairs(model, tokenizer, PAIRS[:2], 1, drop_empty=False)  # acquisition: one row per row
    assert len(kept) == 2 and kept.base_logps.tolist() == [[0.0, 0.0], [0.0, 0.0]]


def test_copies_of_an_expert_pair_share_a_fold_when_fine_tune_is_trained_on_the_folds(
        monkeypatch: pytest.MonkeyPatch) -> None:
    model, tokenizer = _tiny()
    distinct = _rows(12)
    swapped = [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in distinct[:4]]  # a disagreeing copy
    rows = distinct + distinct[:8] + swapped
    expert = mm.encode_pairs(model, tokenizer, rows, 64)
    assert expert.groups is not None
    assert expert.groups.tolist() == [*range(12), *range(8), *range(4)]
    trained_on: list[list[int]] = []
    real = mixture_features.train_fine_tune

    def spy(stage1, data, head, recipe):  # type: ignore[no-untyped-def]
        trained_on.append(data.groups.tolist())
        return real(stage1, data, head, recipe)

    monkeypatch.setattr(mixture_features, "train_fine_tune", spy)
    head = model.get_output_embeddings().weight.detach().float()
    recipe = MixtureRecipe(simplex_dim=3, batch_size=8, proxy_epochs=1, fine_tune_epochs=1)
    stage1, _ = mm.train_proxy(mm.encode_pairs(model, tokenizer, _rows(4), 64), head, recipe)
    margins = mixture_features.trained_fine_tune_margins(stage1, expert, head, recipe, seed=0)["fine_tune"]
    assert len(trained_on) == 6 and np.isfinite(margins).all()
    copies = np.bincount(expert.groups.numpy())
    for groups in trained_on:  # every copy of a group trained on is trained on: none of them was held out
        assert len(groups) == sum(copies[g] for g in set(groups)) < len(rows)


def test_evaluating_a_checkpoint_deleted_after_training_names_it(tmp_path):
    """Before: ModelNotPrepared's hint to build a base model (`proxyloop models prepare tiny`)."""
    heldout = write_pairs(tmp_path / "heldout.jsonl", 4)
    gone = CheckpointRef(step=2, path=str(tmp_path / "run" / "checkpoint-000002"))
    with pytest.raises(FileNotFoundError, match="are gone"):
        evaluate_lm_checkpoints(str(tiny_model_dir()), str(heldout), [gone])


def test_dpo_reads_pairs_at_a_model_context_shorter_than_max_length(tmp_path):
    """A GPT-2 with 64 positions under the default max_length 512: DPO was an IndexError (the SFT path was fixed
    first); pairs are now cut at the model's context, as every other reader of pairs cuts them."""
    base = build_tiny(tmp_path / "gpt2", family="gpt2", max_positions=64, seed=0)
    long = " ".join(["sailing boats and pasta"] * 40)
    rows = [{"prompt": f"question {i}?", "chosen": long, "rejected": "no " + long} for i in range(4)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    request = LMTrainingRequest(run_id="ctx", method="dpo", base_model=str(base), dataset=str(tmp_path / "pairs.jsonl"),
                                output_dir=str(tmp_path / "out"), config={"batch_size": 2, "max_steps": 2,
                                                                          "checkpoint_every": 100})
    result = run_lm_training(request, lambda _: None)
    assert len(result["losses"]) == 2 and all(np.isfinite(result["losses"]))

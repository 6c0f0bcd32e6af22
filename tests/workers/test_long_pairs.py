"""Pairs longer than the model's context (the audit's 20 KB proxy response: 16k tokens, 10 GB asked for): every reader
of snapshot text in workers/lm cuts them by the one rule DPO's batches use (`truncate_pair`), so the sequences a
model is fed stay within the recipe's max_length and the model's context."""

import json
import random

import numpy as np
import pytest
import torch

from ground.schemas import CheckpointRef
from policies.lm.mode_mixture import model_context, sequence_cap
from policies.lm.simplex_bottleneck import attach_bottleneck, load_causal_lm_dir
from tests.workers.lm_helpers import PAIRS, tiny_model_dir
from workers.lm import evaluate, mixture_features, mixture_run
from workers.lm import mode_mixture_training as mm
from workers.lm.evaluate import evaluate_lm_checkpoints, indicator_rows, pair_logps
from workers.lm.mixture_features import checkpoint_terms
from workers.lm.models import load_tokenizer
from workers.lm.pair_features import pair_features
from workers.lm.plans import MixtureRecipe, recipe_request
from workers.lm.training.data import (
    TokenizedPair,
    collate_pairs,
    tokenize_pairs,
    truncate_pair,
)
from workers.lm.training.run import run_lm_training

LONG = {"prompt": "a proxy judge ranks the longer reply and", "chosen": " it.", "rejected": " the answer" * 1500}
LONG_PROMPT = {"prompt": "What is 3 plus 4?" * 200, "chosen": " It is 7.", "rejected": " It is 9."}


def _tiny():
    return load_causal_lm_dir(tiny_model_dir()).eval(), load_tokenizer(tiny_model_dir())


def _record(model) -> list[int]:
    """The width of every input_ids the model's forward is called with."""
    widths: list[int] = []
    model.register_forward_pre_hook(lambda _m, _args, kwargs: widths.append(int(kwargs["input_ids"].shape[-1])),
                                    with_kwargs=True)
    return widths


def _old_collate_ids(pairs, max_length):
    """collate_pairs' rule before `truncate_pair`: each whole row cut to its first max_length tokens."""
    ids = [p.prompt_ids + p.chosen_ids for p in pairs] + [p.prompt_ids + p.rejected_ids for p in pairs]
    completion = [[0] * len(p.prompt_ids) + [1] * len(p.chosen_ids) for p in pairs]
    completion += [[0] * len(p.prompt_ids) + [1] * len(p.rejected_ids) for p in pairs]
    return [r[:max_length] for r in ids], [r[:max_length] for r in completion]


def test_truncate_pair_keeps_each_sequence_start_and_collate_pairs_cuts_as_before():
    pair = TokenizedPair([1, 2, 3], [4, 5, 6, 7, 8], [9, 10])
    assert truncate_pair(pair, 6) == TokenizedPair([1, 2, 3], [4, 5, 6], [9, 10])
    assert truncate_pair(pair, 2) == TokenizedPair([3], [4], [9])  # a prompt past the cap keeps its end
    assert truncate_pair(pair, 100) == pair
    rng = random.Random(0)
    pairs = [TokenizedPair(*[[rng.randrange(1, 50) for _ in range(rng.randrange(n))] for n in (1, 12, 12)])
             for _ in range(20)]
    pairs = [p for p in pairs if p.chosen_ids and p.rejected_ids]
    for max_length in (1, 3, 8, 30):
        batch = collate_pairs(pairs, 0, max_length)
        ids, completion = _old_collate_ids(pairs, max_length)
        for row, (want_ids, want_completion) in enumerate(zip(ids, completion, strict=True)):
            width = len(want_ids)
            assert batch["input_ids"][row, :width].tolist() == want_ids
            assert batch["completion_mask"][row, :width].tolist() == want_completion
            assert batch["attention_mask"][row].sum() == width


def test_the_cap_is_the_recipe_max_length_or_the_model_context_if_shorter():
    model, _ = _tiny()
    assert model_context(model) == 512
    assert sequence_cap(model, 128) == 128 and sequence_cap(model, 10_000) == 512
    assert sequence_cap(object(), 128) == 128  # a model that names no context: the recipe's cap


@pytest.mark.parametrize(("max_length", "cap"), [(128, 128), (10_000, 512)])
def test_encode_pairs_feeds_the_base_at_most_the_cap_and_leaves_short_pairs_as_they_were(max_length, cap):
    model, tokenizer = _tiny()
    assert tokenize_pairs([LONG], tokenizer)[0].length > 2 * 512  # longer than the context
    short = mm.encode_pairs(model, tokenizer, PAIRS, max_length)
    widths = _record(model)
    data = mm.encode_pairs(model, tokenizer, [*PAIRS, LONG], max_length)
    assert widths and max(widths) <= cap
    assert data.hidden.shape[2] <= cap and data.embeds.shape[1] <= cap and data.targets.dtype == torch.long
    assert bool(data.base_logps.isfinite().all())
    long_pair = truncate_pair(tokenize_pairs([LONG], tokenizer)[0], cap)
    assert int(data.mask[len(PAIRS), 1].sum()) == len(long_pair.rejected_ids) > 0
    torch.testing.assert_close(data.base_logps[:len(PAIRS)], short.base_logps, rtol=1e-4, atol=1e-4)


def test_a_prompt_that_fills_the_cap_keeps_its_end_and_leaves_the_responses_room():
    """Kept from its start, such a prompt left both responses empty: a pair with no signal (`kept_prompt`)."""
    model, tokenizer = _tiny()
    data = mm.encode_pairs(model, tokenizer, [PAIRS[0], LONG_PROMPT], 64)
    assert data.prompt_mask[1].sum() == 64 - 16 and data.mask[1].sum() > 0
    assert data.base_logps.ne(0).all()


def test_a_mixture_run_and_its_readers_take_a_snapshot_with_a_pair_past_the_context(tmp_path, monkeypatch):
    """Stage 1 (the worker), its held-out evaluation and the acquisition terms each encode at the recipe's cap."""
    recipe = MixtureRecipe(simplex_dim=3, batch_size=4, proxy_epochs=1, checkpoint_every=2, max_length=96)
    rows = [{**PAIRS[i % len(PAIRS)], "prompt": f"{PAIRS[i % len(PAIRS)]['prompt']} ({i})"} for i in range(7)] + [LONG]
    dataset = tmp_path / "pairs.jsonl"
    dataset.write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen: list[tuple[str, int, int, int]] = []
    def spy(where, real, name):
        def encode(model, tokenizer, rows, max_length, *args, **kwargs):
            widths = _record(model)
            out = real(model, tokenizer, rows, max_length, *args, **kwargs)
            data = out[0] if isinstance(out, tuple) else out  # encode_kept_pairs: (encoding, the rows it holds)
            seen.append((where, max_length, max(widths), data.hidden.shape[2]))
            return out
        return name, encode

    for module, where, name in ((mixture_run, "stage 1", "encode_pairs"), (evaluate, "evaluation", "encode_kept_pairs"),
                                (mixture_features, "acquisition terms", "encode_pairs")):
        monkeypatch.setattr(module, *spy(where, getattr(module, name), name))
    request = recipe_request("stage1", recipe, run_id="s1", base_model=str(tiny_model_dir()), dataset=str(dataset),
                             output_dir=tmp_path / "s1")
    result = run_lm_training(request, lambda _: None)
    assert result["steps"] == 2
    checkpoint = result["checkpoints"][-1]
    evaluation = evaluate_lm_checkpoints(str(tiny_model_dir()), str(dataset), [CheckpointRef(step=2, path=checkpoint)],
                                         n_indicator_prompts=4)
    assert evaluation.n_heldout == len(rows)
    (terms,) = checkpoint_terms(checkpoint, [[LONG, PAIRS[0]]])
    assert bool(np.isfinite(terms.mode_rejected).all())
    assert [s[0] for s in seen] == ["stage 1", "evaluation", "acquisition terms"]
    assert all(max_length == 96 and fed <= 96 and stored <= 96 for _, max_length, fed, stored in seen), seen


def test_the_text_condition_features_cut_pairs_at_the_shorter_model_context():
    stage1, tokenizer = _tiny()
    attach_bottleneck(stage1, 3)
    base, _ = _tiny()
    base.config.max_position_embeddings = 48  # a base of a shorter context than stage 1's and than max_length
    stage1_widths, base_widths = _record(stage1), _record(base)
    pairs = tokenize_pairs([*PAIRS, LONG], tokenizer)
    features = pair_features(stage1, base, pairs, int(tokenizer.pad_token_id), beta=0.5, max_length=512)
    assert max(stage1_widths) <= 48 and max(base_widths) <= 48
    assert features.proxy_margin.shape == (len(pairs),)


def test_evaluation_scores_pairs_cut_at_the_context_and_reads_indicators_on_rows_that_fit():
    model, tokenizer = _tiny()
    pair = tokenize_pairs([LONG], tokenizer)
    short_context, _ = _tiny()
    short_context.config.max_position_embeddings = 40
    cut = pair_logps(short_context, pair, int(tokenizer.pad_token_id))
    by_hand = pair_logps(model, [truncate_pair(pair[0], 40)], int(tokenizer.pad_token_id))
    torch.testing.assert_close(cut, by_hand)
    long_chosen = {**LONG, "chosen": LONG["rejected"], "rejected": LONG["chosen"]}  # the indicators read the chosen
    rows = [long_chosen, LONG_PROMPT, *PAIRS]
    assert indicator_rows(rows, tokenizer, 512, 3) == PAIRS[:3]
    assert indicator_rows([LONG, *PAIRS], tokenizer, 512, 3) == [LONG, *PAIRS[:2]]  # its long rejected is not read
    assert indicator_rows(rows, tokenizer, None, 3) == rows[:3]
    assert indicator_rows([long_chosen], tokenizer, 512, 3) == []  # none fits: none read (the gate blocks on it)

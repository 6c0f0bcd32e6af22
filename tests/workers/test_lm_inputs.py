"""What the LM workers refuse before training, and how they say it: malformed JSONL and unusable pairs as
`DatasetError` "FILE:LINE: reason", a base model that is not a local directory as `ModelNotPrepared` without
touching the Hub, and requests (`checkpoint_every`, plans) that used to fail only after work was done."""

from __future__ import annotations

import json
import random
import shutil
import time

import pytest
from pydantic import ValidationError

from ground.schemas import TrainingRequest
from tests.workers.lm_helpers import PAIRS, tiny_model_dir
from workers.lm.mode_mixture_training import encode_pairs
from workers.lm.models import ModelNotPrepared, load_causal_lm, load_tokenizer
from workers.lm.plans import LMRecipe, MixtureRecipe, plan_request
from workers.lm.training.data import DatasetError, load_jsonl, tokenize_pairs

FIELDS = ["prompt", "chosen", "rejected"]
GOOD = json.dumps(PAIRS[0]).encode()


def _write(tmp_path, *lines: bytes):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.mark.parametrize(("bad", "reason"), [
    ('{"prompt": "caf\xe9", "chosen": " a", "rejected": " b"}'.encode("latin-1"), "not UTF-8"),
    (b"{not json", "not JSON (Expecting property name"),
    (b"5", "a row must be a JSON object"),
    (b"[1, 2]", "got list [1, 2]"),
])
def test_a_malformed_line_is_named_by_file_and_line(tmp_path, bad, reason):
    path = _write(tmp_path, GOOD, b"", bad)  # the blank line 2 still counts
    with pytest.raises(DatasetError, match=r"pairs\.jsonl:3: ") as caught:
        load_jsonl(path, FIELDS)
    assert reason in str(caught.value)


def test_lines_are_json_lines_not_unicode_lines(tmp_path):
    row = {**PAIRS[0], "chosen": " one\u2028two"}  # U+2028 is a line break to str.splitlines, not to JSONL
    path = tmp_path / "pairs.jsonl"
    path.write_text("\ufeff" + json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")  # with a BOM
    assert load_jsonl(path, FIELDS) == [row]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(tiny_model_dir())


@pytest.mark.parametrize(("row", "reason"), [
    ({"prompt": "Q", "chosen": " a", "rejected": None}, "'rejected' is null"),
    ({"prompt": 3, "chosen": " a", "rejected": " b"}, "'prompt' is 3"),
    ({"prompt": "", "chosen": " It is 7.", "rejected": " It is 9."}, "the prompt is empty"),
    ({"prompt": "Wh", "chosen": "at is 3 plus 4? It is 7.", "rejected": "at is 3 plus 4? It is 9."},
     "keeps no token of its own"),
])
def test_an_unusable_pair_names_its_line_even_after_sampling(tmp_path, tokenizer, row, reason):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [PAIRS[0], PAIRS[1], row]) + "\n")
    rows = random.Random(0).sample(load_jsonl(path, FIELDS), 3)  # as the condition tests sample proxy rows
    with pytest.raises(DatasetError, match=r"pairs\.jsonl:3: ") as caught:
        tokenize_pairs(rows, tokenizer)
    assert reason in str(caught.value)
    with pytest.raises(DatasetError, match=r"row 2: "):  # rows built in memory: their place in the list
        tokenize_pairs([PAIRS[0], dict(row)], tokenizer)


def test_the_mixture_refuses_a_prompt_of_no_tokens_instead_of_crashing_in_torch(tmp_path, tokenizer):
    """Serving's w(x) (`prompt_log_weights`) has no code for a prompt of no tokens, so stage 1 must not make one up."""
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(PAIRS[0]) + "\n" + json.dumps({"prompt": "", "chosen": " a", "rejected": " b"}) + "\n")
    with pytest.raises(DatasetError, match=r"pairs\.jsonl:2: the prompt is empty"):
        encode_pairs(load_causal_lm(tiny_model_dir()), tokenizer, load_jsonl(path, FIELDS), max_length=64)


def test_a_base_that_is_not_a_local_model_directory_is_not_prepared(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # a worker started without it must not reach for the Hub
    no_tokenizer = shutil.copytree(tiny_model_dir(), tmp_path / "no-tokenizer")
    for file in no_tokenizer.glob("tokenizer*"):
        file.unlink()
    started = time.monotonic()
    for base, said in ((tmp_path / "missing", "does not exist"), ("someorg/somemodel", "does not exist"),
                       (no_tokenizer, "holds none of ['tokenizer.json'")):
        with pytest.raises(ModelNotPrepared, match="proxyloop models prepare") as caught:
            load_tokenizer(base)
        assert str(base) in str(caught.value) and said in str(caught.value)
    with pytest.raises(ModelNotPrepared, match=r"missing: the directory does not exist"):
        load_causal_lm(tmp_path / "missing")
    assert time.monotonic() - started < 10  # no retries against huggingface.co


def test_tokenizers_load_from_local_files_only(monkeypatch):
    from transformers import AutoTokenizer

    seen = []
    real = AutoTokenizer.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs.get("local_files_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", spy)
    assert load_tokenizer(tiny_model_dir()).pad_token is not None
    assert seen == [True]


def test_a_feature_training_request_checkpoints_every_step_at_least():
    request = {"run_id": "r", "snapshot_id": "s", "store_url": "sqlite://", "plan": "two_stage", "output_dir": "/o"}
    assert TrainingRequest(**request, checkpoint_every=1).checkpoint_every == 1
    for every in (0, -5):
        with pytest.raises(ValidationError, match="checkpoint_every"):
            TrainingRequest(**request, checkpoint_every=every)


@pytest.mark.parametrize("recipe", [MixtureRecipe(), LMRecipe()])
@pytest.mark.parametrize("plan", ["pooled", "stage1", "bogus", "TWO_STAGE", ""])
def test_plan_request_takes_plans_only(recipe, plan):
    paths = {"run_id": "r", "base_model": "/m", "stage1_checkpoint": "/s", "expert_pairs": "/e", "output_dir": "/o"}
    with pytest.raises(ValueError, match=r"unknown plan .*known plans: \['two_stage', 'proxy_as_is'"):
        plan_request(plan, recipe, **paths)  # type: ignore[arg-type]

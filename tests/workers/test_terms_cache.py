"""The acquisition refresh's terms cache (workers/lm/terms_cache.py): a pair is encoded once per checkpoint.

A second refresh over the same pairs runs no base forward and returns the same terms; new pairs alone are
encoded; another checkpoint (a retrained mixture) misses. Without a cache directory every pair is encoded.
"""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from policies.lm.mode_mixture import ModeMixture, save_mixture_dir
from tests.workers.lm_helpers import PAIRS, tiny_model_dir
from workers.lm import mixture_features
from workers.lm.mixture_features import checkpoint_terms
from workers.lm.plans import MixtureRecipe

RECIPE = MixtureRecipe(simplex_dim=3, batch_size=4)
ROWS = [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]} for p in PAIRS]
NEW = [{"prompt": "Name a colour.", "chosen": " Blue.", "rejected": " A colour is a thing."}]


def _checkpoint(root: Path, seed: int) -> Path:
    """A mixture checkpoint as the worker writes it: the base's files with the mixture's two beside them."""
    out = root / f"stage1-{seed}"
    shutil.copytree(tiny_model_dir(), out)
    torch.manual_seed(seed)
    mixture = ModeMixture(_hidden(out), RECIPE.simplex_dim)
    with torch.no_grad():
        for p in mixture.parameters():
            p.normal_(0, 0.5)
    save_mixture_dir(mixture, out, str(tiny_model_dir()), RECIPE.to_dict())
    return out


def _hidden(model_dir: Path) -> int:
    import json

    return int(json.loads((model_dir / "config.json").read_text())["hidden_size"])


@pytest.fixture
def encoded(monkeypatch):
    """How many rows the base encoded, per call."""
    calls: list[int] = []
    real = mixture_features.encode_pairs

    def counting(base, tokenizer, rows, *args, **kwargs):
        calls.append(len(rows))
        return real(base, tokenizer, rows, *args, **kwargs)

    monkeypatch.setattr(mixture_features, "encode_pairs", counting)
    return calls


def _same(a, b) -> None:
    for field in ("log_weights", "mode_chosen", "mode_rejected", "base_chosen", "base_rejected", "prompt_code"):
        np.testing.assert_allclose(getattr(a, field), getattr(b, field), atol=1e-6, err_msg=field)
    assert a.beta == b.beta


def test_a_second_refresh_encodes_only_the_new_pairs_and_returns_the_same_terms(tmp_path, encoded):
    checkpoint, cache = _checkpoint(tmp_path, 0), tmp_path / "cache"
    first = checkpoint_terms(checkpoint, [ROWS[:2], ROWS[2:]], cache)
    assert encoded == [len(ROWS)]
    again = checkpoint_terms(checkpoint, [ROWS[:2], ROWS[2:] + NEW], cache)
    assert encoded == [len(ROWS), 1]  # the new pair only
    _same(again[0], first[0])
    _same(again[1].take(slice(0, len(ROWS) - 2)), first[1])
    uncached = checkpoint_terms(checkpoint, [ROWS[:2], ROWS[2:] + NEW])  # no cache: every row, as before
    assert encoded[-1] == len(ROWS) + 1
    _same(again[1], uncached[1])
    assert again[0].log_weights.shape == (2, RECIPE.simplex_dim) and checkpoint_terms(checkpoint, [[]], cache)[0] \
        .log_weights.shape == (0, RECIPE.simplex_dim)


def test_another_checkpoint_misses(tmp_path, encoded):
    cache = tmp_path / "cache"
    one = checkpoint_terms(_checkpoint(tmp_path, 0), [ROWS], cache)[0]
    other = checkpoint_terms(_checkpoint(tmp_path, 1), [ROWS], cache)[0]
    assert encoded == [len(ROWS), len(ROWS)]
    assert not np.allclose(one.log_weights, other.log_weights)  # its own terms, not the first checkpoint's

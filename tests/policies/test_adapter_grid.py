"""The batched (prior, fold) adapter fits are the fits `fit_adapter` makes one at a time."""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch

from ground.schemas import FeatureTriple
from ingest.synthetic import appendix_d
from ingest.synthetic_families import appendix_d_family, draw_triples
from policies.features.adapter_grid import held_out_by_prior
from policies.features.fit_recipe import ADAPTER_STAGE
from policies.features.fitting import choose_centre, fit_adapter, fit_stage1
from policies.features.model import TwoStageConfig, TwoStagePolicy, preference_log_likelihoods, triples_to_tensors


def _one_at_a_time(stack: TwoStagePolicy, x: torch.Tensor, y_w: torch.Tensor, y_l: torch.Tensor,
                   parts: list[torch.Tensor], priors: tuple[float, ...], steps: int) -> np.ndarray:
    held_out = np.zeros((len(priors), x.shape[0]))
    for i, prior in enumerate(priors):
        for k, test in enumerate(parts):
            train = torch.cat([p for j, p in enumerate(parts) if j != k])
            model = copy.deepcopy(stack)
            fit_adapter(model, x[train], y_w[train], y_l[train], k, replace(ADAPTER_STAGE, steps=steps,
                                                                            adapter_prior=prior))
            with torch.no_grad():
                held_out[i, test.numpy()] = preference_log_likelihoods(model.log_probs(x[test]), y_w[test],
                                                                       y_l[test]).numpy()
    return held_out


def _triples(kind: str) -> tuple[list[FeatureTriple], list[FeatureTriple]]:
    if kind == "ok":
        task = appendix_d(n_proxy=1500, n_expert=36, seed=4)
        return task.proxy, task.expert
    world, rng = appendix_d_family(4, kind), np.random.default_rng(5)
    return draw_triples(world, 1500, expert=False, rng=rng), draw_triples(world, 36, expert=True, rng=rng)


@pytest.mark.parametrize("kind", ["ok", "permuted"])
def test_batched_fits_match_separate_fits(kind: str) -> None:
    """A relabelled proxy makes the folds choose non-identity centres, so the per-fold centre is covered."""
    proxy, expert = _triples(kind)
    xp, wp, lp = triples_to_tensors(proxy)
    x, y_w, y_l = triples_to_tensors(expert)
    torch.manual_seed(4)
    stack = TwoStagePolicy(TwoStageConfig(input_dim=5, n_outputs=3, simplex_dim=3))
    fit_stage1(stack, xp, wp, lp, 4, replace(ADAPTER_STAGE, steps=200, lr=0.02))
    stack.freeze_proxy()
    parts = list(torch.tensor_split(torch.randperm(36, generator=torch.Generator().manual_seed(0)), 4))
    priors = (0.3, 3.0, 100.0)
    batched = held_out_by_prior(stack, x, y_w, y_l, parts, priors, replace(ADAPTER_STAGE, steps=120))
    separate = _one_at_a_time(stack, x, y_w, y_l, parts, priors, 120)
    np.testing.assert_allclose(batched, separate, atol=1e-4)
    if kind == "permuted":
        assert choose_centre(copy.deepcopy(stack), stack.log_embed(x).detach(), y_w, y_l) != 0
    assert not np.allclose(batched[0], batched[-1], atol=1e-3)  # the priors did differ

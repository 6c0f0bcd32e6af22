"""The settings of one full-batch Adam fit, and the two-stage recipe's fits: kept apart from the fitting
code so the batched prior search (adapter_grid) and the fitting code (fitting) can both read them."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from policies.features.simplex_adapter import SimplexAdapter


@dataclass(frozen=True)
class FitRecipe:
    """Full-batch Adam settings of one fit (see `fitting.fit_preferences`)."""

    steps: int
    lr: float
    weight_decay: float = 0.0  # Adam's L2 toward zero
    # Stage 2 only: a prior on the adapter's deviation from its centre worth `adapter_prior`
    # triples (weight adapter_prior·n⁻¹, so it fades as expert data grow; a fixed weight never
    # would), except re-tempering the centre, which has a prior of its own worth `tempering_prior`
    # triples: cheap, whatever the strength of the rest.
    adapter_prior: float = 0.0
    tempering_prior: float = 0.1

    def adapter_penalty(self, adapter: SimplexAdapter, n: int) -> Tensor:
        """The stage-2 prior's negative log-density per triple, for n expert triples."""
        return self.prior_per_triple(*adapter.deviation_terms(), n)

    def prior_per_triple(self, shape: Tensor, tempering: Tensor, n: int | Tensor,
                         adapter_prior: float | Tensor | None = None) -> Tensor:
        """The same from the deviation terms, with another `adapter_prior` (a tensor: one per adapter of a
        batched fit, `adapter_grid.held_out_by_prior`) in place of this recipe's when given."""
        strength = self.adapter_prior if adapter_prior is None else adapter_prior
        return (strength * shape + self.tempering_prior * tempering) / n


# The two-stage recipe (bench/appendix_d.py and docs/appendix_d.md give its figures).
PROXY_STAGE = FitRecipe(steps=400, lr=0.02, weight_decay=1e-3)
ADAPTER_STAGE = FitRecipe(steps=300, lr=0.05, adapter_prior=1.0)
EXPERT_ONLY = FitRecipe(steps=300, lr=0.02, weight_decay=1e-2)
# Full fine-tuning from the stage-1 weights, pulled back toward them with a prior worth
# FINE_TUNE_PRIOR triples (fit_preferences' anchor = FINE_TUNE_PRIOR / n).
FINE_TUNE = FitRecipe(steps=200, lr=0.02)
FINE_TUNE_PRIOR = 1.0
# Candidate prior weights for `choose_adapter_prior`, from "move freely" to "stay a tempered proxy".
ADAPTER_PRIORS = (0.3, 1.0, 3.0, 10.0, 30.0, 100.0)

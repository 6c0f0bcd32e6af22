"""What the stage-1 model says about each pair of a chat snapshot: the input of the text condition tests
(policies/lm/conditions.py), checked when it is built so that a bad reading fails by name, not deep in a fit."""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from policies.lm.mixture_learners import MixtureTerms

LOG_TOLERANCE = 1e-2  # how far above 0 a mean log-probability may round (bf16 forwards)


@dataclass(frozen=True)
class TextPairFeatures:
    """What the stage-1 model says about each pair's two responses (n pairs); stored as float64."""

    simplex_chosen: np.ndarray  # [n, D] mean over response tokens of log s, s the bottleneck's point on the D-simplex
    simplex_rejected: np.ndarray  # [n, D]
    direct_chosen: np.ndarray  # [n, K] not through the bottleneck (base model's mean last hidden state)
    direct_rejected: np.ndarray  # [n, K]
    proxy_margin: np.ndarray  # [n] stage-1 DPO implicit reward margin β·[Δ(log π1 − log π0)]
    mixture: MixtureTerms | None = None  # a mode-mixture stage 1: its two_stage is fitted exactly (mixture_learners)

    def __post_init__(self) -> None:
        for f in [f for f in fields(self) if f.name != "mixture"]:  # the arrays; MixtureTerms checks its own
            try:
                array = np.asarray(getattr(self, f.name), dtype=np.float64)
            except (TypeError, ValueError) as error:
                raise ValueError(f"{f.name} must be a numeric array: {error}") from error
            if not np.isfinite(array).all():
                raise ValueError(f"{f.name} has {int((~np.isfinite(array)).sum())} non-finite values (NaN or inf)")
            object.__setattr__(self, f.name, array)
        for a, b in (("simplex_chosen", "simplex_rejected"), ("direct_chosen", "direct_rejected")):
            shape_a, shape_b = getattr(self, a).shape, getattr(self, b).shape
            if len(shape_a) != 2 or shape_a != shape_b:
                raise ValueError(f"{a} and {b} must be 2-d arrays of one shape [n, dim], got {shape_a} and {shape_b}")
        n = self.simplex_chosen.shape[0]
        if self.direct_chosen.shape[0] != n or self.proxy_margin.shape != (n,):
            raise ValueError(f"every array needs one row per pair: simplex has {n} rows, direct "
                             f"{self.direct_chosen.shape[0]}, proxy_margin has shape {self.proxy_margin.shape}")
        if self.mixture is not None and self.mixture.log_weights.shape[0] != n:
            raise ValueError(f"mixture terms have {self.mixture.log_weights.shape[0]} rows for {n} pairs")
        if self.simplex_dim < 2 or self.direct_dim < 1:
            raise ValueError(f"need D >= 2 simplex coordinates and K >= 1 direct features, got D={self.simplex_dim}, "
                             f"K={self.direct_dim}")
        top = max(float(self.simplex_chosen.max(initial=0.0)), float(self.simplex_rejected.max(initial=0.0)))
        if top > LOG_TOLERANCE:
            raise ValueError(f"simplex_chosen/simplex_rejected must be mean log-probabilities (<= 0), found {top:.3g}: "
                             "pass log s, not s")

    @property
    def n(self) -> int:
        return int(self.simplex_chosen.shape[0])

    @property
    def simplex_dim(self) -> int:  # D
        return int(self.simplex_chosen.shape[1])

    @property
    def direct_dim(self) -> int:  # K
        return int(self.direct_chosen.shape[1])

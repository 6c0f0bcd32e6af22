"""Paper 1's two-stage policy π† = φ̃ ∘ Θ̃ ∘ π̄† ∘ τ̃ for feature inputs, its expert-only baseline,
and the Bradley–Terry preference loss both are trained with (the recipes that fit them: fitting.py).

Stage 1 learns τ̃, Θ̃ and φ̃ from abundant proxy triples while the adapter π̄† stays the identity;
stage 2 freezes them and learns only the small adapter from scarce expert triples, which is why
paper 1's bounds on the expert samples needed depend on the simplex dimension D alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ground.schemas import FeatureTriple
from policies.condition_statistics import mean_over_groups
from policies.features.simplex_adapter import SimplexAdapter


@dataclass(frozen=True)
class TwoStageConfig:
    """Shapes of the two-stage stack; saved with every checkpoint so it can be rebuilt."""

    input_dim: int = 5  # dimension of x (Appendix D: x ∈ R^5)
    n_outputs: int = 3  # |Y|, outputs are ids 0..n_outputs-1
    simplex_dim: int = 3  # D: coordinates of the simplex τ̃ embeds into; the adapter is D×D + D
    hidden: int = 32  # width of τ̃'s hidden layer

    def __post_init__(self) -> None:
        for name, minimum in (("input_dim", 1), ("n_outputs", 2), ("simplex_dim", 2), ("hidden", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"TwoStageConfig.{name} must be an int >= {minimum}, got {value!r}")

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TwoStageConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown TwoStageConfig keys {unknown}; expected a subset of {sorted(known)}")
        return cls(**dict(data))


# A dimension whose spread and centre are in these ranges is read as it is: the layers' initialisation and the
# recipes' learning rates are made for inputs of about unit scale (the benches' x ~ N(0, I) are read unchanged).
UNIT_LIKE_STD = (0.05, 20.0)
UNIT_LIKE_MEAN = 5.0


class InputScaling(nn.Module):
    """x ↦ (x − shift) / scale per dimension, fitted once, on the first data a model is trained on (`fit`).

    Why: user features come in any unit (a timestamp near 1.7e9, a probability near 1e-6, one column in metres and
    another in km). Fed raw, tanh saturates or the weights cannot grow large enough in the recipe's steps, and the
    model learns nothing while every condition still passes. Dimensions already about unit scale are left alone
    (UNIT_LIKE_*); the rest are standardised; a constant one is only centred. Saved with the weights, so serving
    applies the same map.
    """

    shift: Tensor
    scale: Tensor
    fitted: Tensor

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("shift", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))
        self.register_buffer("fitted", torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.shift) / self.scale

    @torch.no_grad()
    def fit(self, x: Tensor) -> None:
        data = x.double()
        mean, std = data.mean(dim=0), data.std(dim=0, correction=0)
        unit_like = (std >= UNIT_LIKE_STD[0]) & (std <= UNIT_LIKE_STD[1]) & (mean.abs() <= UNIT_LIKE_MEAN)
        constant = std <= 1e-12 * (1.0 + mean.abs())
        self.shift.copy_(torch.where(unit_like, 0.0, mean))
        self.scale.copy_(torch.where(unit_like | constant, 1.0, std))
        self.fitted.fill_(1.0)


def scale_inputs_once(model: object, x: Tensor) -> None:
    """Fit a policy's InputScaling on `x` unless it was fitted (stage 1 fits it; stage 2 and fine-tuning keep it)."""
    inputs = getattr(model, "inputs", None)
    if isinstance(inputs, InputScaling) and not bool(inputs.fitted):
        inputs.fit(x)


class TwoStagePolicy(nn.Module):
    """Paper 1's factorisation for x ∈ R^input_dim and Y = {0..n_outputs-1}."""

    def __init__(self, config: TwoStageConfig | None = None) -> None:
        super().__init__()
        self.config = config or TwoStageConfig()
        c = self.config
        self.inputs = InputScaling(c.input_dim)  # part of τ̃: fitted on the proxy's x in stage 1
        # τ̃: x -> point on the D-simplex (kept in log-coordinates for numerical stability).
        self.encoder = nn.Sequential(nn.Linear(c.input_dim, c.hidden), nn.Tanh(), nn.Linear(c.hidden, c.simplex_dim))
        self.adapter = SimplexAdapter(c.simplex_dim)  # π̄†, the only part stage 2 trains
        self.theta = nn.Linear(c.simplex_dim, c.simplex_dim)  # Θ̃, linear on log-ratio coordinates
        self.output_map = nn.Linear(c.simplex_dim, c.n_outputs)  # φ̃, to logits over Y

    def log_embed(self, x: Tensor) -> Tensor:
        """log τ̃(x): [B, input_dim] -> [B, D]."""
        return F.log_softmax(self.encoder(self.inputs(x)), dim=-1)

    def embed(self, x: Tensor) -> Tensor:
        """τ̃(x), a point on the D-simplex: [B, input_dim] -> [B, D], rows sum to 1."""
        return self.log_embed(x).exp()

    def head(self, log_u: Tensor) -> Tensor:
        """φ̃ ∘ Θ̃ on a simplex point given in log-coordinates: [B, D] -> logits [B, n_outputs]."""
        # Centring gives log-ratio coordinates: the normaliser of log u carries no information.
        centred = log_u - log_u.mean(dim=-1, keepdim=True)
        return self.output_map(self.theta(centred))

    def head_affine(self) -> tuple[Tensor, Tensor]:
        """The head as one affine map of the adapter's pre-softmax output u = M log s + b:
        logits = gain·u + offset, gain [n_outputs, D] (centring folded in), offset [n_outputs]."""
        with torch.no_grad():
            dim = self.config.simplex_dim
            weight = self.theta.weight
            centring = torch.eye(dim, device=weight.device, dtype=weight.dtype) - 1.0 / dim
            gain = self.output_map.weight @ self.theta.weight @ centring
            offset = self.output_map.weight @ self.theta.bias + self.output_map.bias
        return gain, offset

    def logits(self, x: Tensor) -> Tensor:
        return self.head(self.adapter(self.log_embed(x)))

    def log_probs(self, x: Tensor) -> Tensor:
        """log π†(y|x): [B, input_dim] -> [B, n_outputs]."""
        return F.log_softmax(self.logits(x), dim=-1)

    def adapter_parameters(self) -> list[nn.Parameter]:
        return list(self.adapter.parameters())

    def proxy_parameters(self) -> list[nn.Parameter]:
        """Everything learned from proxy data: τ̃, Θ̃ and φ̃ (all but the adapter)."""
        adapter_ids = {id(p) for p in self.adapter.parameters()}
        return [p for p in self.parameters() if id(p) not in adapter_ids]

    def freeze_proxy(self) -> None:
        for p in self.proxy_parameters():
            p.requires_grad_(False)

    def set_stage(self, stage: int) -> None:
        """Stage 1 trains the proxy stack with the adapter fixed; stage 2 trains only the adapter."""
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 (proxy stack) or 2 (adapter only), got {stage!r}")
        for p in self.proxy_parameters():
            p.requires_grad_(stage == 1)
        for p in self.adapter_parameters():
            p.requires_grad_(stage == 2)


class DirectPolicy(nn.Module):
    """Expert-only baseline: an MLP from x straight to logits, no proxy structure."""

    def __init__(self, input_dim: int = 5, n_outputs: int = 3, hidden: int = 32) -> None:
        super().__init__()
        if input_dim < 1 or n_outputs < 2 or hidden < 1:
            raise ValueError(
                f"DirectPolicy needs input_dim >= 1, n_outputs >= 2, hidden >= 1; "
                f"got input_dim={input_dim}, n_outputs={n_outputs}, hidden={hidden}"
            )
        self.inputs = InputScaling(input_dim)
        self.net = nn.Sequential(nn.Linear(input_dim, hidden), nn.Tanh(), nn.Linear(hidden, n_outputs))

    def logits(self, x: Tensor) -> Tensor:
        return self.net(self.inputs(x))

    def log_probs(self, x: Tensor) -> Tensor:
        return F.log_softmax(self.logits(x), dim=-1)


class PreferenceModel(Protocol):
    """Anything trainable on preferences: both policies above, or a module wrapping one."""

    def log_probs(self, x: Tensor) -> Tensor: ...

    def train(self, mode: bool = True) -> Any: ...

    def eval(self) -> Any: ...


def _chosen_margin(log_probs: Tensor, y_w: Tensor, y_l: Tensor) -> Tensor:
    # [B, Y] -> [B]: log π(y_w|x) - log π(y_l|x)
    assert log_probs.ndim == 2 and y_w.shape == y_l.shape == log_probs.shape[:1], "shape mismatch"
    lw = log_probs.gather(1, y_w.view(-1, 1)).squeeze(1)
    ll = log_probs.gather(1, y_l.view(-1, 1)).squeeze(1)
    return lw - ll


def preference_loss(log_probs: Tensor, y_w: Tensor, y_l: Tensor) -> Tensor:
    """Bradley–Terry negative log-likelihood, mean over the batch of −log σ(log π(y_w) − log π(y_l))."""
    return -F.logsigmoid(_chosen_margin(log_probs, y_w, y_l)).mean()


def preference_log_likelihoods(log_probs: Tensor, y_w: Tensor, y_l: Tensor) -> Tensor:
    """Per-triple Bradley–Terry log-likelihood [B] (the quantity cross-validation compares)."""
    return F.logsigmoid(_chosen_margin(log_probs, y_w, y_l))


def ranked_right(model: PreferenceModel, x: Tensor, y_w: Tensor, y_l: Tensor, tie: float = 0.0) -> np.ndarray:
    """Per triple, 1.0 where log π(y_w|x) > log π(y_l|x), `tie` where equal (wrong by default, as the gate's accuracy
    counts them; a half for the test against a coin, which a label flip leaves alone), else 0.0; NaN where the margin
    is NaN (a model with NaN weights has no ranking, where counting its NaN margins as wrong read 0.0 as a
    measurement)."""
    with torch.no_grad():
        margin = _chosen_margin(model.log_probs(x), y_w, y_l)
    right = (margin > 0).double() + tie * (margin == 0).double()
    right[margin.isnan()] = float("nan")
    result: np.ndarray = right.cpu().numpy()
    return result


def pairwise_accuracy(
    model: PreferenceModel, x: Tensor, y_w: Tensor, y_l: Tensor, groups: np.ndarray | None = None,
) -> float:
    """Fraction of triples `ranked_right`, counted exactly (7 of 10 is 0.7, which a float32 mean is not, and the gate
    compares it with its 0.7 floor); NaN when any margin is NaN. With `groups` (copies of one input:
    `condition_statistics.input_groups`), each input counts once (`mean_over_groups`)."""
    if x.shape[0] == 0:
        raise ValueError("pairwise_accuracy needs at least one triple, got an empty batch")
    right = ranked_right(model, x, y_w, y_l)
    if np.isnan(right).any():
        return float("nan")
    return mean_over_groups(right, np.arange(len(right)) if groups is None else groups)


def triples_to_tensors(triples: Sequence[FeatureTriple]) -> tuple[Tensor, Tensor, Tensor]:
    """Feature triples -> (x float32 [N, d], y_w long [N], y_l long [N])."""
    if not triples:
        raise ValueError("triples_to_tensors got no triples")
    dims = {len(t.x) for t in triples}
    if len(dims) != 1:
        raise ValueError(f"all triples need the same input dimension, found {sorted(dims)}")
    x = torch.tensor([t.x for t in triples], dtype=torch.float32)
    y_w = torch.tensor([t.y_w for t in triples], dtype=torch.long)
    y_l = torch.tensor([t.y_l for t in triples], dtype=torch.long)
    return x, y_w, y_l

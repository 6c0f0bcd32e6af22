"""Paper 1's two-stage policy π† = φ̃ ∘ Θ̃ ∘ π̄† ∘ τ̃ for feature inputs, its expert-only baseline,
and the Bradley–Terry preference loss both are trained with.

Stage 1 learns τ̃, Θ̃ and φ̃ from abundant proxy triples while the adapter π̄† stays the identity;
stage 2 freezes them and learns only the small adapter from scarce expert triples, which is why
paper 1's bounds on the expert samples needed depend on the simplex dimension D alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ground.schemas import FeatureTriple
from policies.simplex_adapter import SimplexAdapter, relabelled_centres


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


class TwoStagePolicy(nn.Module):
    """Paper 1's factorisation for x ∈ R^input_dim and Y = {0..n_outputs-1}."""

    def __init__(self, config: TwoStageConfig | None = None) -> None:
        super().__init__()
        self.config = config or TwoStageConfig()
        c = self.config
        # τ̃: x -> point on the D-simplex (kept in log-coordinates for numerical stability).
        self.encoder = nn.Sequential(nn.Linear(c.input_dim, c.hidden), nn.Tanh(), nn.Linear(c.hidden, c.simplex_dim))
        self.adapter = SimplexAdapter(c.simplex_dim)  # π̄†, the only part stage 2 trains
        self.theta = nn.Linear(c.simplex_dim, c.simplex_dim)  # Θ̃, linear on log-ratio coordinates
        self.output_map = nn.Linear(c.simplex_dim, c.n_outputs)  # φ̃, to logits over Y

    def log_embed(self, x: Tensor) -> Tensor:
        """log τ̃(x): [B, input_dim] -> [B, D]."""
        return F.log_softmax(self.encoder(x), dim=-1)

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
        self.net = nn.Sequential(nn.Linear(input_dim, hidden), nn.Tanh(), nn.Linear(hidden, n_outputs))

    def logits(self, x: Tensor) -> Tensor:
        return self.net(x)

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


def pairwise_accuracy(model: PreferenceModel, x: Tensor, y_w: Tensor, y_l: Tensor) -> float:
    """Fraction of triples with log π(y_w|x) > log π(y_l|x); ties count as wrong."""
    if x.shape[0] == 0:
        raise ValueError("pairwise_accuracy needs at least one triple, got an empty batch")
    with torch.no_grad():
        margin = _chosen_margin(model.log_probs(x), y_w, y_l)
    return float((margin > 0).float().mean())


def fit_preferences(
    model: PreferenceModel,
    parameters: Iterator[nn.Parameter] | Sequence[nn.Parameter],
    x: Tensor,
    y_w: Tensor,
    y_l: Tensor,
    steps: int,
    lr: float,
    seed: int,
    on_step: Callable[[int, float], None] | None = None,
    *,
    weight_decay: float = 0.0,
    anchor: float = 0.0,
    penalty: Callable[[], Tensor] | None = None,
    after_step: Callable[[int], None] | None = None,
) -> float:
    """Full-batch Adam on the Bradley–Terry loss over `parameters`; returns the final loss.

    Only `parameters` move (pass `model.adapter_parameters()` for stage 2). The seed fixes torch's
    RNG inside the fit without disturbing the caller's, so equal inputs give equal results.
    `on_step(step, loss)` sees the loss before each update.

    `weight_decay` is Adam's L2 toward zero. `anchor` adds anchor·Σ‖p − p₀‖² toward the values the
    parameters had when the fit started: for the adapter that is the identity map, which keeps a
    fit on a few dozen separable triples from diverging to overconfident predictions. `penalty()`
    is any further term added to the objective (e.g. a weighted `SimplexAdapter.deviation`).
    `after_step(k)` runs after the k-th update (k = 1..steps): where a caller saves checkpoints.
    """
    params = [p for p in parameters if p.requires_grad]
    if not params:
        raise ValueError("fit_preferences got no trainable parameters; check set_stage()/requires_grad")
    if steps < 1 or lr <= 0:
        raise ValueError(f"fit_preferences needs steps >= 1 and lr > 0, got steps={steps}, lr={lr}")
    if x.shape[0] == 0:
        raise ValueError("fit_preferences needs at least one triple, got an empty batch")
    if weight_decay < 0 or anchor < 0:
        raise ValueError(f"weight_decay and anchor must be >= 0, got {weight_decay} and {anchor}")
    start = [p.detach().clone() for p in params] if anchor > 0 else []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        optimiser = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
        model.train()
        for step in range(steps):
            optimiser.zero_grad(set_to_none=True)
            loss = preference_loss(model.log_probs(x), y_w, y_l)
            objective = loss
            if start:
                objective = loss + anchor * sum(((p - p0) ** 2).sum() for p, p0 in zip(params, start, strict=True))
            if penalty is not None:
                objective = objective + penalty()
            objective.backward()
            if on_step is not None:
                on_step(step, float(loss.detach()))
            optimiser.step()
            if after_step is not None:
                after_step(step + 1)
        model.eval()
        with torch.no_grad():
            return float(preference_loss(model.log_probs(x), y_w, y_l))


@dataclass(frozen=True)
class FitRecipe:
    """Full-batch Adam settings of one fit (see `fit_preferences`)."""

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
        shape, tempering = adapter.deviation_terms()
        return (self.adapter_prior * shape + self.tempering_prior * tempering) / n


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


class _OnEmbedding(nn.Module):
    """A stack's adapter and head on precomputed log τ̃(x): stage 2 without re-running the frozen τ̃."""

    def __init__(self, stack: TwoStagePolicy) -> None:
        super().__init__()
        self.stack = stack

    def log_probs(self, log_s: Tensor) -> Tensor:
        return F.log_softmax(self.stack.head(self.stack.adapter(log_s)), dim=-1)


def fit_stage1(
    stack: TwoStagePolicy, x: Tensor, y_w: Tensor, y_l: Tensor, seed: int, recipe: FitRecipe = PROXY_STAGE,
    on_step: Callable[[int, float], None] | None = None, after_step: Callable[[int], None] | None = None,
) -> float:
    """Stage 1 in place: τ̃, Θ̃, φ̃ on proxy triples, the adapter held at the identity."""
    stack.adapter.reset(identity=True)
    stack.set_stage(1)
    return fit_preferences(stack, stack.proxy_parameters(), x, y_w, y_l, recipe.steps, recipe.lr, seed, on_step,
                           weight_decay=recipe.weight_decay, after_step=after_step)


def choose_centre(stack: TwoStagePolicy, log_s: Tensor, y_w: Tensor, y_l: Tensor) -> int:
    """Set the adapter's centre to the relabelling of the frozen head's outputs (identity included)
    that best explains these expert triples, and start the adapter there; returns its index in
    `relabelled_centres` (0: identity).

    log_s = stack.log_embed(x). A relabelling must beat the identity by log(K − 1) nats, K the number
    of candidates: a prior with half its mass on keeping the proxy's labels and the rest spread over
    the relabellings, so a handful of triples does not relabel a proxy that is merely noisy.
    """
    gain, offset = stack.head_affine()
    candidates = relabelled_centres(gain, offset)
    with torch.no_grad():
        logits = [(log_s @ m.T + b) @ gain.T + offset for m, b in candidates]
        scores = [float(preference_log_likelihoods(F.log_softmax(z, dim=-1), y_w, y_l).sum()) for z in logits]
    cost = float(np.log(max(len(candidates) - 1, 1)))
    best = max(range(len(candidates)), key=lambda k: scores[k] - (cost if k else 0.0))
    stack.adapter.set_centre(*candidates[best])
    stack.adapter.reset()
    return best


def fit_adapter(
    stack: TwoStagePolicy, x: Tensor, y_w: Tensor, y_l: Tensor, seed: int, recipe: FitRecipe = ADAPTER_STAGE,
    on_step: Callable[[int, float], None] | None = None, after_step: Callable[[int], None] | None = None,
) -> float:
    """Stage 2 in place: only the adapter, from the centre `choose_centre` picks, on expert
    triples; the rest frozen."""
    stack.set_stage(2)
    with torch.no_grad():
        log_s = stack.log_embed(x)  # τ̃ is frozen: embed once, not once per step
    choose_centre(stack, log_s, y_w, y_l)
    n = x.shape[0]
    has_prior = recipe.adapter_prior > 0 or recipe.tempering_prior > 0
    penalty = (lambda: recipe.adapter_penalty(stack.adapter, n)) if has_prior else None
    return fit_preferences(_OnEmbedding(stack), stack.adapter_parameters(), log_s, y_w, y_l, recipe.steps,
                           recipe.lr, seed, on_step, weight_decay=recipe.weight_decay, penalty=penalty,
                           after_step=after_step)


def choose_adapter_prior(
    stack: TwoStagePolicy, x: Tensor, y_w: Tensor, y_l: Tensor, seed: int, folds: int = 5,
    priors: Sequence[float] = ADAPTER_PRIORS, recipe: FitRecipe = ADAPTER_STAGE,
) -> float:
    """The adapter prior chosen by `folds`-fold cross-validated log-likelihood on these expert
    triples alone (no other data is looked at); the stack is left as it was.

    One-standard-error rule: the strongest prior whose held-out log-likelihood is within one
    standard error (of its paired difference per triple) of the best. On a few dozen triples the
    best CV score is mostly noise, and the weaker priors it picks let the adapter wander from a
    centre that is usually right (Appendix D: 35 triples, see docs/appendix_d.md).
    """
    n = x.shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    parts = [p for p in torch.tensor_split(order, min(folds, n)) if len(p)]
    saved = {k: v.clone() for k, v in stack.adapter.state_dict().items()}
    held_out = np.zeros((len(priors), n))
    for i, prior in enumerate(priors):
        for k, test in enumerate(parts):
            train = torch.cat([p for j, p in enumerate(parts) if j != k])
            fit_adapter(stack, x[train], y_w[train], y_l[train], seed + k, replace(recipe, adapter_prior=prior))
            with torch.no_grad():
                ll = preference_log_likelihoods(stack.log_probs(x[test]), y_w[test], y_l[test])
            held_out[i, test.numpy()] = ll.numpy()
    stack.adapter.load_state_dict(saved)
    means = held_out.mean(axis=1)
    best = int(np.argmax(means))
    standard_errors = (held_out[best] - held_out).std(axis=1, ddof=1) / np.sqrt(n) if n > 1 else np.zeros(len(priors))
    eligible = [i for i in range(len(priors)) if means[i] >= means[best] - standard_errors[i]]
    return float(max(priors[i] for i in eligible))


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

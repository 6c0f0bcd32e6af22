"""Synthetic preference data in paper 1's Appendix D setting, with known gold policies.

Two families. `ingest.synthetic_families.appendix_d_family` is the issue's exact specification of
Appendix D (expert logits tanh(xW)A; proxies of several kinds), used by bench/appendix_d.py. The
`appendix_d` worlds below are the demo's and the condition tests' family, with one variant per
broken condition.

x ∈ R^5 ~ N(0, I5). The proxy is π(x) = softmax(s·A·u(x) + c) with a 2-dimensional latent
u(x) = tanh(W2 tanh(W1 x + c1)) from a fixed random network; the expert is
π†(x) = g(π(x)) = softmax(P·log π(x) / T + b), a relabelling (permutation P), tempering (T) and
re-weighting (b) of the proxy — an injective map of the simplex, so the four conditions hold in the
"ok" variant. Each other variant breaks one condition in how the data are generated, so the
condition tests and the two-stage learner can be checked against ground truth.

Why a two-layer latent rather than u = tanh(B x): with a near-linear map of x an expert-only
learner already ranks ~90% of held-out pairs right from 48 triples and no proxy can help; paper 1's
premise is an input-to-output map that needs many samples, with a simple map g on top of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from ground.schemas import FeatureTriple

FloatArray = NDArray[np.float64]

VARIANTS = ("ok", "merged_level_sets", "missing_image", "high_dim", "large_L")

INPUT_DIM = 5  # Appendix D: X = R^5
N_OUTPUTS = 3  # Appendix D: |Y| = 3 (ids 0..2)
HIGH_DIM_OUTPUTS = 12  # "high_dim": enough outputs for a 5-dimensional proxy image
LATENT_DIM = 2  # the proxy sees x only through a 2-dimensional latent (low-dimensional image)
ENCODER_WIDTH = 16  # hidden units of the random network that makes the latent
HIDDEN_GAIN = 1.0  # std of its first-layer weights: how nonlinear x -> latent is
LATENT_GAIN = 2.0  # scale of its second layer: how much of the latent square is covered
READOUT_SCALE = 3.0  # logit spread of the proxy: peaked enough that preferences carry signal
EXPERT_TEMPERATURE = 0.5  # expert is a sharpened proxy: true similarity constant L = 1/T = 2
OVERSMOOTHING = 0.04  # "large_L": proxy logits shrunk 25×, so L = 1/(T·0.04) = 50
MERGED_HIDDEN_BOOST = 1.5  # "merged_level_sets": weight of the coordinates only the expert reads
SUPPRESSED_LOGIT = -8.0  # "missing_image": proxy logit offset for output 2, which it then never prefers


@dataclass(frozen=True, eq=False)
class SyntheticWorld:
    """The gold proxy and expert policies of one synthetic task (for evaluation, not training)."""

    variant: str
    input_dim: int
    n_outputs: int
    hidden_weight: FloatArray  # W1: [ENCODER_WIDTH, input_dim]
    hidden_bias: FloatArray  # c1: [ENCODER_WIDTH]
    latent_weight: FloatArray  # W2: [latent, ENCODER_WIDTH]
    readout: FloatArray  # A: [n_outputs, latent]
    proxy_inputs: FloatArray  # [input_dim] 0/1 mask of the coordinates the proxy reads
    proxy_smoothing: float  # proxy logits are this times the base logits (1 = no over-smoothing)
    offset: FloatArray  # c: [n_outputs]
    permutation: tuple[int, ...]  # expert logit k is the transformed logit of permutation[k]
    temperature: float  # T
    expert_bias: FloatArray  # b: [n_outputs]

    def _base_logits(self, x: FloatArray, mask: FloatArray | None = None) -> FloatArray:
        # s·A·u(x) + c with the latent u(x) = tanh(W2 tanh(W1 x + c1)): a nonlinear map of x
        # onto a low-dimensional set, hard to learn from few triples, easy from many.
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.input_dim:
            raise ValueError(f"x must have shape [N, {self.input_dim}], got {x.shape}")
        if mask is not None:
            x = x * mask
        hidden = np.tanh(x @ self.hidden_weight.T + self.hidden_bias)
        latent = np.tanh(hidden @ self.latent_weight.T)
        result: FloatArray = READOUT_SCALE * latent @ self.readout.T + self.offset
        return result

    def proxy_log_probs(self, x: FloatArray) -> FloatArray:
        """log π(y|x): [N, input_dim] -> [N, n_outputs]."""
        return _log_softmax(self.proxy_smoothing * self._base_logits(x, self.proxy_inputs))

    def expert_log_probs(self, x: FloatArray) -> FloatArray:
        """log π†(y|x) = log softmax(P·log π_e(x)/T + b): [N, input_dim] -> [N, n_outputs].

        π_e is π without the masking of inputs ("merged_level_sets") or the over-smoothing
        ("large_L"); in the other variants π_e = π, so π† = g(π) exactly.
        """
        base = _log_softmax(self._base_logits(x))
        return _log_softmax(base[:, list(self.permutation)] / self.temperature + self.expert_bias)

    def proxy_probs(self, x: FloatArray) -> FloatArray:
        return np.exp(self.proxy_log_probs(x))

    def expert_probs(self, x: FloatArray) -> FloatArray:
        return np.exp(self.expert_log_probs(x))


@dataclass
class SyntheticTask:
    """Proxy, expert and held-out expert triples drawn from one world."""

    proxy: list[FeatureTriple]
    expert: list[FeatureTriple]
    expert_heldout: list[FeatureTriple]
    variant: str
    world: SyntheticWorld = field(repr=False)  # gold policies, for evaluation only
    n_outputs: int = N_OUTPUTS


def _log_softmax(z: FloatArray) -> FloatArray:
    shifted = z - z.max(axis=1, keepdims=True)
    result: FloatArray = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return result


def _make_world(variant: str, rng: np.random.Generator) -> SyntheticWorld:
    n_outputs = HIGH_DIM_OUTPUTS if variant == "high_dim" else N_OUTPUTS
    # "high_dim": a full-rank latent, so the proxy image is as large as the input space.
    latent = INPUT_DIM if variant == "high_dim" else LATENT_DIM
    hidden_weight = rng.standard_normal((ENCODER_WIDTH, INPUT_DIM)) * HIDDEN_GAIN
    hidden_bias = rng.normal(0.0, 0.5, size=ENCODER_WIDTH)
    latent_weight = rng.standard_normal((latent, ENCODER_WIDTH)) * (LATENT_GAIN / np.sqrt(ENCODER_WIDTH))
    if variant == "high_dim":
        readout = rng.standard_normal((n_outputs, latent)) / np.sqrt(latent)
    else:
        # Readout directions 120° apart so every output is the proxy's favourite somewhere.
        angles = 2 * np.pi * np.arange(n_outputs) / n_outputs + rng.uniform(0, 2 * np.pi)
        readout = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    offset = rng.normal(0.0, 0.2, size=n_outputs)
    expert_bias = rng.normal(0.0, 0.3, size=n_outputs)
    proxy_inputs = np.ones(INPUT_DIM)
    proxy_smoothing = 1.0
    if variant == "merged_level_sets":
        # The proxy reads only x[0] and x[1]; the expert reads all five coordinates, so inputs
        # that differ only in x[2:] are one point to the proxy and several to the expert.
        # The expert leans on x[2:] harder than in "ok", so the information the proxy drops
        # is a large part of the expert's choice rather than a nuance 48 triples cannot detect.
        proxy_inputs[2:] = 0.0
        hidden_weight[:, 2:] *= MERGED_HIDDEN_BOOST
    elif variant == "missing_image":
        offset[2] = SUPPRESSED_LOGIT  # the proxy never prefers output 2; the expert (permuted) does
    elif variant == "large_L":
        proxy_smoothing = OVERSMOOTHING
    permutation = tuple(int(i) for i in np.roll(np.arange(n_outputs), -1))  # a cyclic relabelling
    return SyntheticWorld(
        variant=variant,
        input_dim=INPUT_DIM,
        n_outputs=n_outputs,
        hidden_weight=hidden_weight,
        hidden_bias=hidden_bias,
        latent_weight=latent_weight,
        readout=readout,
        proxy_inputs=proxy_inputs,
        proxy_smoothing=proxy_smoothing,
        offset=offset,
        permutation=permutation,
        temperature=EXPERT_TEMPERATURE,
        expert_bias=expert_bias,
    )


def sample_triples(probs: FloatArray, x: FloatArray, rng: np.random.Generator) -> list[FeatureTriple]:
    """Bradley–Terry draws: two distinct outputs uniformly, the first wins w.p. p(a)/(p(a)+p(b))."""
    n, n_outputs = probs.shape
    a = rng.integers(0, n_outputs, size=n)
    b = (a + rng.integers(1, n_outputs, size=n)) % n_outputs  # uniform over outputs other than a
    rows = np.arange(n)
    p_a, p_b = probs[rows, a], probs[rows, b]
    a_wins = rng.random(n) < p_a / (p_a + p_b)
    y_w = np.where(a_wins, a, b)
    y_l = np.where(a_wins, b, a)
    return [FeatureTriple(x=[float(v) for v in x[i]], y_w=int(y_w[i]), y_l=int(y_l[i])) for i in range(n)]


def appendix_d(
    n_proxy: int = 3000, n_expert: int = 48, n_heldout: int = 400, seed: int = 0, variant: str = "ok"
) -> SyntheticTask:
    """Draw a world (from `seed`) and proxy / expert / held-out expert triples from it."""
    if variant not in VARIANTS:
        raise ValueError(f"Unknown synthetic variant {variant!r}; should be one of {list(VARIANTS)}")
    for name, value in (("n_proxy", n_proxy), ("n_expert", n_expert), ("n_heldout", n_heldout)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    rng = np.random.default_rng(seed)
    world = _make_world(variant, rng)

    def draw(n: int, expert: bool) -> list[FeatureTriple]:
        x = rng.standard_normal((n, INPUT_DIM))
        probs = world.expert_probs(x) if expert else world.proxy_probs(x)
        return sample_triples(probs, x, rng)

    return SyntheticTask(
        proxy=draw(n_proxy, expert=False),
        expert=draw(n_expert, expert=True),
        expert_heldout=draw(n_heldout, expert=True),
        variant=variant,
        n_outputs=world.n_outputs,
        world=world,
    )

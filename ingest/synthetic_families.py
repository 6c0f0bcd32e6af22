"""The Appendix D family as issue 6 specifies it, and proxies of its expert of several kinds (issue 15).

Expert (every kind, same W, A per seed): x ~ N(0, I5), Y = {0, 1, 2}, W ∈ R^{5×2} ~ N(0, 1.5²),
A ∈ R^{2×3} ~ N(0, 2²), π†(x) = softmax(z(x)), z(x) = tanh(xW)A. The proxy kinds, with the paper-1
condition each satisfies or breaks (shared level sets ⇔ a fixed map g with π† = g ∘ π exists):

- `permuted` (satisfies): the expert's answers under a fixed non-identity relabelling σ.
- `tempered` (satisfies, L = 3): softmax(z / 3), paper 1's over-smoothed proxy.
- `invertible` (satisfies): the expert's centred logits through a fixed invertible linear map of the
  log-ratio plane that is neither a relabelling nor a tempering (a rotation by 20°–40° times unequal
  scalings, then an offset): g inverts it. A learner that only searches relabellings and
  temperatures does not contain it; a general D×D adapter does.
- `more_outputs` (satisfies): the proxy answers over six outputs, the expert's three plus three it
  never gives (other fixed linear readouts of the same logits, offset down); π† is π restricted to
  {0, 1, 2} and renormalised, so g = "drop the extra outputs", and every expert output is a proxy output.
- `partly_wrong` (violates shared level sets): the proxy relabels the expert's answers by σ, but only on
  the region x·v > 0.5 of input space (v a fixed unit vector, ~31% of inputs). An input x inside and
  an x' outside with z(x') = z(x)∘σ get the same proxy answer but different expert answers.
- `blind_direction` (violates shared level sets): the proxy reads x with the direction v = W₁/‖W₁‖ (the
  expert's first latent direction) projected out: x and x + t·v are one point to the proxy and two
  to the expert, so no g exists.

Seeds 0–49 are for tuning anything (thresholds, priors, recipes); benches report seeds 100 and up.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ground.schemas import FeatureTriple
from ingest.synthetic import INPUT_DIM, N_OUTPUTS, FloatArray, _log_softmax, sample_triples

FAMILY_PROXIES = ("permuted", "tempered", "invertible", "more_outputs", "partly_wrong", "blind_direction")
SATISFYING_FAMILIES = ("permuted", "tempered", "invertible", "more_outputs")
VIOLATING_FAMILIES = ("partly_wrong", "blind_direction")
FAMILY_LATENT = 2  # W ∈ R^{5×2}, A ∈ R^{2×3}
FAMILY_W_STD = 1.5  # entries of W ~ N(0, 1.5²)
FAMILY_A_STD = 2.0  # entries of A ~ N(0, 2²)
FAMILY_TEMPERATURE = 3.0  # proxy (b): softmax of the expert's logits / 3 (paper 1's over-smoothing)
# "invertible": rotation of the log-ratio plane by 20°–40°, either sign: as far as can be from the multiples
# of 60°, which are the cyclic relabellings (120°, 240°) and their negations (60°, 180°, 300°).
MIXING_ANGLES = (np.pi / 9, 2 * np.pi / 9)
MIXING_SCALES = (0.5, 2.0)  # ... times scalings of its two axes, each log-uniform in this range
EXTRA_OUTPUTS = 3  # "more_outputs": outputs only the proxy gives
EXTRA_OFFSET = -1.0  # ... their logits' offset: the expert's outputs stay the proxy's usual favourites
REGION_THRESHOLD = 0.5  # "partly_wrong": relabelled where x·v > this (P ≈ 0.31 for x ~ N(0, I))


def centred_basis(n: int = N_OUTPUTS) -> FloatArray:
    """U [n, n−1]: an orthonormal basis of the logits orthogonal to the all-ones vector."""
    q, _ = np.linalg.qr(np.eye(n) - 1.0 / n)
    basis: FloatArray = q[:, : n - 1]
    return basis


@dataclass(frozen=True, eq=False)
class FamilyWorld:
    """Expert π†(x) = softmax(tanh(xW)A) and one proxy of it, for x ∈ R^5; the expert answers in
    {0, 1, 2}, the proxy in {0 .. n_outputs − 1} (n_outputs = 6 for "more_outputs", else 3)."""

    proxy_kind: str
    weight: FloatArray  # W: [5, 2]
    readout: FloatArray  # A: [2, 3]
    permutation: tuple[int, ...]  # σ, a non-identity permutation of Y ("permuted", "partly_wrong")
    temperature: float = FAMILY_TEMPERATURE
    input_dim: int = INPUT_DIM
    n_outputs: int = N_OUTPUTS
    # "invertible": proxy logits = z·mixing + mixing_offset (mixing = U R Uᵀ, R invertible 2×2)
    mixing: FloatArray = field(default_factory=lambda: np.eye(N_OUTPUTS))
    mixing_offset: FloatArray = field(default_factory=lambda: np.zeros(N_OUTPUTS))
    # "more_outputs": logits of the extra outputs = z·extra_readout + EXTRA_OFFSET
    extra_readout: FloatArray = field(default_factory=lambda: np.zeros((N_OUTPUTS, EXTRA_OUTPUTS)))
    # "partly_wrong": the region's normal; "blind_direction": the direction the proxy cannot see
    direction: FloatArray = field(default_factory=lambda: np.zeros(INPUT_DIM))

    @property
    def expert_outputs(self) -> int:
        return N_OUTPUTS

    def expert_logits(self, x: FloatArray) -> FloatArray:
        """tanh(xW)A: [N, 5] -> [N, 3]."""
        result: FloatArray = np.tanh(np.asarray(x, dtype=np.float64) @ self.weight) @ self.readout
        return result

    def expert_log_probs(self, x: FloatArray) -> FloatArray:
        return _log_softmax(self.expert_logits(x))

    def proxy_logits(self, x: FloatArray) -> FloatArray:
        """[N, 5] -> [N, n_outputs]: the proxy's logits (up to a constant per row)."""
        x = np.asarray(x, dtype=np.float64)
        kind, z = self.proxy_kind, self.expert_logits(x)
        if kind == "permuted":
            return z[:, list(self.permutation)]
        if kind == "tempered":
            return z / self.temperature
        if kind == "invertible":
            result: FloatArray = z @ self.mixing + self.mixing_offset
            return result
        if kind == "more_outputs":
            return np.concatenate([z, z @ self.extra_readout + EXTRA_OFFSET], axis=1)
        if kind == "partly_wrong":
            inside = (x @ self.direction > REGION_THRESHOLD)[:, None]
            return np.where(inside, z[:, list(self.permutation)], z)
        blind = x - np.outer(x @ self.direction, self.direction)  # "blind_direction"
        blind_logits: FloatArray = np.tanh(blind @ self.weight) @ self.readout
        return blind_logits

    def proxy_log_probs(self, x: FloatArray) -> FloatArray:
        return _log_softmax(self.proxy_logits(x))

    def expert_probs(self, x: FloatArray) -> FloatArray:
        return np.exp(self.expert_log_probs(x))

    def proxy_probs(self, x: FloatArray) -> FloatArray:
        return np.exp(self.proxy_log_probs(x))

    def expert_from_proxy(self, proxy_log_probs: FloatArray) -> FloatArray:
        """g: the expert's log-probabilities from the proxy's, for the kinds that satisfy shared level
        sets (the known map the generator was built with); ValueError for the kinds that break them."""
        lp = np.asarray(proxy_log_probs, dtype=np.float64)
        kind = self.proxy_kind
        if kind == "permuted":
            return _log_softmax(lp[:, list(np.argsort(self.permutation))])
        if kind == "tempered":
            return _log_softmax(lp * self.temperature)
        if kind == "invertible":
            u = centred_basis()
            centred = lp - lp.mean(axis=1, keepdims=True) - (self.mixing_offset - self.mixing_offset.mean())
            inverse = u @ np.linalg.inv(u.T @ self.mixing @ u) @ u.T
            return _log_softmax(centred @ inverse)
        if kind == "more_outputs":
            return _log_softmax(lp[:, :N_OUTPUTS])
        raise ValueError(f"proxy kind {kind!r} breaks shared level sets: no map g from proxy to expert exists")


def appendix_d_family(seed: int, proxy_kind: str) -> FamilyWorld:
    """One world of the Appendix D family; the expert (W, A, σ) depends on `seed` only, so all proxy
    kinds of a seed are proxies of the same expert. Each kind's own parameters come from a second
    stream, so adding kinds leaves the permuted and tempered worlds of issue 6 unchanged."""
    if proxy_kind not in FAMILY_PROXIES:
        raise ValueError(f"Unknown proxy kind {proxy_kind!r}; should be one of {list(FAMILY_PROXIES)}")
    rng = np.random.default_rng(seed)
    weight = rng.normal(0.0, FAMILY_W_STD, size=(INPUT_DIM, FAMILY_LATENT))
    readout = rng.normal(0.0, FAMILY_A_STD, size=(FAMILY_LATENT, N_OUTPUTS))
    permutation = tuple(range(N_OUTPUTS))
    while permutation == tuple(range(N_OUTPUTS)):  # the identity would make the proxy the expert
        permutation = tuple(int(i) for i in rng.permutation(N_OUTPUTS))
    extra = np.random.default_rng([seed, 15])
    angle = extra.uniform(*MIXING_ANGLES) * extra.choice([-1.0, 1.0])
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    scales = np.exp(extra.uniform(np.log(MIXING_SCALES[0]), np.log(MIXING_SCALES[1]), size=2))
    u = centred_basis()
    mixing = u @ (rotation @ np.diag(scales)) @ u.T
    mixing_offset = extra.normal(0.0, 0.5, size=N_OUTPUTS)
    extra_readout = extra.normal(0.0, 1.0, size=(N_OUTPUTS, EXTRA_OUTPUTS))
    if proxy_kind == "blind_direction":
        direction = weight[:, 0] / np.linalg.norm(weight[:, 0])
    else:
        direction = extra.standard_normal(INPUT_DIM)
        direction /= np.linalg.norm(direction)
    return FamilyWorld(
        proxy_kind=proxy_kind, weight=weight, readout=readout, permutation=permutation,
        n_outputs=N_OUTPUTS + EXTRA_OUTPUTS if proxy_kind == "more_outputs" else N_OUTPUTS,
        mixing=mixing, mixing_offset=mixing_offset, extra_readout=extra_readout, direction=direction,
    )


def draw_triples(world: FamilyWorld, n: int, expert: bool, rng: np.random.Generator) -> list[FeatureTriple]:
    """n triples at fresh inputs x ~ N(0, I5), Bradley–Terry from the expert's or the proxy's policy."""
    x = rng.standard_normal((n, world.input_dim))
    return sample_triples(world.expert_probs(x) if expert else world.proxy_probs(x), x, rng)

"""A sequence-level reading of paper 1's stack on a causal LM: a mixture of D response modes (issue 14).

    π†(y|x) = Σ_k w_k(x) · π_k(y|x),   w(x) = π̄†(τ̃(x)) ∈ D-simplex

τ̃(x) = softmax(A · pool(x) + c) reads the PROMPT: pool(x) is the max over the prompt's tokens of the
base model's input embeddings, centred and scaled by statistics of the proxy prompts (the tiny base's
later layers do not carry the prompt's theme across phrasings: a linear probe on the mean last-layer
state reads 8 themes at chance on an unseen phrasing, on the max-pooled embeddings at 7 of 8). π̄† is
the feature family's D×D `SimplexAdapter`. Θ̃'s columns are D mode vectors added to the (frozen)
base's final hidden state at every response token before φ̃, the model's own head, so mode k is the
base with the vocabulary bias W θ_k (W the unembedding). log π† = logsumexp_k(log w_k + log π_k).

Stage 1 (proxy pairs, DPO against the base): τ̃ (A, c) and Θ̃; the adapter stays the identity, the
base frozen. Θ̃ starts from k-means of the proxy-chosen responses' mean unembedding rows (centre −
mean), which breaks the symmetry between modes; τ̃ starts at zero (w uniform), and DPO's gradient
reaches it to first order, ∂ log π†/∂ log w_k = posterior of mode k given y, which differs between
chosen and rejected once the modes differ. Stage 2 (expert pairs): only the adapter. Its centre is
the permutation of modes that best explains the expert pairs (`assignment_centre`, paper 1's
re-mapping of the simplex's vertices), then a few DPO epochs pulled toward that centre.

Generation from the mixture: sample k from w(x), then decode with mode k (its bias on every
response token). The prototype and its figures: docs/benchmarks.md, "LM proxy bench".

On disk a mixture is `mode_mixture.safetensors` (its state) beside `mode_mixture.json` (its base, sizes and
recipe), in a directory that also holds the base's Hugging Face files: the worker's checkpoints and a
released version are such directories, so serving (`policies/lm/chat.py`) loads one without `workers`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.nn import functional as F

from policies.features.simplex_adapter import SimplexAdapter
from policies.lm.mixture_learners import best_relabelling, keep_bonus

STAGES = ("proxy", "expert", "all")
WEIGHTS_FILE = "mode_mixture.safetensors"
SPEC_FILE = "mode_mixture.json"
RESPONSE_RESERVE = 16  # tokens of a sequence's cap a prompt leaves its response, at most half the cap


def kept_prompt(prompt_ids: list[int], cap: int) -> list[int]:
    """The prompt as read at `cap` tokens per sequence: its LAST cap − min(RESPONSE_RESERVE, cap // 2) tokens at most.
    Why the end: a chat prompt's question and the assistant's turn marker come last (a quoted earlier exchange
    first), and a prompt kept from its start filled the cap and left both responses empty, so the pair said nothing
    (every response cut: stage 1 crashed; some: they counted as evidence). A function of the prompt and the cap alone,
    so a reader without responses (serving's w(x)) can cut as training does; it is here, below the workers, for
    that reader. Every pair reader cuts through `workers/lm/training/data.truncate_pair`, which calls this."""
    room = max(1, cap - min(RESPONSE_RESERVE, cap // 2))
    return prompt_ids[-room:] if len(prompt_ids) > room else list(prompt_ids)


def model_context(model: Any) -> int | None:
    """The longest sequence `model` is built for (its position table or its configured context), if it says."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def sequence_cap(model: Any, max_length: int) -> int:
    """Tokens per sequence when `model` reads pairs at a recipe's `max_length`: that, or the model's context if
    shorter. Why both: the recipe's cap bounds the cost of a run whatever text a snapshot holds (one 20 KB proxy
    response is 16k tokens: 10 GB of activations in one forward), and past its context a model with a position table
    fails and one with rotary positions reads positions it never trained on."""
    context = model_context(model)
    return max_length if context is None else min(max_length, context)


class ModeMixture(nn.Module):
    """τ̃ (prompt → D-simplex), π̄† (adapter) and Θ̃ (D mode vectors) over a frozen base model."""

    centre: Tensor
    scale: Tensor

    def __init__(self, hidden_size: int, simplex_dim: int) -> None:
        super().__init__()
        if simplex_dim < 2:
            raise ValueError(f"simplex_dim must be >= 2, got {simplex_dim}")
        self.tau = nn.Linear(hidden_size, simplex_dim)
        nn.init.zeros_(self.tau.weight)
        nn.init.zeros_(self.tau.bias)  # w uniform: the mixture starts as the average of its modes
        self.adapter = SimplexAdapter(simplex_dim)
        self.theta = nn.Parameter(torch.zeros(simplex_dim, hidden_size))  # Θ̃ e_k = theta[k]
        self.register_buffer("centre", torch.zeros(hidden_size))
        self.register_buffer("scale", torch.ones(()))

    @property
    def simplex_dim(self) -> int:
        return self.tau.out_features

    @staticmethod
    def pool(embeds: Tensor, mask: Tensor) -> Tensor:
        """Max over the prompt's tokens [B, T, H] (mask [B, T], 1 = token) → [B, H]."""
        return embeds.masked_fill(mask[..., None] == 0, float("-inf")).amax(dim=1)

    @torch.no_grad()
    def fit_normaliser(self, embeds: Tensor, mask: Tensor) -> None:
        """Centre and one global scale from the proxy prompts' pooled embeddings."""
        pooled = self.pool(embeds, mask)
        self.centre.copy_(pooled.mean(0))
        self.scale.copy_((pooled - self.centre).pow(2).mean().sqrt().clamp_min(1e-6))

    def log_weights(self, embeds: Tensor, mask: Tensor) -> Tensor:
        """log w(x) = log π̄†(τ̃(x)), [B, D]."""
        z = (self.pool(embeds, mask) - self.centre) / self.scale
        return self.adapter(F.log_softmax(self.tau(z), dim=-1))

    def mode_biases(self, head_weight: Tensor) -> Tensor:
        """Each mode's vocabulary bias W θ_k, [D, V] (the head is linear, so head(h + θ_k) = head(h) + W θ_k)."""
        return self.theta @ head_weight.T

    def mode_logps(self, hidden: Tensor, targets: Tensor, mask: Tensor, head_weight: Tensor) -> Tensor:
        """Sequence log-probs under every mode, [B, D]: hidden [B, R, H] is the base's final (normed) state at
        the positions predicting the response tokens `targets` [B, R], mask [B, R]."""
        logits = (hidden @ head_weight.T).unsqueeze(1) + self.mode_biases(head_weight)[None, :, None, :]
        token = F.log_softmax(logits, dim=-1).gather(
            -1, targets[:, None, :, None].expand(-1, logits.shape[1], -1, 1)).squeeze(-1)
        return (token * mask[:, None, :]).sum(-1)

    def log_prob(self, embeds: Tensor, prompt_mask: Tensor, hidden: Tensor, targets: Tensor, mask: Tensor,
                 head_weight: Tensor) -> Tensor:
        """log π†(y|x) = logsumexp_k(log w_k(x) + log π_k(y|x)), [B]."""
        return torch.logsumexp(self.log_weights(embeds, prompt_mask)
                               + self.mode_logps(hidden, targets, mask, head_weight), dim=-1)


def select_trainable(mixture: ModeMixture, stage: str) -> list[str]:
    """'proxy' (stage 1): τ̃ and Θ̃, the adapter at the identity; 'expert' (stage 2): the adapter alone; 'all'
    (fine_tune): τ̃, Θ̃ and the adapter. The base model is never a parameter of the mixture. Returns the names
    left trainable."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {list(STAGES)}, got {stage!r}")
    trainable = []
    for name, parameter in mixture.named_parameters():
        wanted = stage == "all" or name.startswith("adapter.") == (stage == "expert")
        parameter.requires_grad_(wanted)
        if wanted:
            trainable.append(name)
    return trainable


JITTER = 1e-2  # a repeated starting centre moves this many of the head's standard deviations


def starting_centres(rows: Tensor, count: int, generator: torch.Generator, spread: float) -> Tensor:
    """`count` starting centres [count, H] among `rows` [N, H]: a random `count` of them when N >= count (the draw
    k-means always took), else every row once and the rest drawn again, each repeat moved by a seeded jitter of
    JITTER x `spread`. Why: a snapshot may hold fewer proxy pairs than modes (2-7 of 8 crashed stage 1; one left
    every mode at zero, its only direction being the mean's), and identical centres would stay identical modes."""
    if len(rows) == 0:
        raise ValueError("k-means of the modes needs at least one proxy-chosen response")
    order = torch.randperm(len(rows), generator=generator)
    if len(rows) >= count:
        return rows[order[:count]].clone()
    extra = torch.randint(len(rows), (count - len(rows),), generator=generator)
    centres = rows[torch.cat([order, extra])].clone()
    centres[len(rows):] += JITTER * spread * torch.randn(count - len(rows), rows.shape[1], generator=generator)
    return centres


@torch.no_grad()
def kmeans_modes(token_ids: Tensor, mask: Tensor, head_weight: Tensor, simplex_dim: int, seed: int = 0,
                 norm: float = 3.0, iterations: int = 30) -> Tensor:
    """Θ̃'s start: k-means (simplex_dim clusters) of responses' mean unembedding rows [N, H] (`token_ids`
    [N, R], mask [N, R]: the proxy-chosen responses); mode k = centre_k − overall mean, rescaled to mean norm
    `norm`. Breaks the symmetry between modes with directions the proxy's choices actually take. Any N >= 1 works
    (`starting_centres`)."""
    rows = (head_weight[token_ids] * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
    generator = torch.Generator().manual_seed(seed)
    centres = starting_centres(rows, simplex_dim, generator, float(head_weight.std()))
    for _ in range(iterations):
        nearest = torch.cdist(rows, centres).argmin(1)
        for k in range(simplex_dim):
            if (nearest == k).any():
                centres[k] = rows[nearest == k].mean(0)
    directions = centres - rows.mean(0)
    return norm * directions / directions.norm(dim=1, keepdim=True).mean().clamp_min(1e-6)


def assignment_score(weights: Tensor, chosen_logps: Tensor, rejected_logps: Tensor, reference_margin: Tensor,
                     beta: float) -> Tensor:
    """S[k, j] = Σ_i w_k(x_i) · log σ(β(Δ_j(i) − Δ_ref(i))): how well sending mode k's prompts to mode j fits
    the expert pairs (weights [N, D] at the identity adapter, log-probs [N, D] per mode, reference margin [N])."""
    fit = F.logsigmoid(beta * ((chosen_logps - rejected_logps) - reference_margin[:, None]))
    return weights.T @ fit


def assignment_centre(score: Tensor) -> Tensor:
    """The permutation matrix P (P[j, k] = 1: vertex k goes to j) maximising Σ_k S[k, P(k)] plus the keep prior
    (`mixture_learners.keep_bonus`, the same MAP as `fit_relabelling`): exhaustive up to
    MAX_EXHAUSTIVE_MODES modes, greedy above (`mixture_learners.best_relabelling`, the condition tests' search too).
    As an adapter weight (bias 0) it relabels the simplex's vertices."""
    dim = score.shape[0]
    best = best_relabelling(score.detach().cpu().double().numpy() + keep_bonus(dim))
    matrix = torch.zeros(dim, dim, dtype=score.dtype)
    matrix[best.tolist(), list(range(dim))] = 1.0
    return matrix


def is_mixture_dir(path: Path | str) -> bool:
    return (Path(path) / SPEC_FILE).exists()


def save_mixture_dir(mixture: ModeMixture, out: Path, base_model: str, recipe: dict[str, Any]) -> Path:
    """Write the mixture's state and spec into `out` (created if needed); the base's files are the caller's."""
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in mixture.state_dict().items()}, str(out / WEIGHTS_FILE))
    (out / SPEC_FILE).write_text(json.dumps({"base_model": base_model, "hidden_size": mixture.theta.shape[1],
                                             "recipe": recipe}, indent=2))
    return out


def load_mixture_dir(path: Path | str) -> tuple[ModeMixture, dict[str, Any]]:
    """The mixture saved in `path` and its spec (base_model: the base it was first trained on; recipe)."""
    spec = json.loads((Path(path) / SPEC_FILE).read_text())
    mixture = ModeMixture(int(spec["hidden_size"]), int(spec["recipe"]["simplex_dim"]))
    mixture.load_state_dict(load_file(str(Path(path) / WEIGHTS_FILE)))
    return mixture.eval(), spec


class BiasLogits:
    """A logits processor (transformers' `LogitsProcessor` protocol) adding a mode's vocabulary bias at every
    generated token: one bias [V], or one per sequence [B, V]."""

    def __init__(self, bias: Tensor) -> None:
        self.bias = bias

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        return scores + self.bias.to(scores.dtype)


@torch.no_grad()
def prompt_log_weights(mixture: ModeMixture, model: Any, prompt_ids: list[int]) -> Tensor:
    """log w(x) [D] of one prompt's token ids, pooled over the base's input embeddings as in training."""
    table = model.get_input_embeddings()
    embeds = table(torch.tensor([prompt_ids], device=table.weight.device)).float().cpu()
    return mixture.log_weights(embeds, torch.ones(embeds.shape[:2]))[0]

"""Paper 1's two-stage stack π† = φ̃ ∘ Θ̃ ∘ π̄† ∘ τ̃ read on a causal language model.

τ̃ is the body plus a projection of its last hidden state onto the D-simplex (softmax), π̄† the
D×D adapter of the feature family (`SimplexAdapter`, acting on log-coordinates), Θ̃ a linear map
back to the hidden size, φ̃ the model's own unembedding. Stage 1 trains body, τ̃ and Θ̃ with DPO on
proxy pairs while the adapter stays the identity; stage 2 trains the adapter alone on expert pairs.

Why residual (h + Θ̃(π̄†(τ̃(h)))) rather than the strict composition: a pretrained model cannot
speak through a D-dimensional bottleneck, and re-learning language from proxy preferences would
cost far more than the proxy data hold. With Θ̃ zero at initialisation the stack is exactly the
base model, so the base is DPO's reference for stage 1; what proxy training adds to the policy
passes through the simplex, and that is the part the adapter re-maps for the expert. The design
note (docs/design.md) weighs this reading against the strict one.

The bottleneck is a sub-module of the Hugging Face model (`simplex_bottleneck`), so its weights are
saved in the model's safetensors and moved, trained and checkpointed with it; a pre-forward hook on
the output embeddings applies it, so `generate`, `logits_to_keep` and the serving endpoint work
unchanged. `config.json` carries its shape under `proxyloop_simplex_bottleneck` (D and the head's input width).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn
from torch.nn import functional as F

from policies.features.simplex_adapter import SimplexAdapter

CONFIG_KEY = "proxyloop_simplex_bottleneck"
MODULE_NAME = "simplex_bottleneck"
TRAIN_PARTS = ("all", "bottleneck", "adapter")


class SimplexBottleneck(nn.Module):
    """h ↦ h + Θ̃ · exp(π̄†(log τ̃(h))), per token position."""

    def __init__(self, hidden_size: int, simplex_dim: int) -> None:
        super().__init__()
        if simplex_dim < 2:
            raise ValueError(f"simplex_dim must be >= 2 (a 1-simplex is a point), got {simplex_dim}")
        self.encode_proj = nn.Linear(hidden_size, simplex_dim)  # τ̃'s projection; softmax puts it on the simplex
        self.adapter = SimplexAdapter(simplex_dim)  # π̄†: the only part stage 2 trains
        self.theta = nn.Linear(simplex_dim, hidden_size, bias=False)  # Θ̃
        nn.init.zeros_(self.theta.weight)  # the stack starts as the base model

    @property
    def simplex_dim(self) -> int:
        return self.encode_proj.out_features

    def encode(self, hidden: Tensor) -> Tensor:
        """log τ̃(h): log-coordinates of each position's point on the D-simplex, [..., D]."""
        return F.log_softmax(self.encode_proj(hidden.to(self.encode_proj.weight.dtype)), dim=-1)

    def forward(self, hidden: Tensor) -> Tensor:
        adapted = self.adapter(self.encode(hidden).reshape(-1, self.simplex_dim)).reshape(
            *hidden.shape[:-1], self.simplex_dim)
        return hidden + self.theta(adapted.exp()).to(hidden.dtype)


def bottleneck_of(model: Any) -> SimplexBottleneck | None:
    found = getattr(model, MODULE_NAME, None)
    return found if isinstance(found, SimplexBottleneck) else None


def attach_bottleneck(model: Any, simplex_dim: int) -> SimplexBottleneck:
    """Give `model` a fresh bottleneck (the stack then computes exactly what the model did); returns it."""
    if bottleneck_of(model) is not None:
        raise ValueError("the model already has a simplex bottleneck; stage 1 starts from a model without one")
    head = model.get_output_embeddings()
    width = head_input_width(model)
    bottleneck = SimplexBottleneck(width, simplex_dim).to(head.weight.device)
    model.add_module(MODULE_NAME, bottleneck)
    head.register_forward_pre_hook(lambda _module, args: (bottleneck(args[0]), *args[1:]))
    setattr(model.config, CONFIG_KEY, {"simplex_dim": simplex_dim, "width": width})
    return bottleneck


def head_input_width(model: Any) -> int:
    """The width of the states the LM head reads, which the bottleneck acts on. Why not `config.hidden_size`: OPT
    with an embedding projection (opt-350m: word_embed_proj_dim 512, hidden_size 1024) projects the final state
    down before its head, so the head, and the hook in front of it, see the projected width."""
    return int(model.get_output_embeddings().weight.shape[1])


def restore_bottleneck(model: Any, model_dir: Path | str) -> SimplexBottleneck | None:
    """Re-attach the bottleneck a saved model had (its weights from the model's safetensors); None if it had none."""
    spec = getattr(model.config, CONFIG_KEY, None)
    if not spec:
        return None
    prefix = f"{MODULE_NAME}."
    weights: dict[str, Tensor] = {}
    for path in sorted(Path(model_dir).glob("model*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            weights.update({key.removeprefix(prefix): handle.get_tensor(key)
                            for key in handle.keys() if key.startswith(prefix)})
    if not weights:
        raise ValueError(f"{model_dir}/config.json declares a simplex bottleneck but its safetensors hold no "
                         f"{prefix}* weights: the model directory is incomplete")
    bottleneck = attach_bottleneck(model, int(spec["simplex_dim"]))
    bottleneck.load_state_dict(weights)
    return bottleneck


def load_causal_lm_dir(path: Path | str, device: torch.device | str = "cpu") -> Any:
    """A saved causal LM in float32 with its bottleneck, when it has one (the one loader of training and serving)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    # transformers reports the bottleneck's weights as unexpected for the base class: they are ours.
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, local_files_only=True)
    finally:
        hf_logging.set_verbosity(level)
    restore_bottleneck(model, path)
    return model.to(device)


def select_trainable(model: Any, parts: str, adapter_frozen: bool = False) -> list[str]:
    """Freeze all but `parts` ('all': every weight; 'bottleneck': the bottleneck's τ̃ projection and Θ̃, the body
    frozen, so that all proxy training adds passes through the simplex; 'adapter': the adapter only). With
    `adapter_frozen` (stage 1) the adapter stays the identity. Returns the names left trainable."""
    if parts not in TRAIN_PARTS:
        raise ValueError(f"train_parts must be one of {list(TRAIN_PARTS)}, got {parts!r}")
    if parts == "adapter" and (bottleneck_of(model) is None or adapter_frozen):
        raise ValueError("train_parts='adapter' needs a model with a simplex bottleneck: train stage 1 "
                         "(simplex_dim > 0, on proxy pairs) first and start stage 2 from its checkpoint")
    if parts == "bottleneck" and bottleneck_of(model) is None:
        raise ValueError("train_parts='bottleneck' needs a simplex bottleneck: set simplex_dim > 0")
    adapter, bottleneck = f"{MODULE_NAME}.adapter.", f"{MODULE_NAME}."
    trainable = []
    for name, parameter in model.named_parameters():
        in_adapter = name.startswith(adapter)
        if parts == "adapter":
            wanted = in_adapter
        else:
            wanted = (parts == "all" or name.startswith(bottleneck)) and not (adapter_frozen and in_adapter)
        parameter.requires_grad_(wanted)
        if wanted:
            trainable.append(name)
    return trainable


@torch.no_grad()
def simplex_points(model: Any, hidden: Tensor) -> Tensor:
    """log τ̃(h) for hidden states [..., H] of a model with a bottleneck."""
    bottleneck = bottleneck_of(model)
    if bottleneck is None:
        raise ValueError("the model has no simplex bottleneck: condition tests on text need the stage-1 model")
    return bottleneck.encode(hidden)

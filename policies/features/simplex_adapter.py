"""π̄†, the two-stage policy's adapter: the one part learned from expert data (see policies/features/model.py).

A few dozen expert triples cannot move a D×D map far, so what the adapter is pulled toward (its
centre) decides most of what stage 2 can learn. The identity suits a proxy that answers like the
expert up to confidence; a proxy that relabels the outputs (paper 1's shared level sets with the
wrong answers) needs the relabelling as the centre instead. `relabelled_centres` turns each
relabelling of the outputs into the adapter that reproduces it through the frozen head, and the
fit picks the centre the expert triples favour (policies.features.model.choose_centre).
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn
from torch.nn import functional as F

# Relabellings are searched exhaustively up to this many outputs (720 candidates); above it only
# the identity is a centre: the search would grow factorially for little use.
MAX_RELABELLED_OUTPUTS = 6
# A saved policy's logit for an output id no triple used (policies/features/outputs.widened): probability 0 in
# float32, a finite log-probability, and never a relabelling's target (`relabelled_centres`).
UNUSED_LOGIT = -1.0e4


def answered_mask(logits: Tensor) -> Tensor:
    """True where a logit (or head offset) is a real answer, not an UNUSED_LOGIT placeholder."""
    return logits > UNUSED_LOGIT / 2


class SimplexAdapter(nn.Module):
    """π̄†: a map of the D-simplex to itself, softmax(M log s + b).

    Acting on log s makes tempering (scaling M), re-weighting (b) and relabelling (permuting M)
    exact members of the family. M = I, b = 0 is the identity, so an untrained adapter leaves
    the proxy's predictions unchanged. The centre (M₀, b₀) is the prior's mode and where a fit
    starts: the identity unless a relabelling was chosen (`set_centre`).
    """

    centre_weight: Tensor
    centre_bias: Tensor

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.eye(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("centre_weight", torch.eye(dim))
        self.register_buffer("centre_bias", torch.zeros(dim))

    def set_centre(self, weight: Tensor, bias: Tensor) -> None:
        with torch.no_grad():
            self.centre_weight.copy_(weight)
            self.centre_bias.copy_(bias)

    def reset(self, identity: bool = False) -> None:
        """Back to the centre (the identity unless `set_centre` chose another); with `identity`,
        make the identity the centre first (stage 1 trains the proxy stack through it)."""
        with torch.no_grad():
            if identity:
                self.centre_weight.copy_(torch.eye(self.weight.shape[0]))
                self.centre_bias.zero_()
            self.weight.copy_(self.centre_weight)
            self.bias.copy_(self.centre_bias)

    def deviation_terms(self) -> tuple[Tensor, Tensor]:
        """`deviation_terms` of this adapter from its centre."""
        return deviation_terms(self.weight, self.bias, self.centre_weight, self.centre_bias)

    def deviation(self, tempering_weight: float = 1.0) -> Tensor:
        """‖M − M₀‖² + ‖b − b₀‖², with the tempering direction (M = αM₀) weighted by `tempering_weight`.

        A weight below 1 makes re-tempering the centre (an over- or under-confident copy of the
        expert) cheap, while every other change is paid for in full. Weight 0 would leave the
        temperature free, and on a few separable triples it then runs off to overconfidence.
        """
        shape, tempering = self.deviation_terms()
        return shape + tempering_weight * tempering

    def forward(self, log_s: Tensor) -> Tensor:
        # log_s: [B, D] log-coordinates of a simplex point -> [B, D] log-coordinates of the image.
        return F.log_softmax(log_s @ self.weight.T + self.bias, dim=-1)


def deviation_terms(weight: Tensor, bias: Tensor, centre_weight: Tensor, centre_bias: Tensor) -> tuple[Tensor, Tensor]:
    """(‖M − αM₀‖² + ‖b − b₀‖², ‖M₀‖²(α − 1)²) with α = ⟨M, M₀⟩/‖M₀‖²: every change but a re-tempering of the
    centre, and the re-tempering. Their sum is ‖M − M₀‖² + ‖b − b₀‖². Leading dimensions are a batch of
    adapters (M [..., D, D], b [..., D]), one pair of terms each (policies/features/adapter_grid.py)."""
    norm = (centre_weight**2).sum(dim=(-2, -1))
    alpha = (weight * centre_weight).sum(dim=(-2, -1)) / norm
    shape = ((weight - alpha[..., None, None] * centre_weight) ** 2).sum(dim=(-2, -1))
    shape = shape + ((bias - centre_bias) ** 2).sum(dim=-1)
    return shape, norm * (alpha - 1) ** 2


def relabelled_centres(gain: Tensor, offset: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Adapters (M, b) under which a head with logits = gain·u + offset, u = M log s + b, answers
    with its outputs relabelled, one per permutation of the outputs; the identity first.

    gain [Y, D], offset [Y] (`TwoStagePolicy.head_affine`). Logits matter only up to a constant,
    so both sides are compared after centring over outputs (H): H·gain·M = H·P·gain and
    H·gain·b = H·(P − I)·offset, solved by least squares. Exact when H·gain has full rank on the
    centred simplex (D ≤ Y); otherwise the closest adapter. Only the identity beyond MAX_RELABELLED_OUTPUTS outputs.
    Outputs with an UNUSED_LOGIT offset (ids no triple used, in a saved policy) are never relabelled onto.
    """
    used = answered_mask(offset)
    if not bool(used.all()):  # a saved policy over ids by name: relabel only the outputs it answers
        return relabelled_centres(gain[used], offset[used])
    n_outputs, dim = gain.shape
    identity = (torch.eye(dim, dtype=gain.dtype, device=gain.device), gain.new_zeros(dim))
    if n_outputs > MAX_RELABELLED_OUTPUTS:
        return [identity]
    outputs_eye = torch.eye(n_outputs, dtype=gain.dtype, device=gain.device)
    centring = outputs_eye - 1.0 / n_outputs
    inverse = torch.linalg.pinv(centring @ gain)
    centres = [identity]
    for order in itertools.permutations(range(n_outputs)):
        if list(order) == list(range(n_outputs)):
            continue
        relabel = outputs_eye[list(order)]
        weight = inverse @ centring @ relabel @ gain
        bias = inverse @ centring @ (relabel - outputs_eye) @ offset
        centres.append((weight, bias))
    return centres

"""Which output ids a feature snapshot trains on: |Y| from the labels, less the ids only a stray proxy event uses.

Y is declared nowhere; it is read off the labels (ids 0..largest). A proxy may rightly answer with outputs the
expert never gives (`more_outputs` in ingest/synthetic_families.py: three extra outputs, each in about a third of
the proxy triples), so proxy ids widen Y by design. But one stray proxy event with y_w = 7 on a task with
Y = {0, 1, 2} widened the model to 8 outputs, and that cost far more than five unused logits: stage 2 looks for the
adapter's centre among the relabellings of the outputs only up to MAX_RELABELLED_OUTPUTS (6,
policies/features/simplex_adapter.py); above it the identity is the only centre, so a proxy that relabels the
expert (the demo's world, a cyclic relabelling) can no longer be mapped back. Measured with the worker's two_stage
(20 + 10 steps) on `appendix_d(n_proxy=400, n_expert=36, seed=0)`: held-out accuracy 0.917 clean, 0.333 with the
stray event (the audit's probe); on another split 1.00 clean (centre: a relabelling) and 0.58 with the stray event
(centre: the identity), 1.00 again with the stray event kept and the relabelling search allowed up to 8 outputs;
the clean data forced to 6 outputs kept 1.00, forced to 7 fell to 0.58. Below that limit extra outputs still cost:
a relabelling must beat the identity by log(K − 1) nats, K = |Y|! candidates, and the candidates include maps onto
outputs nothing prefers.

So an id that no expert triple uses and that fewer than max(STRAY_FLOOR, STRAY_SHARE × proxy triples) proxy
triples use (and at most STRAY_MAX_SHARE of them, so a small snapshot keeps its outputs) is dropped with the proxy
triples that use it, before anything is fitted, and a warning names the ids and the count. A `more_outputs`-like
proxy output, in many triples, is far above the floor and kept.

The fit sees the ids it keeps as 0..K-1 (`OutputSupport.dense`), whatever their names: ids are labels, not
positions. Fitted on {1, 2, 3} (the paper's own Y) or {7, 40, 99}, the model had 4 or 100 outputs, 97 of them no
triple names, a relabelling search over those, other random draws, and other verdicts: seed 100 of the Appendix D
family with {7, 40, 99} failed shared level sets where {0, 1, 2} passed everything, and {0, 1, 1000} took 27.6 s
against 6 s. What is saved answers over the ids by name (`widened`): an id no triple used gets probability 0.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from ground.schemas import FeatureTriple
from policies.features.model import DirectPolicy, TwoStagePolicy
from policies.features.simplex_adapter import UNUSED_LOGIT

log = logging.getLogger("proxyloop.policies.features")

STRAY_FLOOR = 5  # proxy triples: an id used by fewer, and by no expert triple, is a stray ...
STRAY_SHARE = 0.001  # ... or by fewer than this share of the proxy triples, on a large snapshot;
STRAY_MAX_SHARE = 0.05  # but never an id in more than this share: on a small snapshot 4 triples are not a handful


@dataclass(frozen=True)
class OutputSupport:
    """The outputs a fit uses: |Y|, the proxy triples it trains on, and what was left out and why."""

    n_outputs: int  # what a saved model answers over: ids 0..n_outputs-1
    proxy: list[FeatureTriple]  # the proxy triples kept, in their order
    dropped_ids: tuple[int, ...]  # stray output ids, ascending
    n_dropped: int  # proxy triples left out for using one of them
    ids: tuple[int, ...] = ()  # the ids the fit uses, ascending; the fit calls ids[i] output i (`dense`)

    @property
    def n_fitted(self) -> int:
        """Outputs of the model the fit trains: one per id in `ids`."""
        return len(self.ids)

    def dense(self, triples: Sequence[FeatureTriple]) -> list[FeatureTriple]:
        """The triples with each id renamed to its index in `ids` (a KeyError for an id outside them)."""
        if self.ids == tuple(range(len(self.ids))):
            return list(triples)
        index = {y: i for i, y in enumerate(self.ids)}
        return [t.model_copy(update={"y_w": index[t.y_w], "y_l": index[t.y_l]}) for t in triples]


def stray_floor(n_proxy: int) -> float:
    """An id no expert uses is a stray when fewer than this many proxy triples use it (and at most
    STRAY_MAX_SHARE of them: `is_stray`)."""
    return max(STRAY_FLOOR, STRAY_SHARE * n_proxy)


def is_stray(uses: int, n_proxy: int) -> bool:
    """Whether an output id no expert triple uses, in `uses` of `n_proxy` proxy triples, is a stray."""
    return uses < stray_floor(n_proxy) and uses <= STRAY_MAX_SHARE * n_proxy


def output_support(expert: Sequence[FeatureTriple], proxy: Sequence[FeatureTriple]) -> OutputSupport:
    """|Y| = largest id used + 1 (at least 2) over the expert triples and the proxy triples kept, after dropping the
    proxy triples that use a stray id (one no expert triple uses, in fewer than `stray_floor` proxy triples).
    `expert` should hold every expert triple whose outputs the model must answer (held-out ones included), so that
    an id only an expert uses is never dropped."""
    expert_ids = {y for t in expert for y in (t.y_w, t.y_l)}
    uses = Counter(y for t in proxy for y in {t.y_w, t.y_l})
    floor = stray_floor(len(proxy))
    stray = tuple(sorted(y for y, count in uses.items() if y not in expert_ids and is_stray(count, len(proxy))))
    kept = [t for t in proxy if t.y_w not in stray and t.y_l not in stray] if stray else list(proxy)
    n_dropped = len(proxy) - len(kept)
    used = sorted({y for t in (*expert, *kept) for y in (t.y_w, t.y_l)})
    used += [y for y in range(2) if y not in used][: max(0, 2 - len(used))]  # a model has two outputs at least
    ids = tuple(sorted(used))
    n_outputs = ids[-1] + 1
    if stray:
        log.warning(
            "dropping %d of %d proxy triples: they use output ids %s, which no expert triple uses and fewer than %g "
            "proxy triples do (%s); kept, they would widen the model from %d to %d outputs "
            "(policies/features/outputs.py says why that costs)",
            n_dropped, len(proxy), list(stray), floor, ", ".join(f"id {y}: {uses[y]}" for y in stray),
            n_outputs, max(n_outputs, stray[-1] + 1))
    return OutputSupport(n_outputs, kept, stray, n_dropped, ids)


def widened(model: nn.Module, support: OutputSupport) -> nn.Module:
    """`model`, fitted on `support.dense` triples, as a model of the same family over ids 0..n_outputs-1: its output
    layer's rows move to the ids they stand for, and an id no triple used gets weight 0 and bias UNUSED_LOGIT. The
    model itself when the ids are already 0..K-1."""
    if isinstance(model, TwoStagePolicy):
        layer = "output_map"
    elif isinstance(model, DirectPolicy):
        layer = "net.2"
    else:
        raise TypeError(f"widened takes a TwoStagePolicy or a DirectPolicy, got {type(model).__name__}")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    weight, bias = state[f"{layer}.weight"], state[f"{layer}.bias"]
    if weight.shape[0] != support.n_fitted:
        raise ValueError(f"the model has {weight.shape[0]} outputs, the support {support.n_fitted} ({support.ids})")
    if support.ids == tuple(range(support.n_outputs)):
        return model
    wide: nn.Module
    if isinstance(model, TwoStagePolicy):
        wide = TwoStagePolicy(replace(model.config, n_outputs=support.n_outputs))
    else:
        wide = DirectPolicy(state["net.0.weight"].shape[1],
                            support.n_outputs, state["net.0.weight"].shape[0])
    rows = torch.tensor(support.ids, device=weight.device)
    state[f"{layer}.weight"] = weight.new_zeros((support.n_outputs, weight.shape[1])).index_copy(0, rows, weight)
    state[f"{layer}.bias"] = bias.new_full((support.n_outputs,), UNUSED_LOGIT).index_copy(0, rows, bias)
    wide.load_state_dict(state)
    return wide.to(weight.device)

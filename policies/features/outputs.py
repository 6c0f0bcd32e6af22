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
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from ground.schemas import FeatureTriple

log = logging.getLogger("proxyloop.policies.features")

STRAY_FLOOR = 5  # proxy triples: an id used by fewer, and by no expert triple, is a stray ...
STRAY_SHARE = 0.001  # ... or by fewer than this share of the proxy triples, on a large snapshot;
STRAY_MAX_SHARE = 0.05  # but never an id in more than this share: on a small snapshot 4 triples are not a handful


@dataclass(frozen=True)
class OutputSupport:
    """The outputs a fit uses: |Y|, the proxy triples it trains on, and what was left out and why."""

    n_outputs: int
    proxy: list[FeatureTriple]  # the proxy triples kept, in their order
    dropped_ids: tuple[int, ...]  # stray output ids, ascending
    n_dropped: int  # proxy triples left out for using one of them


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
    largest = max((max(t.y_w, t.y_l) for t in (*expert, *kept)), default=1)
    n_outputs = max(largest + 1, 2)
    if stray:
        log.warning(
            "dropping %d of %d proxy triples: they use output ids %s, which no expert triple uses and fewer than %g "
            "proxy triples do (%s); kept, they would widen the model from %d to %d outputs "
            "(policies/features/outputs.py says why that costs)",
            n_dropped, len(proxy), list(stray), floor, ", ".join(f"id {y}: {uses[y]}" for y in stray),
            n_outputs, max(n_outputs, stray[-1] + 1))
    return OutputSupport(n_outputs, kept, stray, n_dropped)

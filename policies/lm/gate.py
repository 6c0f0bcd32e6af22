"""The release gate for language-model policies: `policies.promotion.decide` with paper 2's indicators, plus
reasons that state the indicator trend it judged, whether or not a rule fired.

An operator reading a release should see the entropy and mass the gate looked at, not only the
rules that blocked something.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ground.schemas import CheckpointEvaluation, GateDecision
from policies.promotion import (
    GateRules,
    by_step,
    decide,
    entropy_declined_after_peak,
    mass_limit,
    mass_reference,
    usable_mass,
)


def _trend(values: Sequence[float | None]) -> str:
    return " → ".join("n/a" if v is None else f"{v:.3f}" for v in values)


def indicator_reasons(evals: Sequence[CheckpointEvaluation], rules: GateRules, base_mass: float | None) -> list[str]:
    """What the indicators did across checkpoints (in step order), against the rules' thresholds. The mass drop
    is computed from the readings the mass rule uses, so it never reports a drop the rule did not act on (a
    missing mass is "n/a", not 0.0)."""
    if not evals:
        return []
    evals = by_step(evals)
    steps = ", ".join(str(e.step) for e in evals)
    entropy = [e.topk_entropy for e in evals]
    mass = [e.topk_mass for e in evals]
    peaked = entropy_declined_after_peak(evals, rules.entropy_decline_evals, rules.min_entropy_drop) is not None
    reference = mass_reference(evals, base_mass)
    usable = [m for m in mass if m is not None and math.isfinite(m)]
    against = f"the base model's {base_mass:.3f}" if usable_mass(base_mass) else "the first checkpoint's"
    if reference is None or not usable:
        mass_verdict = "no usable reading: the mass rule did not apply"
    else:
        mass_drop = 1 - min(usable) / reference
        mass_verdict = (f"largest drop from {against} {mass_drop:.1%} "
                        + ("exceeds" if mass_drop > rules.max_mass_drop else "within")
                        + f" the {rules.max_mass_drop:.0%} limit")
    return [
        f"top-k entropy (k=10, renormalised, teacher-forced on held-out chosen responses, bits) at steps "
        f"[{steps}]: {_trend(entropy)}; "
        + (f"peaked, then {rules.entropy_decline_evals}+ new lows" if peaked else
           f"no peak followed by {rules.entropy_decline_evals} new lows"),
        f"top-k mass at steps [{steps}]: {_trend(mass)}; {mass_verdict}",
    ]


def fired_rules(evals: Sequence[CheckpointEvaluation], rules: GateRules,
                base_mass: float | None = None) -> dict[int, list[str]]:
    """Per checkpoint step, the indicator rules that flag it, as `decide` judges them (applied or advisory):
    the entropy peak and the new lows after it, and each checkpoint whose top-k mass fell below the base's limit."""
    evals = by_step(evals)
    flags: dict[int, list[str]] = {e.step: [] for e in evals}
    if rules.indicators == "not_applicable" or not evals:
        return flags
    peak = entropy_declined_after_peak(evals, rules.entropy_decline_evals, rules.min_entropy_drop)
    if peak is not None:
        flags[evals[peak].step].append("entropy peak")
        lowest = evals[peak].topk_entropy
        for e in evals[peak + 1:]:
            if e.topk_entropy < lowest:
                lowest = e.topk_entropy
                flags[e.step].append("entropy new low after the peak")
    limit = mass_limit(evals, rules, base_mass)
    if limit is not None:
        for e in evals:
            if e.topk_mass is not None and e.topk_mass < limit:
                flags[e.step].append(f"mass {e.topk_mass:.3f} < {limit:.3f} ({rules.max_mass_drop:.0%} below "
                                     f"{'base' if usable_mass(base_mass) else 'first checkpoint'})")
    return flags


def decide_language_model(
    evals: Sequence[CheckpointEvaluation], baseline_accuracy: float, rules: GateRules, base_mass: float | None = None,
) -> GateDecision:
    """`decide`, its reasons preceded by the indicator trend (applied or advisory as `rules.indicators` says)."""
    decision = decide(evals, baseline_accuracy, rules, base_mass)
    return decision.model_copy(update={"reasons": indicator_reasons(evals, rules, base_mass) + decision.reasons})

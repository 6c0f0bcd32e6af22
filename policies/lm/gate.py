"""The release gate for language-model policies: `policies.promotion.decide` with paper 2's indicators, plus
reasons that state the indicator trend it judged, whether or not a rule fired.

An operator reading a release should see the entropy and mass the gate looked at, not only the
rules that blocked something.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from ground.schemas import CheckpointEvaluation, GateDecision
from policies.promotion import GateRules, decide, entropy_declined_after_peak


def _trend(values: Sequence[float]) -> str:
    return " → ".join(f"{v:.3f}" for v in values)


def indicator_reasons(evals: Sequence[CheckpointEvaluation], rules: GateRules) -> list[str]:
    """What the indicators did across checkpoints, against the rules' thresholds."""
    if not evals:
        return []
    steps = ", ".join(str(e.step) for e in evals)
    entropy = [e.topk_entropy for e in evals]
    mass = [e.topk_mass for e in evals]
    peaked = entropy_declined_after_peak(evals, rules.entropy_decline_evals) is not None
    worst_mass = min(mass)
    mass_drop = 1 - worst_mass / mass[0] if mass[0] > 0 else 0.0
    return [
        f"top-k entropy (k=10, renormalised, teacher-forced on held-out chosen responses, bits) at steps "
        f"[{steps}]: {_trend(entropy)}; "
        + (f"peaked and declined for ≥ {rules.entropy_decline_evals} evaluations" if peaked else
           f"no peak followed by {rules.entropy_decline_evals} declining evaluations"),
        f"top-k mass at steps [{steps}]: {_trend(mass)}; largest drop from the first {mass_drop:.1%} "
        + ("exceeds" if mass_drop > rules.max_mass_drop else "within")
        + f" the {rules.max_mass_drop:.0%} limit",
    ]


def decide_language_model(
    evals: Sequence[CheckpointEvaluation], baseline_accuracy: float, rules: GateRules
) -> GateDecision:
    """`decide` with indicators gated, its reasons preceded by the indicator trend."""
    decision = decide(evals, baseline_accuracy, replace(rules, use_indicators=True))
    return decision.model_copy(update={"reasons": indicator_reasons(evals, rules) + decision.reasons})

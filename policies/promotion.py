"""Promoting a checkpoint, in its two steps: the gate rule (evaluations → `GateDecision`) and the
release (registry version with lineage, alias move logged in the promotion history, `policy.released`).

Both live here because together they are the one step of a label's path that decides what serves;
the language-model family reuses both (`policies/lm/gate.py`, `policies/lm/release.py`).

The gate, after paper 2: top-k entropy that peaked and then fell, or top-k mass that collapsed below the
base model's, marks over-optimisation even when training loss still improves; in "decide" mode we then
prefer the checkpoint at the peak. By default the indicators are advisory (recorded in the reasons, not
applied): bench/gate.py found that acting on them did not beat the plain pick (docs/benchmarks.md).
Held-out expert accuracy must clear an absolute floor and not fall behind the baseline.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any, Literal

from ground.schemas import CheckpointEvaluation, Decision, Evaluation, GateDecision, PolicyReleased, PolicyVersion
from ground.settings import OperatorError, Settings
from ingest.bus import publish
from ingest.proxy_client import connect_producer
from policies.audit_log import ReleaseEvidence, logged_releases, record_move, record_release
from policies.gate_chance import chance_test
from policies.registry import RegistryError, aliases, register, resolve, version_problem, versions
from policies.registry_remote import push

IndicatorMode = Literal["not_applicable", "advisory", "decide"]


class CheckpointUnreadable(OperatorError):
    """The checkpoint a gate chose is gone or damaged: nothing is registered."""


class AnnouncementFailed(OperatorError):
    """An alias moved and logged whose `policy.released` could not be sent (broker or remote mirror down)."""


# Accuracies this close to a floor are at it: 0.72 − 0.02 is 0.7 − 1e-16 in floating point, and 70 of 100 right
# against a 72 % baseline is exactly the allowed drop.
ACCURACY_TIE = 1e-6  # below one item's share of any held-out set under a million items


@dataclass(frozen=True)
class GateRules:
    min_heldout_accuracy: float = 0.55
    min_heldout_inputs: int = 5
    # The pick must beat a coin at this level, its choice allowed for (gate_chance.py); 1: reported, not applied,
    # the default: applying it at 0.05 cost served accuracy in bench/gate_chance.py (docs/benchmarks.md).
    chance_alpha: float = 1.0
    max_accuracy_drop: float = 0.02
    entropy_decline_evals: int = 2  # new lows after the peak that make a fall (not necessarily monotone)
    min_entropy_drop: float = 0.02  # ... and how far below the peak, relative, the last low must be
    max_mass_drop: float = 0.2  # relative drop of top-k mass from the base model's (step 0)
    # "decide": the indicators exclude checkpoints; "advisory": what they would do is recorded in the
    # reasons, the decision is the plain pick (bench/gate.py found no gain from them: docs/benchmarks.md);
    # "not_applicable": a policy over a handful of outputs, which gets more confident as it learns.
    indicators: IndicatorMode = "advisory"


def gate_rules(settings: Settings, language_model: bool) -> GateRules:
    """The gate's rules as the settings give them; the indicators apply to language models only."""
    return GateRules(min_heldout_accuracy=settings.gate_min_heldout_accuracy,
                     min_heldout_inputs=settings.gate_min_heldout_inputs, chance_alpha=settings.gate_chance_alpha,
                     max_accuracy_drop=settings.gate_max_accuracy_drop,
                     indicators=settings.gate_indicators if language_model else "not_applicable")


def too_little_heldout(evaluation: Evaluation, rules: GateRules) -> str | None:
    """Why the held-out expert labels cannot judge a release, or None when they can. Counted in distinct tasks:
    40 copies of one held-out input gave a noise proxy an accuracy of 1.0 and a release at a true 0.495."""
    if evaluation.n_heldout == 0:  # e.g. a retrain triggered by proxy labels alone
        return ("no held-out expert labels to judge a release on: the gate needs expert data (part of every "
                "snapshot's expert labels is held out for it)")
    if evaluation.language_model and evaluation.n_indicator_prompts == 0:  # workers/lm/evaluate.py: none fits
        return (f"none of the {evaluation.n_heldout} held-out expert pairs fits the base model's context of "
                f"{evaluation.heldout_context} tokens whole (prompt + chosen response, with room to generate after the "
                "prompt): its accuracy would judge cut responses and the indicators read nothing; a base with a "
                "longer context, or shorter held-out pairs, are needed")
    tasks = evaluation.n_heldout_inputs
    if tasks is not None and tasks < rules.min_heldout_inputs:
        return (f"the held-out expert labels cover {tasks} distinct tasks ({evaluation.n_heldout} labels; copies "
                f"of one task count once), fewer than {rules.min_heldout_inputs} "
                "(PROXYLOOP_GATE_MIN_HELDOUT_INPUTS): label more distinct tasks before a release can be judged")
    return None


def by_step(evals: Sequence[CheckpointEvaluation]) -> list[CheckpointEvaluation]:
    """The checkpoints in training order, whatever order they were handed over in: "the last checkpoint" and
    "peaked, then fell" mean by step. Two evaluations of one step cannot be ordered, so they are a `ValueError`."""
    ordered = sorted(evals, key=lambda e: e.step)
    repeated = sorted({a.step for a, b in pairwise(ordered) if a.step == b.step})
    if repeated:
        raise ValueError(f"checkpoint steps must be unique; evaluated more than once: {repeated}")
    return ordered


def usable_mass(value: float | None) -> float | None:
    """`value` if it can be a top-k mass to measure a fall from (finite, > 0), else None: a NaN (undefined logits)
    or 0 would otherwise switch the mass rule off (every comparison with NaN is False) instead of being ignored."""
    return value if value is not None and math.isfinite(value) and value > 0 else None


def mass_reference(evals: Sequence[CheckpointEvaluation], base_mass: float | None) -> float | None:
    """What the mass rule measures a fall from: the base model's top-k mass, or without a usable one the earliest
    checkpoint's usable mass (`evals` in step order)."""
    return usable_mass(base_mass) or next((e.topk_mass for e in evals if usable_mass(e.topk_mass)), None)


def mass_limit(evals: Sequence[CheckpointEvaluation], rules: GateRules, base_mass: float | None) -> float | None:
    """Top-k mass below which a checkpoint has collapsed (`max_mass_drop` under the reference); None without one."""
    reference = mass_reference(evals, base_mass)
    return reference * (1 - rules.max_mass_drop) if reference else None


def unusable_readings(evals: Sequence[CheckpointEvaluation], base_mass: float | None) -> list[str]:
    """Reasons naming the indicator readings the rules leave out (NaN or infinite, a base mass that is no mass),
    so an operator sees that a rule judged fewer checkpoints, not that a rule silently went blind."""
    reasons = []
    if base_mass is not None and usable_mass(base_mass) is None:
        reasons.append(f"base model top-k mass {base_mass} is not a usable reading: ignored, the mass rule "
                       "measures from the first checkpoint's instead")
    entropy = [e.step for e in evals if not math.isfinite(e.topk_entropy)]
    if entropy:
        reasons.append(f"top-k entropy is not finite at steps {entropy}: ignored by the entropy rule")
    mass = [e.step for e in evals if e.topk_mass is not None and not math.isfinite(e.topk_mass)]
    if mass:
        reasons.append(f"top-k mass is not finite at steps {mass}: ignored by the mass rule")
    return reasons


def entropy_declined_after_peak(evals: Sequence[CheckpointEvaluation], run_length: int,
                                min_drop: float = 0.0) -> int | None:
    """Index of the entropy peak if, after it, entropy reached `run_length` new lows and ended more than
    `min_drop` (relative) below the peak. A bump between lows (1.0, 0.9, 0.91, 0.8, 0.7) is still a fall.
    `evals` in step order; non-finite readings are skipped (a NaN would otherwise win or hide the peak)."""
    points = [(i, e.topk_entropy) for i, e in enumerate(evals) if math.isfinite(e.topk_entropy)]
    if len(points) < run_length + 1:
        return None
    top = max(range(len(points)), key=lambda j: points[j][1])
    peak, lows, lowest = points[top][1], 0, points[top][1]
    for _, value in points[top + 1:]:
        if value < lowest:
            lows, lowest = lows + 1, value
    if lows >= run_length and lowest < peak * (1 - min_drop):
        return points[top][0]
    return None


def _apply_indicators(
    evals: Sequence[CheckpointEvaluation], rules: GateRules, reasons: list[str], base_mass: float | None,
) -> list[CheckpointEvaluation]:
    """Checkpoints left after an entropy peak-then-fall or a top-k mass collapse against the base (paper 2)."""
    candidates = list(evals)
    peak = entropy_declined_after_peak(evals, rules.entropy_decline_evals, rules.min_entropy_drop)
    if peak is not None:
        reasons.append(
            f"top-k entropy peaked at step {evals[peak].step} and fell to new lows after it: over-optimisation; "
            "considering checkpoints up to the peak"
        )
        candidates = candidates[: peak + 1]
    reference, limit = mass_reference(evals, base_mass), mass_limit(evals, rules, base_mass)
    collapsed = [e for e in candidates if limit is not None and e.topk_mass is not None and e.topk_mass < limit]
    if collapsed:
        against = "the base model's" if usable_mass(base_mass) else "the first checkpoint's"
        reasons.append(
            f"top-k mass fell more than {rules.max_mass_drop:.0%} below {against} {reference:.3f} at step "
            f"{collapsed[0].step}; excluding it and later checkpoints"
        )
        before = [e for e in candidates if e.step < collapsed[0].step]
        if not before:  # the earliest is the least over-optimised there is (bench/gate.py measured this rule)
            reasons.append(f"every checkpoint is below it: keeping the earliest, step {candidates[0].step}")
        candidates = before or candidates[:1]
    return candidates


def _chance_reason(measured: Sequence[CheckpointEvaluation], rules: GateRules) -> tuple[bool, str]:
    """(passed, reason) of the test that the best of the checkpoints weighed ranks held-out tasks better than a coin,
    its choice among them allowed for. Passed, and said so, where the evaluation recorded no per-task scores."""
    scored = [e.task_scores for e in measured]
    if any(s is None for s in scored) or len({len(s or ()) for s in scored}) != 1 or not scored[0]:
        return True, "test against a coin not run: the evaluation recorded no per-task scores (an older record)"
    test = chance_test([s for s in scored if s is not None])
    if rules.chance_alpha >= 1:
        return True, f"advisory (PROXYLOOP_GATE_CHANCE_ALPHA=1), not applied: test against a coin: {test.text()}"
    if test.p_value > rules.chance_alpha:
        return False, (f"not shown better than a coin: {test.text()}, above {rules.chance_alpha} "
                       "(PROXYLOOP_GATE_CHANCE_ALPHA): more held-out tasks, or a better policy, are needed")
    return True, f"better than a coin: {test.text()}, at most {rules.chance_alpha}"


def decide(
    evals: Sequence[CheckpointEvaluation], baseline_accuracy: float, rules: GateRules,
    base_mass: float | None = None,
) -> GateDecision:
    """The gate: the checkpoint with the best held-out expert accuracy among those the indicators leave (all of
    them unless `rules.indicators` is "decide"), released if it clears the floor and the baseline.

    Checkpoints are taken in step order. A checkpoint whose accuracy is not finite (its outputs are NaN: it
    diverged) is left out and named, never compared: every comparison with NaN is False and would pass the floor and
    baseline checks. With none left, or a non-finite baseline (its evaluation failed), the gate blocks, naming the
    best measured checkpoint (which an override would release)."""
    if not evals:
        return GateDecision(decision="block", checkpoint=None, baseline_accuracy=baseline_accuracy,
                            reasons=["no checkpoints were evaluated"])
    evals = by_step(evals)
    reasons: list[str] = []
    candidates = list(evals)
    if rules.indicators == "not_applicable":
        reasons.append("indicators not applicable: this policy family is not a language model")
    else:
        reasons += unusable_readings(evals, base_mass)
        flagged: list[str] = []
        kept = _apply_indicators(evals, rules, flagged, base_mass)
        if rules.indicators == "decide":
            candidates, reasons = kept, reasons + flagged
        else:
            reasons += [f"advisory (PROXYLOOP_GATE_INDICATORS=advisory), not applied: {r}" for r in flagged]
        if not flagged:
            reasons.append(f"indicators ({rules.indicators}): no rule fired")
    failed: list[str] = []
    unmeasured = [e.step for e in evals if not math.isfinite(e.heldout_accuracy)]
    if unmeasured:  # NaN outputs (pairwise_accuracy): a checkpoint that diverged, not a reason to drop the others
        reasons.append(f"held-out expert accuracy is not finite at steps {unmeasured} (NaN outputs: diverged "
                       "checkpoints): left out")
    if not math.isfinite(baseline_accuracy):
        failed.append(f"the baseline accuracy is {baseline_accuracy}: its evaluation failed, nothing to compare with")
    measured = [e for e in candidates if math.isfinite(e.heldout_accuracy)]
    best = max(measured, key=lambda e: (e.heldout_accuracy, -e.step)) if measured else None
    if best is not None:
        reasons.append(f"best checkpoint: step {best.step}, held-out expert accuracy {best.heldout_accuracy:.3f}")
    if failed or best is None:
        advice = "re-run the evaluation" if failed else "no checkpoint has a held-out accuracy: retrain"
        return GateDecision(decision="block", checkpoint=best, baseline_accuracy=baseline_accuracy,
                            reasons=reasons + failed + [f"blocked: {advice}"])
    if best.heldout_accuracy < rules.min_heldout_accuracy - ACCURACY_TIE:
        reasons.append(f"accuracy {best.heldout_accuracy:.3f} < floor {rules.min_heldout_accuracy:.3f} "
                       "(PROXYLOOP_GATE_MIN_HELDOUT_ACCURACY)")
        return GateDecision(decision="block", checkpoint=best, baseline_accuracy=baseline_accuracy, reasons=reasons)
    if best.heldout_accuracy < baseline_accuracy - rules.max_accuracy_drop - ACCURACY_TIE:
        reasons.append(f"accuracy {best.heldout_accuracy:.3f} is worse than the baseline "
                       f"{baseline_accuracy:.3f} by more than {rules.max_accuracy_drop:.3f}")
        return GateDecision(decision="block", checkpoint=best, baseline_accuracy=baseline_accuracy, reasons=reasons)
    reasons.append(f"accuracy {best.heldout_accuracy:.3f} ≥ floor {rules.min_heldout_accuracy:.3f} and not more than "
                   f"{rules.max_accuracy_drop:.3f} below the baseline {baseline_accuracy:.3f}")
    beats_a_coin = _chance_reason(measured, rules)
    reasons.append(beats_a_coin[1])
    if not beats_a_coin[0]:
        return GateDecision(decision="block", checkpoint=best, baseline_accuracy=baseline_accuracy, reasons=reasons)
    decision: Decision = "release" if best.step == evals[-1].step else "pick_checkpoint"
    if decision == "pick_checkpoint":
        reasons.append(f"releasing step {best.step} rather than the last checkpoint (step {evals[-1].step})")
    return GateDecision(decision=decision, checkpoint=best, baseline_accuracy=baseline_accuracy, reasons=reasons)


# The release: register, move the alias (logged), tell services.


def announce(settings: Settings, version: PolicyVersion, alias: str, event_id: str) -> None:
    """Mirror the registry to its remote (if any), then publish `policy.released` so services reload. The broker is
    asked first (`connect_producer`): kafka-python's own bootstrap waited 30 s on a broker that is down and said
    only KafkaTimeoutError, where this names PROXYLOOP_KAFKA_BOOTSTRAP at once."""
    if settings.registry_remote_url:
        push(settings.registry_dir, settings.registry_remote_url, version.policy)
    producer = connect_producer(settings)
    try:
        publish(producer, settings.topic_policy_released, PolicyReleased(
            event_id=event_id, policy=version.policy, version=version.version, alias=alias, uri=version.path))
    finally:
        producer.close()


def release_checkpoint(
    settings: Settings, checkpoint_dir: Path, lineage: dict[str, Any], alias: str = "production",
    evidence: ReleaseEvidence | None = None,
) -> PolicyVersion:
    """Register the checkpoint, point `alias` at it, log who/why/gate/snapshot (`evidence`) and tell services."""
    from safetensors.torch import load_file  # here, not at the top: it pulls torch into every flow run's start

    try:
        tensors = load_file(str(checkpoint_dir / "model.safetensors"))
        config = json.loads((checkpoint_dir / "config.json").read_text())
    except Exception as exc:  # OSError, JSON, and safetensors' own error type alike: nothing was registered
        raise CheckpointUnreadable(f"checkpoint {checkpoint_dir} cannot be released ({type(exc).__name__}: {exc}); "
                                   "it was deleted or damaged after its evaluation: retrain the run") from exc
    version = register(settings.registry_dir, settings.policy_name, tensors, config, lineage, alias=None)
    record_release(settings.registry_dir, version, alias, evidence or ReleaseEvidence())
    announce(settings, version, alias, event_id=f"released-{version.policy}-{version.version}")
    return version


def finish_release_of_run(
    settings: Settings, policy: str, run_id: str, checkpoint: str, alias: str = "production",
    evidence: ReleaseEvidence | None = None,
) -> PolicyVersion | None:
    """The version an earlier attempt to release flow run `run_id` registered from `checkpoint`, its release
    finished (logged and the alias moved, if the attempt stopped before that; then announced again, under the same
    event id, which services already dedupe, unless the alias has moved elsewhere since); None when no attempt got as
    far as registering it. A release whose broker, remote mirror or disk failed after `register` is retried by
    `proxyloop approve`: without this it registered a second version of the same run (the audit: v1 and v2 for one
    run after Kafka was down during the release). A version of the run from another checkpoint (the run was gated
    again since) is not this release."""
    root = settings.registry_dir
    earlier = None
    for number in reversed(versions(root, policy)):
        try:
            version = resolve(root, f"{policy}@{number}")
        except RegistryError:
            continue
        gate = version.lineage.get("gate")
        gated = gate.get("checkpoint") if isinstance(gate, dict) else None
        if version.lineage.get("flow_run_id") == run_id and isinstance(gated, dict) and gated.get("path") == checkpoint:
            earlier = version
            break
    if earlier is None:
        return None
    if earlier.version not in logged_releases(root, policy):
        record_release(root, earlier, alias, evidence or ReleaseEvidence())
    if aliases(root, policy).get(alias) == earlier.version:  # a rollback since: announcing it would undo that
        announce(settings, earlier, alias, event_id=f"released-{earlier.policy}-{earlier.version}")
    return earlier


def move_alias(
    settings: Settings, version: int, alias: str = "production", policy: str | None = None, reason: str = ""
) -> PolicyVersion:
    """Point an alias at an existing version (rollback or promote), log it with `reason` and the OS user,
    and tell services. The version is read and its weights checked before anything moves (`version_problem`); if
    only the announcement fails, `AnnouncementFailed` says that the move itself stands."""
    policy = policy or settings.policy_name
    target = resolve(settings.registry_dir, f"{policy}@{version}")
    problem = version_problem(target)
    if problem is not None:
        raise RegistryError(f"{policy} v{version} cannot be served, so {alias} was not moved: {problem}")
    record_move(settings.registry_dir, policy, alias, version, why=reason)
    try:
        announce(settings, target, alias, event_id=f"alias-{policy}-{alias}-{version}-{uuid.uuid4().hex[:8]}")
    except Exception as exc:
        raise AnnouncementFailed(
            f"{policy}@{alias} → v{version} is moved and logged, but announcing it failed ({type(exc).__name__}: "
            f"{exc}); services resolving the alias per request (the HTTP app) follow already, others on their next "
            "`policy.released`") from exc
    return target

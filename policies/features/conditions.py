"""Sample-based tests of paper 1's four conditions, and the training plan they imply.

Paper 1 proves that proxy data cuts the expert samples needed when four conditions hold, but gives
no way to test them from data. These tests are proxyloop's own design: each condition gets one
stated statistic compared with a threshold (ConditionThresholds, with the reason for each), plus an
end-to-end comparison, and the plan follows from the outcomes by the rule in `choose_plan`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ground.schemas import ConditionCheck, ConditionReport, FeatureTriple
from policies.condition_statistics import (
    bootstrap_mean,
    coverage,
    distance_ratios,
    encoding_dimension,
    favourite_shares,
    log_ratios,
    preferred_outputs,
    relaxation_interval,
)
from policies.features.condition_config import CHECK_NAMES, THRESHOLDS, ConditionThresholds
from policies.features.cross_validation import (
    CV_FOLDS,
    DIRECT_HIDDEN,
    CrossValidated,
    cross_validate,
    fit_direct,
    held_out,
)
from policies.features.fit_recipe import PROXY_STAGE
from policies.features.fitting import fit_adapter, fit_preferences, fit_stage1
from policies.features.model import DirectPolicy, PreferenceModel, TwoStageConfig, TwoStagePolicy, triples_to_tensors
from policies.features.outputs import output_support
from policies.features.recipe import TWO_STAGE
from policies.plan_choice import CANDIDATES, SMALL_SAMPLE, TIE_NATS, PlanEvidence, choose_plan, two_stage_vs_rival

__all__ = ["CHECK_NAMES", "ConditionThresholds", "choose_plan", "run_condition_tests"]


@dataclass
class _Fitted:
    """What the checks share: the data as tensors and the models fitted on it."""

    xp: Tensor
    proxy_model: DirectPolicy
    proxy_lp: np.ndarray
    stack: TwoStagePolicy
    dimension: int
    explained: np.ndarray


def _model_log_probs(model: PreferenceModel, x: Tensor) -> np.ndarray:
    with torch.no_grad():
        return model.log_probs(x).numpy().astype(np.float64)


def _check(name: str, passed: bool, statistic: float, threshold: float, detail: str) -> ConditionCheck:
    return ConditionCheck(
        name=name, passed=bool(passed), statistic=float(statistic), threshold=threshold, detail=detail
    )


def _undecided(name: str, threshold: float, n_expert: int, t: ConditionThresholds) -> ConditionCheck:
    detail = (f"undecided: needs >= {t.min_expert_triples} expert triples on >= {t.min_expert_inputs} distinct inputs "
              f"to test, have {n_expert} triples")
    return _check(name, False, 0.0, threshold, detail)


def _outputs(expert: Sequence[FeatureTriple], proxy: Sequence[FeatureTriple], n_outputs: int | None
             ) -> tuple[tuple[int, ...], Sequence[FeatureTriple], Sequence[FeatureTriple]]:
    """The output ids the tests fit (index i stands for ids[i]) and the expert and proxy triples in those indices.
    Inferred from the labels, only the ids the triples use, and a stray proxy output id is dropped with its triples
    (`output_support`: the worker trains on the same ones), so renaming the outputs changes no verdict; a caller
    that names n_outputs declares Y = 0..n_outputs-1, so nothing is dropped and an id out of its range is an
    error."""
    if n_outputs is None:
        support = output_support(expert, proxy)
        return support.ids, support.dense(expert), support.dense(support.proxy)
    largest = max((max(t.y_w, t.y_l) for t in (*expert, *proxy)), default=1)
    if largest >= n_outputs:
        raise ValueError(f"an output id {largest} is out of range for n_outputs={n_outputs}; pass a larger n_outputs")
    return tuple(range(n_outputs)), expert, proxy


def run_condition_tests(
    expert: Sequence[FeatureTriple],
    proxy: Sequence[FeatureTriple],
    snapshot_id: str,
    seed: int = 0,
    n_outputs: int | None = None,
    thresholds: ConditionThresholds = THRESHOLDS,
) -> ConditionReport:
    """Test paper 1's four conditions on a snapshot and choose the training plan.

    Deterministic for a seed; leaves torch's global RNG as it found it. Takes ~5 s for 3000 proxy +
    60 expert triples on one core. The fits run single-threaded (the thread count is restored
    afterwards): tensors this small gain nothing from threads, and on a shared machine extra
    intra-op threads contend with other processes and slow the fits down many times over.
    """
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    ids, fitted_expert, fitted_proxy = _outputs(expert, proxy, n_outputs)
    dims = {len(t.x) for t in (*expert, *proxy)}
    if len(dims) > 1:
        raise ValueError(f"expert and proxy triples must share one input dimension, found {sorted(dims)}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            checks, evidence = _run_checks(fitted_expert, fitted_proxy, seed, ids, thresholds)
    finally:
        torch.set_num_threads(threads)
    plan, reasons = choose_plan(checks, evidence)
    return ConditionReport(
        snapshot_id=snapshot_id, n_expert=len(expert), n_proxy=len(proxy), checks=checks, plan=plan, reasons=reasons,
        heldout_log_likelihood={k: round(v, 4) for k, v in evidence.mean_ll().items()},
    )


def _run_checks(
    expert: Sequence[FeatureTriple], proxy: Sequence[FeatureTriple], seed: int, ids: tuple[int, ...],
    t: ConditionThresholds,
) -> tuple[list[ConditionCheck], PlanEvidence]:
    """All checks in CHECK_NAMES order and the evidence the plan rule weighs; output i of every model is ids[i]."""
    n_expert, n_proxy = len(expert), len(proxy)
    n_inputs = len({tuple(triple.x) for triple in expert})  # copies of one input count once (grouped folds)
    checks = [_sample_size(n_expert, n_inputs, t)]
    if n_proxy < t.min_proxy_triples:
        detail = f"only {n_proxy} proxy triples (< {t.min_proxy_triples}): no proxy model to test"
        return checks + [_check(name, False, 0.0, 0.0, detail) for name in CHECK_NAMES[1:]], PlanEvidence(None)

    rng = np.random.default_rng(seed)
    fitted = _fit_proxy_side(proxy, seed, len(ids), t)
    low_dim = _low_dimensional_encoding(fitted, t)
    if n_expert == 0:
        return checks + [_undecided(n, 0.0, 0, t) for n in CHECK_NAMES[1:3]] + [low_dim] + [
            _undecided(n, 0.0, 0, t) for n in CHECK_NAMES[4:]], PlanEvidence(None)
    xe, we, le = triples_to_tensors(expert)
    agreement = float(held_out(fitted.stack, xe, we, le)[1].mean())  # the proxy stack never saw expert data
    if not checks[0].passed:
        undecided = [_undecided(n, th, n_expert, t) for n, th in (("shared_level_sets", t.alpha),
                                                                  ("image_containment", 1.0))]
        rest = [_undecided("similarity_preserved", t.max_l, n_expert, t),
                _undecided("end_to_end", t.alpha, n_expert, t)]
        # One input, however often given, is one fold (grouped_folds): nothing is left to train on.
        if n_expert < t.min_adapter_triples or n_inputs < 2:
            return checks + undecided + [low_dim] + rest, PlanEvidence(agreement)
        # Only the proxy and its adapter are weighed (plan_choice.SMALL_SAMPLE): the other learners are not fitted.
        small = cross_validate(fitted.stack, xe, we, le, seed, learners=SMALL_SAMPLE)
        evidence = PlanEvidence(agreement, {c: small.ll[c] for c in SMALL_SAMPLE},
                                {c: small.correct[c] for c in SMALL_SAMPLE}, seed)
        return checks + undecided + [low_dim] + rest, evidence

    cv = cross_validate(fitted.stack, xe, we, le, seed)
    shared = _shared_level_sets(cv, n_expert, rng, t)
    expert_model = fit_direct(fitted.stack.config, xe, we, le, seed)
    x_all = torch.cat([xe, fitted.xp])
    expert_lp = _model_log_probs(expert_model, x_all)
    image = _image_containment(fitted.proxy_lp, _mapped_proxy_log_probs(fitted, xe, we, le, seed), expert_lp, ids, t)
    similarity = _similarity_preserved(expert_lp, _model_log_probs(fitted.proxy_model, x_all), rng, t)
    end_to_end = _end_to_end(cv, rng, t)
    evidence = PlanEvidence(agreement, {c: cv.ll[c] for c in CANDIDATES}, {c: cv.correct[c] for c in CANDIDATES}, seed)
    return checks + [shared, image, low_dim, similarity, end_to_end], evidence


def _sample_size(n_expert: int, n_inputs: int, t: ConditionThresholds) -> ConditionCheck:
    enough = n_expert >= t.min_expert_triples and n_inputs >= t.min_expert_inputs
    detail = (f"{n_expert} expert triples on {n_inputs} distinct inputs vs minimum {t.min_expert_triples} triples "
              f"on {t.min_expert_inputs} inputs")
    if not enough:
        detail += ": too little expert data to decide the expert-side conditions"
    return _check("expert_sample_size", enough, n_expert, float(t.min_expert_triples), detail)


def _fit_proxy_side(proxy: Sequence[FeatureTriple], seed: int, n_out: int, t: ConditionThresholds) -> _Fitted:
    """The unconstrained proxy model (its image is what the dimension and containment tests see), and
    stage 1 of the two-stage stack on proxy data, its simplex sized to the estimated encoding."""
    xp, wp, lp = triples_to_tensors(proxy)
    input_dim = xp.shape[1]
    torch.manual_seed(seed)
    proxy_model = DirectPolicy(input_dim, n_out, DIRECT_HIDDEN)
    fit_preferences(proxy_model, list(proxy_model.parameters()), xp, wp, lp, PROXY_STAGE.steps, PROXY_STAGE.lr, seed,
                    weight_decay=PROXY_STAGE.weight_decay)
    proxy_lp = _model_log_probs(proxy_model, xp)
    dimension, explained = encoding_dimension(log_ratios(proxy_lp), t.dimension_variance)
    simplex_dim = int(np.clip(dimension + 1, 2, n_out))
    torch.manual_seed(seed)
    stack = TwoStagePolicy(TwoStageConfig(input_dim=input_dim, n_outputs=n_out, simplex_dim=simplex_dim))
    fit_stage1(stack, xp, wp, lp, seed, TWO_STAGE.proxy_stage)  # the worker's stage 1
    stack.freeze_proxy()
    return _Fitted(xp, proxy_model, proxy_lp, stack, dimension, explained)


def _low_dimensional_encoding(fitted: _Fitted, t: ConditionThresholds) -> ConditionCheck:
    input_dim = fitted.xp.shape[1]
    max_dimension = t.max_dimension_ratio * input_dim
    return _check(
        "low_dimensional_encoding", fitted.dimension <= max_dimension, fitted.dimension, max_dimension,
        f"D = {fitted.dimension} principal components explain {t.dimension_variance:.0%} of the proxy model's "
        f"log-ratio outputs (cumulative {np.round(fitted.explained[: fitted.dimension + 1], 3).tolist()}); pass when "
        f"D <= {t.max_dimension_ratio} x input dimension {input_dim} = {max_dimension:.1f}",
    )


def _shared_level_sets(cv: CrossValidated, n_expert: int, rng: np.random.Generator,
                       t: ConditionThresholds) -> ConditionCheck:
    # The null model reads x only through the proxy: the adapter, or no adapter when that does
    # better (an adapter fitted to a few triples can be worse than the identity it nests).
    null = max(("two_stage", "proxy_as_is"), key=lambda c: float(cv.ll[c].mean()))
    gain = bootstrap_mean(cv.ll["augmented"] - cv.ll[null], rng)
    failed = gain.p_not_positive < t.alpha and gain.mean > TIE_NATS  # a float-level gain with no spread is a tie
    return _check(
        "shared_level_sets", not failed, gain.p_not_positive, t.alpha,
        f"held-out ({n_expert} triples, {CV_FOLDS}-fold) log-likelihood gain per triple of the adapter plus "
        f"a direct linear path from x over the best model that reads x only through the frozen proxy "
        f"({null}): {gain.text()}; pass unless x adds significant information beyond the proxy output "
        f"(p < {t.alpha}, and more than {TIE_NATS} nats per triple)",
    )


def _mapped_proxy_log_probs(fitted: _Fitted, x: Tensor, y_w: Tensor, y_l: Tensor, seed: int) -> np.ndarray:
    """The proxy after the two-stage learner's map: the frozen stack with its adapter (the same centre
    search) fitted on all the expert triples, at the proxy inputs. At the stage's default prior (worth
    one triple), not the strong one the worker may choose: the question is whether some map the adapter
    can learn reaches each expert output, not whether 35 triples are enough to learn it."""
    mapped = copy.deepcopy(fitted.stack)
    fit_adapter(mapped, x, y_w, y_l, seed)
    return _model_log_probs(mapped, fitted.xp)


def _image_containment(proxy_lp: np.ndarray, mapped_lp: np.ndarray, expert_lp: np.ndarray, ids: tuple[int, ...],
                       t: ConditionThresholds) -> ConditionCheck:
    """Judged after the learner's map (issue 15): an expert-preferred output counts as in the proxy's
    image when the proxy model prefers it somewhere as is, or the two-stage stack does once its adapter
    has mapped the proxy's outputs onto the expert's (a relabelling or re-weighting the adapter learns
    leaves paper 1's condition intact; an output the proxy cannot single out under any such map does not)."""
    proxy_shares, mapped_shares = favourite_shares(proxy_lp), favourite_shares(mapped_lp)
    expert_shares = favourite_shares(expert_lp)
    proxy_preferred = preferred_outputs(proxy_shares, t.proxy_preferred_share)
    mapped_preferred = preferred_outputs(mapped_shares, t.proxy_preferred_share)
    expert_preferred = preferred_outputs(expert_shares, t.expert_preferred_share)
    covered = coverage(expert_preferred, proxy_preferred | mapped_preferred)

    def named(outputs: set[int]) -> list[int]:
        return sorted(ids[i] for i in outputs)

    return _check(
        "image_containment", covered >= t.min_coverage, covered, t.min_coverage,
        f"share of expert-preferred outputs {named(expert_preferred)} (favourite of a fitted expert model on "
        f">= {t.expert_preferred_share:.0%} of inputs; shares over outputs {list(ids)} "
        f"{np.round(expert_shares, 3).tolist()}) that the "
        f"proxy prefers somewhere (>= {t.proxy_preferred_share:.0%} of proxy inputs), as is "
        f"{named(proxy_preferred)} (shares {np.round(proxy_shares, 3).tolist()}) or after the two-stage "
        f"adapter's map {named(mapped_preferred)} (shares {np.round(mapped_shares, 3).tolist()}) = {covered:.2f}",
    )


def _similarity_preserved(expert_lp: np.ndarray, proxy_lp_all: np.ndarray, rng: np.random.Generator,
                          t: ConditionThresholds) -> ConditionCheck:
    n = expert_lp.shape[0]
    i = rng.integers(0, n, size=t.n_pairs)
    j = (i + rng.integers(1, n, size=t.n_pairs)) % n  # distinct partner
    ratios = distance_ratios(log_ratios(expert_lp), log_ratios(proxy_lp_all), i, j, t.proxy_floor_quantile)
    l_hat, low, high = relaxation_interval(ratios, t.l_quantile, rng)
    return _check(
        "similarity_preserved", low <= t.max_l, l_hat, t.max_l,
        f"L estimate = {t.l_quantile:.0%} quantile, over the {len(ratios)} of {t.n_pairs} input pairs the proxy "
        f"model separates by at least its median distance, of expert-model / proxy-model Aitchison distance = "
        f"{l_hat:.2f} (95% bootstrap [{low:.2f}, {high:.2f}], median ratio {np.median(ratios):.2f}); "
        f"pass unless L is significantly above {t.max_l} (the whole interval above it)",
    )


def _end_to_end(cv: CrossValidated, rng: np.random.Generator, t: ConditionThresholds) -> ConditionCheck:
    worse, p, rival, accuracy = two_stage_vs_rival(cv.ll, cv.correct, rng)
    return _check(
        "end_to_end", not worse, p, t.alpha,
        f"held-out ({CV_FOLDS}-fold) log-likelihood per triple: two_stage {cv.ll['two_stage'].mean():+.3f} vs the "
        f"best other plan, {rival}, {cv.ll[rival].mean():+.3f} (paired bootstrap p={p:.3f}); pairwise accuracy: "
        f"{accuracy}; pass unless two_stage is significantly worse (p < {t.alpha})",
    )

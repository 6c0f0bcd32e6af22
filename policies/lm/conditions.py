"""Paper 1's four conditions tested on text snapshots, through the stage-1 model's D-simplex.

The caller runs the stage-1 model (a causal LM with a simplex bottleneck, DPO-trained on proxy pairs)
and hands over arrays (`TextPairFeatures`). Each response is read two ways: its simplex point (mean
log s over its tokens: what τ̃ keeps) and a direct representation around the bottleneck (the base
model's mean hidden state). The expert-side learners, Bradley–Terry logistic regressions on
chosen-minus-rejected differences cross-validated over the expert pairs, stand in for the plans:

- proxy_as_is: σ(proxy_margin), nothing fitted;
- two_stage: [proxy_margin, Δ log s], prior centred on (1, 0, ...) — the adapter starts as the proxy;
- fine_tune: [proxy_margin, Δ log s, Δ direct PCs], prior centred on (1, 0, ...);
- expert_only: [Δ direct PCs], prior centred on 0.

Direct features are reduced to `direct_components` principal components of the proxy pairs' responses
(no held-out expert pair shapes its own features); every column but the margin is scaled to unit RMS
over the proxy pairs' differences, so one prior fits all. The plan is `plan_choice.choose_plan`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial

import numpy as np

from ground.schemas import ConditionCheck, ConditionReport
from policies.condition_statistics import (
    binomial_tail,
    bootstrap_mean,
    encoding_dimension,
    input_groups,
    log_ratios,
    relaxation_interval,
    seeded_grouped_folds,
)
from policies.features.condition_config import CHECK_NAMES
from policies.lm.bradley_terry import calibrated_log_likelihood, fit_bradley_terry, log_sigmoid
from policies.lm.condition_config import TEXT_THRESHOLDS, TextConditionThresholds
from policies.lm.mixture_learners import (
    Design,
    MixtureTerms,
    check_matching_terms,
    expert_only_design,
    fold_margins,
    mixture_image_containment,
    principal_components,
    prompt_closeness,
    swapped_margins,
    unit_rms,
)
from policies.lm.text_pair_features import TextPairFeatures
from policies.plan_choice import CANDIDATES, SMALL_SAMPLE, PlanEvidence, choose_plan, two_stage_vs_rival

__all__ = ["CHECK_NAMES", "MixtureTerms", "TextConditionThresholds", "TextPairFeatures", "fit_bradley_terry",
           "run_text_condition_tests"]

@dataclass
class _Designs:
    """Per-pair learner inputs: Bradley–Terry learners by name -> (feature differences [n, p], prior centre [p]);
    for a mixture, the margins of the learners fitted otherwise (two_stage, the direct path) given the expert
    pairs fitted on (`mixture_learners.fold_margins`)."""

    by_name: dict[str, Design]
    n_components: int
    level_set_tolerance: float  # what shared_level_sets needs the direct path's gain above
    fold_margins: Callable[[np.ndarray], dict[str, np.ndarray]] | None = None


def _designs(expert: TextPairFeatures, proxy: TextPairFeatures, t: TextConditionThresholds) -> _Designs:
    stacked = np.concatenate([proxy.direct_chosen, proxy.direct_rejected])
    _, components = principal_components(stacked, t.direct_components)
    direct_proxy = (proxy.direct_chosen - proxy.direct_rejected) @ components.T
    direct = unit_rms((expert.direct_chosen - expert.direct_rejected) @ components.T, direct_proxy)
    if expert.mixture is not None and proxy.mixture is not None:
        design = expert_only_design(expert.mixture, proxy.mixture, direct, unit_rms(direct_proxy, direct_proxy),
                                    t.prompt_components)
        closeness = prompt_closeness(expert.mixture, proxy.mixture, t)
        margins = partial(fold_margins, expert.mixture, swapped_margins(expert.mixture), closeness)
        tolerance = t.prompt_level_set_tolerance if closeness.by_tokens else t.level_set_tolerance
        return _Designs({"expert_only": design}, len(components), tolerance, margins)
    simplex = unit_rms(expert.simplex_chosen - expert.simplex_rejected, proxy.simplex_chosen - proxy.simplex_rejected)
    with_proxy = [expert.proxy_margin[:, None], simplex]
    two_stage, fine_tune = np.hstack(with_proxy), np.hstack([*with_proxy, direct])
    return _Designs({  # the proxy-side priors: weight 1 on the proxy margin, 0 elsewhere; fine_tune is the direct path
        "two_stage": (two_stage, np.eye(1, two_stage.shape[1])[0]),
        "direct": (fine_tune, np.eye(1, fine_tune.shape[1])[0]),
        "expert_only": (direct, np.zeros(direct.shape[1])),
    }, len(components), t.level_set_tolerance)


def expert_groups(expert: TextPairFeatures) -> np.ndarray:
    """The expert pairs' copy groups (`MixtureTerms.groups`) numbered 0..G-1; pairs read without them are distinct."""
    groups = expert.mixture.groups if expert.mixture is not None else None
    return input_groups(np.arange(expert.n) if groups is None else groups)


def cross_validation_folds(groups: np.ndarray, seed: int,
                           thresholds: TextConditionThresholds | None = None) -> list[np.ndarray]:
    """The tests' held-out folds over expert pairs with copy groups `groups` (`mixture_learners.pair_groups`): a
    caller training plans on the folds (`trained_margins`) must use these. Copies share a fold (`grouped_folds`: a
    copy in training made expert_only read -0.43 nats per pair for -0.91); all distinct, the folds are as before."""
    return seeded_grouped_folds(np.asarray(groups), seed, (thresholds or TEXT_THRESHOLDS).cv_folds)


def _cross_validate(designs: _Designs, expert: TextPairFeatures, seed: int, t: TextConditionThresholds,
                    trained: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per-pair held-out log-likelihood and correctness of every candidate and of the direct path (k-fold over
    expert pairs); `trained` holds held-out margins of plans the caller trained on the same folds."""
    n, margin = expert.n, expert.proxy_margin
    held = {"proxy_as_is": margin.copy()}  # fits nothing: every pair is held out for it
    for test in cross_validation_folds(expert_groups(expert), seed, t):
        train = np.setdiff1d(np.arange(n), test)
        fitted = designs.fold_margins(train) if designs.fold_margins is not None else {}
        fold = {name: s[test] for name, s in fitted.items()}
        for name, (z, centre) in designs.by_name.items():
            fold[name] = z[test] @ fit_bradley_terry(z[train], centre, t.prior_precision)
        for name, s in fold.items():
            held.setdefault(name, np.zeros(n))[test] = s
    held.setdefault("fine_tune", held["direct"])  # a mixture's direct path stands in for its fine_tune
    ll = {name: log_sigmoid(s) for name, s in held.items()}
    for name, s in trained.items():
        held[name], ll[name] = s, calibrated_log_likelihood(s)
    return ll, {name: (s > 0).astype(np.float64) for name, s in held.items()}


def _check(name: str, passed: bool, statistic: float, threshold: float, detail: str) -> ConditionCheck:
    return ConditionCheck(name=name, passed=bool(passed), statistic=statistic, threshold=threshold, detail=detail)


def _aitchison(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise Aitchison distance between simplex points given as (mean) log-coordinates."""
    return np.asarray(np.linalg.norm(log_ratios(a) - log_ratios(b), axis=1))


def _nearest(points: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Distance of each row of `points` to its nearest row of `reference` (chunked)."""
    ref_sq = (reference**2).sum(axis=1)
    out = [np.sqrt(np.maximum((c**2).sum(axis=1)[:, None] + ref_sq[None, :] - 2 * c @ reference.T, 0.0).min(axis=1))
           for c in np.array_split(points, max(1, len(points) // 512))]
    return np.concatenate(out) if out else np.zeros(0)


def run_text_condition_tests(
    expert: TextPairFeatures, proxy: TextPairFeatures, snapshot_id: str, n_expert: int, n_proxy: int,
    seed: int = 0, thresholds: TextConditionThresholds | None = None,
    trained_margins: Mapping[str, np.ndarray] | None = None,
) -> ConditionReport:
    """Test paper 1's four conditions on a text snapshot and choose the training plan.

    `expert` holds the expert pairs tested, `proxy` a sample of the proxy pairs; `n_expert` and
    `n_proxy` are the snapshot's counts (the report's), at least the rows given. `trained_margins`: per
    plan, each expert pair's implicit-reward margin under that plan trained on the other folds of
    `cross_validation_folds(expert_groups(expert), seed)` (a mixture's fine_tune, which no stand-in fits); they replace
    the plan's stand-in, scored after one fitted scale (`calibrated_log_likelihood`). Deterministic for a
    seed; numpy only, well under a second for 300 expert and 2000 proxy pairs.
    """
    t = thresholds or TEXT_THRESHOLDS
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    check_matching_terms(expert.mixture, proxy.mixture)
    if (expert.simplex_dim, expert.direct_dim) != (proxy.simplex_dim, proxy.direct_dim):
        raise ValueError(f"expert and proxy features must share D and K: expert D={expert.simplex_dim}, "
                         f"K={expert.direct_dim}; proxy D={proxy.simplex_dim}, K={proxy.direct_dim}")
    if n_expert < expert.n or n_proxy < proxy.n:
        raise ValueError(f"n_expert={n_expert} and n_proxy={n_proxy} are the snapshot's counts and cannot be below "
                         f"the pairs given ({expert.n} expert, {proxy.n} proxy)")
    trained = dict(trained_margins or {})
    if any(np.shape(m) != (expert.n,) for m in trained.values()) or not set(trained) <= set(CANDIDATES[1:]):
        raise ValueError(f"trained_margins needs one margin per expert pair ({expert.n}) for plans among "
                         f"{list(CANDIDATES[1:])}, got {[(k, np.shape(m)) for k, m in trained.items()]}")
    checks, evidence, pcs = checks_and_evidence(expert, proxy, seed, t, trained)
    plan, reasons = choose_plan(checks, evidence)
    first = (f"these tests ran on the stage-1 model's D={proxy.simplex_dim} simplex representation of (prompt, "
             f"response) pairs ({expert.n} expert, {proxy.n} proxy pairs; a direct path through {pcs} principal "
             f"components of the base model's K={proxy.direct_dim} hidden features stands in for what bypasses it)")
    return ConditionReport(
        snapshot_id=snapshot_id, n_expert=n_expert, n_proxy=n_proxy, checks=checks, plan=plan,
        reasons=[first, *reasons], heldout_log_likelihood={k: round(v, 4) for k, v in evidence.mean_ll().items()},
    )


def checks_and_evidence(
    expert: TextPairFeatures, proxy: TextPairFeatures, seed: int, t: TextConditionThresholds,
    trained: Mapping[str, np.ndarray],
) -> tuple[list[ConditionCheck], PlanEvidence, int]:
    """All checks in CHECK_NAMES order, the evidence the plan rule weighs, and the direct PCs used."""
    n, distinct = expert.n, int(expert_groups(expert).max(initial=-1)) + 1  # copies of a pair share a fold
    needed = min(t.min_adapter_pairs, t.min_expert_pairs)  # distinct pairs (all distinct: binds as n does)
    enough = n >= t.min_expert_pairs and distinct >= needed
    few = "" if enough else ": too little expert data to decide the expert-side conditions"
    copies = f" ({distinct} distinct, at least {needed} needed)" if distinct < n else ""
    size = _check("expert_sample_size", enough, n, t.min_expert_pairs,
                  f"{n} expert pairs{copies} to cross-validate; pass when at least {t.min_expert_pairs}{few}")
    if proxy.n < t.min_proxy_pairs:
        detail = f"only {proxy.n} proxy pairs (< {t.min_proxy_pairs}): too few to describe the proxy's simplex"
        return [size] + [_check(c, False, 0.0, 0.0, detail) for c in CHECK_NAMES[1:]], PlanEvidence(None), 0
    low_dim = _low_dimensional_encoding(proxy, t)
    agreement = float((expert.proxy_margin > 0).mean()) if n else None
    if not enough:
        detail = f"undecided: needs >= {t.min_expert_pairs} expert pairs to test, have {n}{copies}"
        rest = [low_dim if c == low_dim.name else _check(c, False, 0.0, 0.0, detail) for c in CHECK_NAMES[1:]]
        if distinct < t.min_adapter_pairs:
            return [size, *rest], PlanEvidence(agreement), 0
        # only the proxy and its adapter are weighed
        ll, correct = _cross_validate(_designs(expert, proxy, t), expert, seed, t, trained)
        return [size, *rest], PlanEvidence(agreement, {c: ll[c] for c in SMALL_SAMPLE},
                                           {c: correct[c] for c in SMALL_SAMPLE}, seed), 0
    rng = np.random.default_rng(seed)
    designs = _designs(expert, proxy, t)
    ll, correct = _cross_validate(designs, expert, seed, t, trained)
    checks = [size, _shared_level_sets(ll, n, rng, t, designs.level_set_tolerance),
              _image_containment(expert, proxy, rng, t), low_dim, _similarity_preserved(designs, expert, proxy, rng, t),
              _end_to_end(ll, correct, n, rng, t)]
    evidence = PlanEvidence(agreement, {c: ll[c] for c in CANDIDATES}, {c: correct[c] for c in CANDIDATES}, seed)
    return checks, evidence, designs.n_components


def _low_dimensional_encoding(proxy: TextPairFeatures, t: TextConditionThresholds) -> ConditionCheck:
    """Effective dimension of the proxy responses' simplex log-ratios (components for `dimension_variance`
    of their variance). It is at most D - 1 by construction, so the test is that it is well below K and
    that the simplex did not collapse (RMS distance from the mean below `min_simplex_spread`: dimension 0)."""
    points = log_ratios(np.concatenate([proxy.simplex_chosen, proxy.simplex_rejected]))
    spread = float(np.sqrt(((points - points.mean(axis=0)) ** 2).sum(axis=1).mean()))
    dimension, explained = encoding_dimension(points, t.dimension_variance)
    dimension = dimension if spread >= t.min_simplex_spread else 0
    limit = t.max_dimension_ratio * proxy.direct_dim
    collapsed = "" if dimension else "; the simplex collapsed: stage 1 put nothing the adapter could re-map into it"
    return _check(
        "low_dimensional_encoding", 1 <= dimension <= limit, dimension, limit,
        f"D_eff = {dimension} principal components explain {t.dimension_variance:.0%} of the {len(points)} proxy "
        f"responses' simplex log-ratios (D = {proxy.simplex_dim}; cumulative "
        f"{np.round(explained[: dimension + 1], 3).tolist()}), RMS spread {spread:.3g} nats (collapsed below "
        f"{t.min_simplex_spread}); pass when 1 <= D_eff <= {t.max_dimension_ratio} x K = {limit:.1f}{collapsed}",
    )


def _shared_level_sets(ll: dict[str, np.ndarray], n: int, rng: np.random.Generator,
                       t: TextConditionThresholds, tolerance: float) -> ConditionCheck:
    """Does a path around the bottleneck add held-out expert likelihood beyond the proxy? fine_tune nests
    both proxy-only learners; the null is the better of them (an adapter fitted on few pairs can lose to
    the identity it starts from). Fails when the gain is significant and above the tolerance."""
    null = max(("two_stage", "proxy_as_is"), key=lambda c: float(ll[c].mean()))
    gain = bootstrap_mean(ll["direct"] - ll[null], rng)
    failed = gain.p_not_positive < t.alpha and gain.mean > tolerance
    return _check(
        "shared_level_sets", not failed, gain.p_not_positive, t.alpha,
        f"held-out ({n} pairs, {min(t.cv_folds, n)}-fold) log-likelihood gain per pair of fine_tune (proxy margin, "
        f"simplex and direct features) over the best learner reading only the proxy ({null}): {gain.text()}; pass "
        f"unless the direct path adds significantly (p < {t.alpha}) more than {tolerance} nats per pair",
    )


def _image_containment(expert: TextPairFeatures, proxy: TextPairFeatures, rng: np.random.Generator,
                       t: TextConditionThresholds) -> ConditionCheck:
    """Share of expert-chosen responses whose simplex point is farther from the proxy-chosen ones (half
    of them, the reference) than the `image_quantile` of the other half's distances to the reference.
    Exchangeable responses give 1 - image_quantile (5%), but an expert re-weighting the simplex picks
    from other tails than the proxy: 5-10% with the same support. So the one-sided binomial test is
    against `max_outside_share`, not 5% (a point threshold at 10% failed 2 of 20 such worlds at n=50)."""
    if expert.mixture is not None and proxy.mixture is not None:
        return mixture_image_containment(expert.mixture, proxy.mixture, t)
    points = log_ratios(proxy.simplex_chosen)
    order = rng.permutation(len(points))
    reference, held = points[order[: len(points) // 2]], points[order[len(points) // 2:]]
    cutoff = float(np.quantile(_nearest(held, reference), t.image_quantile))
    outside = int((_nearest(log_ratios(expert.simplex_chosen), reference) > cutoff).sum())
    share = outside / expert.n
    p = binomial_tail(outside, expert.n, t.max_outside_share)
    return _check(
        "image_containment", p >= t.alpha, share, t.max_outside_share,
        f"{outside} of {expert.n} expert-chosen responses ({share:.1%}) lie farther (Aitchison, nearest neighbour) "
        f"from {len(reference)} proxy-chosen responses than {t.image_quantile:.0%} of {len(held)} held-out "
        f"proxy-chosen ones ({cutoff:.3g}; exchangeable responses: {1 - t.image_quantile:.0%}); binomial "
        f"p={p:.3g} against {t.max_outside_share:.0%}; pass unless the share is significantly (p < {t.alpha}) above "
        f"{t.max_outside_share:.0%}",
    )


def _similarity_preserved(designs: _Designs, expert: TextPairFeatures, proxy: TextPairFeatures,
                          rng: np.random.Generator, t: TextConditionThresholds) -> ConditionCheck:
    """Relaxation constant L: how much faster the expert's preference changes with simplex distance than
    the proxy's. Per expert pair: |expert logit difference| (fine_tune fitted on all expert pairs; it also
    reads around the bottleneck) / (κ × Aitchison distance of the two simplex points), κ = median over
    proxy pairs of |proxy_margin| / distance (puts both in logit units). L is a high quantile over pairs
    the simplex separates: a re-mapped simplex keeps it moderate; preferences the simplex cannot see, or
    an over-smoothed proxy, make it large."""
    if designs.fold_margins is not None:  # a mixture's direct path, fitted on every expert pair
        strength = np.abs(designs.fold_margins(np.arange(expert.n))["direct"])
    else:
        z, centre = designs.by_name["direct"]
        strength = np.abs(z @ fit_bradley_terry(z, centre, t.prior_precision))
    d_proxy = _aitchison(proxy.simplex_chosen, proxy.simplex_rejected)
    kappa = max(float(np.median(np.abs(proxy.proxy_margin) / np.maximum(d_proxy, 1e-9))), 1e-9)
    d_expert = _aitchison(expert.simplex_chosen, expert.simplex_rejected)
    kept = d_expert >= np.quantile(d_expert, t.proxy_floor_quantile)
    ratios = strength[kept] / (kappa * np.maximum(d_expert[kept], 1e-9))
    l_hat, low, high = relaxation_interval(ratios, t.l_quantile, rng)
    return _check(
        "similarity_preserved", low <= t.max_l, l_hat, t.max_l,
        f"L = {t.l_quantile:.0%} quantile, over the {len(ratios)} of {expert.n} expert pairs at least their "
        f"{t.proxy_floor_quantile:.0%} quantile of simplex distance apart, of |fitted expert logit difference| / "
        f"(κ x Aitchison distance), κ = {kappa:.3g} proxy-margin nats per simplex nat: {l_hat:.2f} (95% bootstrap "
        f"[{low:.2f}, {high:.2f}], median {np.median(ratios):.2f}); pass unless L is significantly above {t.max_l}",
    )


def _end_to_end(ll: dict[str, np.ndarray], correct: dict[str, np.ndarray], n: int, rng: np.random.Generator,
                t: TextConditionThresholds) -> ConditionCheck:
    worse, p, rival, accuracy = two_stage_vs_rival(ll, correct, rng)
    worse = worse and float(ll[rival].mean() - ll["two_stage"].mean()) > t.end_to_end_tolerance
    return _check(
        "end_to_end", not worse, p, t.alpha,
        f"held-out ({n} pairs, {min(t.cv_folds, n)}-fold) log-likelihood per pair: two_stage "
        f"{ll['two_stage'].mean():+.3f} vs the best other plan, {rival}, {ll[rival].mean():+.3f} (paired bootstrap "
        f"p={p:.3f}); pairwise accuracy: {accuracy}; pass unless two_stage is significantly worse (p < {t.alpha}) by "
        f"more than {t.end_to_end_tolerance} nats per pair",
    )

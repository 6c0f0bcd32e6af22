"""The text condition tests on a mode-mixture stage 1 (policies/lm/mixture_learners.py), on synthetic worlds
with known truth.

Eight prompt themes, four response topics, one mixture mode per topic. A response is about one topic:
mode j gives it log-prob −10 + 4·[topic = j], the base −10. The proxy wants topic κ(theme) and stage 1
learned it: w(x) puts its weight on mode κ(theme). The expert wants topic k*(theme). `relabelled`:
κ = σ∘k* for a permutation σ of the topics (the expert's choice is a function of the proxy's simplex
point); `blind`: each topic's two themes get different proxy topics, so two themes the expert treats
differently share one simplex point (paper 1's shared level sets fail); `outside_image`: on two themes the
expert wants a fifth topic that no mode produces (image containment fails). The prompt code is the theme's
one-hot plus noise.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from policies.lm.conditions import MixtureTerms, TextPairFeatures, run_text_condition_tests
from policies.lm.mixture_learners import best_relabelling, fit_relabelling, relabelled_margin

THEMES, TOPICS, BETA = 8, 4, 0.5
RESPONSE_TOPICS = TOPICS + 1  # topic 4 has no mode: stage 1 never learned to produce it
EXPERT_TOPIC = np.arange(THEMES) // 2  # themes 2t and 2t+1 ask for topic t
SIGMA = np.array([1, 2, 3, 0])
PROXY_TOPIC = {"relabelled": SIGMA[EXPERT_TOPIC],
               "blind": np.array([SIGMA[t] if i % 2 == 0 else SIGMA[(t + 1) % TOPICS]
                                  for i, t in enumerate(EXPERT_TOPIC)])}
# outside_image: the expert wants the unlearned topic 4 on themes 6 and 7, where the proxy wants topic 3
OUTSIDE_EXPERT_TOPIC = np.array([0, 0, 1, 1, 2, 2, 4, 4])


def _pairs(rng: np.random.Generator, n: int, wanted: np.ndarray, proxy_topic: np.ndarray) -> TextPairFeatures:
    theme = rng.integers(0, THEMES, n)
    topics = np.stack([rng.permutation(RESPONSE_TOPICS)[:2] for _ in range(n)])  # two different topics per pair
    on_topic = rng.random(n) < 0.8  # most pairs offer the labeller's topic: the rest are coin flips
    topics[on_topic, 0] = wanted[theme[on_topic]]
    topics[on_topic, 1] = (topics[on_topic, 0] + rng.integers(1, RESPONSE_TOPICS, on_topic.sum())) % RESPONSE_TOPICS
    first_wins = topics[:, 0] == wanted[theme]
    first_wins |= (topics[:, 1] != wanted[theme]) & (rng.random(n) < 0.5)
    chosen, rejected = np.where(first_wins, topics[:, 0], topics[:, 1]), np.where(first_wins, topics[:, 1],
                                                                                   topics[:, 0])
    log_w = np.log(np.full((n, TOPICS), 0.01 / (TOPICS - 1)))
    log_w[np.arange(n), proxy_topic[theme]] = np.log(0.99)
    modes = {name: -10.0 + 4.0 * np.eye(RESPONSE_TOPICS)[side][:, :TOPICS]
             for name, side in (("chosen", chosen), ("rejected", rejected))}
    code = np.eye(THEMES)[theme] + rng.normal(0.0, 0.05, (n, THEMES))
    terms = MixtureTerms(log_w, modes["chosen"], modes["rejected"], np.full(n, -10.0), np.full(n, -10.0), code, BETA)
    simplex, logps = {}, {}
    for name in ("chosen", "rejected"):
        joint = log_w + modes[name]
        logps[name] = np.logaddexp.reduce(joint, axis=1)
        simplex[name] = joint - logps[name][:, None]
    direct = {name: np.hstack([np.eye(RESPONSE_TOPICS)[side], rng.normal(0.0, 0.1, (n, 4))])
              for name, side in (("chosen", chosen), ("rejected", rejected))}
    margin = BETA * ((logps["chosen"] - logps["rejected"]) - terms.base_margin)
    return TextPairFeatures(simplex["chosen"], simplex["rejected"], direct["chosen"], direct["rejected"], margin,
                            mixture=terms)


def _report(judge: str, n_expert: int, seed: int = 0):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    proxy_topic = PROXY_TOPIC["relabelled" if judge == "outside_image" else judge]
    proxy = _pairs(rng, 1000, proxy_topic, proxy_topic)
    expert = _pairs(rng, n_expert, OUTSIDE_EXPERT_TOPIC if judge == "outside_image" else EXPERT_TOPIC, proxy_topic)
    return run_text_condition_tests(expert, proxy, f"{judge}-{seed}", n_expert=n_expert, n_proxy=1000, seed=seed)


def _failed(report) -> list[str]:  # type: ignore[no-untyped-def]
    return [c.name for c in report.checks if not c.passed and not c.detail.startswith("undecided")]


def test_best_relabelling_is_the_exhaustive_optimum() -> None:
    score = np.random.default_rng(0).normal(size=(5, 5))
    best = max(itertools.permutations(range(5)), key=lambda p: sum(score[k, p[k]] for k in range(5)))
    assert tuple(best_relabelling(score)) == best


def test_the_fitted_relabelling_sends_each_proxy_mode_to_the_experts_topic() -> None:
    expert = _pairs(np.random.default_rng(3), 60, EXPERT_TOPIC, PROXY_TOPIC["relabelled"])
    assert expert.mixture is not None
    perm = fit_relabelling(expert.mixture)
    assert perm[SIGMA].tolist() == list(range(TOPICS))  # mode σ(t) goes back to t
    assert (relabelled_margin(expert.mixture, perm) > 0).mean() > 0.75
    assert (expert.proxy_margin > 0).mean() < 0.4  # the proxy as is ranks them no better than a coin


def test_modes_the_expert_pairs_barely_reach_keep_their_vertex_and_a_mode_they_contradict_moves() -> None:
    """The keep prior: the proxy is right (κ = k*), the expert pairs ask only about topics 0 and 1, always against
    topic 2. Mode 2's faint weight (1%) on those pairs favours swapping it with mode 3 (0.6 nats), which without the
    prior would happen; with the prior modes 2 and 3 stay, and modes the pairs do contradict still move."""
    rng = np.random.default_rng(0)
    theme = rng.integers(0, 4, 40)  # topics 0 and 1 only
    wanted = EXPERT_TOPIC[theme]

    def terms(proxy_topic: np.ndarray) -> MixtureTerms:
        w = np.full((40, TOPICS), 1e-6)
        w[:, 2] = 0.01  # mode 2 faintly on every pair, mode 3 not at all
        w[np.arange(40), proxy_topic[theme]] = 1.0 - 0.01 - 2e-6
        log_w = np.log(w)
        sides = (("chosen", wanted), ("rejected", np.full(40, 2)))
        modes = {name: -10.0 + 4.0 * np.eye(TOPICS)[side] for name, side in sides}
        return MixtureTerms(log_w, modes["chosen"], modes["rejected"], np.full(40, -10.0), np.full(40, -10.0),
                            np.eye(THEMES)[theme], BETA)

    assert fit_relabelling(terms(EXPERT_TOPIC)).tolist() == [0, 1, 2, 3]
    swapped = np.array([1, 0, 2, 3])[EXPERT_TOPIC]  # the proxy sends topic-0 themes to mode 1 and back
    assert fit_relabelling(terms(swapped)).tolist() == [1, 0, 2, 3]


@pytest.mark.parametrize("seed", [0, 1])
def test_a_relabelled_proxy_gets_two_stage_with_every_condition_passing(seed: int) -> None:
    report = _report("relabelled", 100, seed)
    assert _failed(report) == []
    assert report.plan == "two_stage"


@pytest.mark.parametrize("seed", [0, 1])
def test_below_the_minimum_sample_the_adapter_is_chosen_when_cross_validation_says_it_beats_the_proxy(
        seed: int) -> None:
    report = _report("relabelled", 20, seed)
    assert report.plan == "two_stage"
    assert any("untested conditions" in r for r in report.reasons)


@pytest.mark.parametrize("seed", [0, 1])
def test_a_proxy_blind_to_a_theme_distinction_fails_shared_level_sets_and_two_stage_is_not_chosen(seed: int) -> None:
    report = _report("blind", 200, seed)
    assert "shared_level_sets" in _failed(report)
    assert report.plan != "two_stage"


@pytest.mark.parametrize("seed", [0, 1])
def test_responses_no_mode_produces_fail_image_containment_and_a_relabelled_world_passes_it(seed: int) -> None:
    assert "image_containment" in _failed(_report("outside_image", 100, seed))
    assert "image_containment" not in _failed(_report("relabelled", 100, seed))



def test_a_plan_the_caller_trained_on_the_folds_replaces_its_stand_in() -> None:
    """A caller that trained fine_tune on the tests' folds and found it ranks every held-out pair right gets
    fine_tune: its calibrated held-out evidence outweighs the relabelling's; the wrong shape is refused."""
    rng = np.random.default_rng(0)
    proxy = _pairs(rng, 1000, PROXY_TOPIC["relabelled"], PROXY_TOPIC["relabelled"])
    expert = _pairs(rng, 100, EXPERT_TOPIC, PROXY_TOPIC["relabelled"])
    assert run_text_condition_tests(expert, proxy, "s", n_expert=100, n_proxy=1000).plan == "two_stage"
    trained = {"fine_tune": np.full(100, 5.0)}
    report = run_text_condition_tests(expert, proxy, "s", n_expert=100, n_proxy=1000, trained_margins=trained)
    assert report.plan == "fine_tune"
    assert report.heldout_log_likelihood["fine_tune"] > -0.02
    with pytest.raises(ValueError, match="one margin per expert pair"):
        run_text_condition_tests(expert, proxy, "s", n_expert=100, n_proxy=1000,
                                 trained_margins={"fine_tune": np.zeros(99)})


def test_calibration_rescales_over_confident_margins_and_charges_for_the_fitted_scale() -> None:
    from policies.lm.bradley_terry import calibrated_log_likelihood, log_sigmoid

    margins = np.where(np.random.default_rng(0).random(200) < 0.8, 20.0, -20.0)  # right 80% of the time, sure
    calibrated = calibrated_log_likelihood(margins)
    assert calibrated.mean() > log_sigmoid(margins).mean() + 2.0  # the raw margins are punished for confidence
    assert calibrated.mean() < float(0.8 * np.log(0.8) + 0.2 * np.log(0.2))  # no better than the true rate


def test_oriented_turns_each_pair_chosen_first_and_negates_every_margin_of_a_flipped_pair() -> None:
    rng = np.random.default_rng(0)
    n, dim = 6, 3
    terms = MixtureTerms(np.log(rng.dirichlet(np.ones(dim), n)), -rng.random((n, dim)) * 5, -rng.random((n, dim)) * 5,
                         -rng.random(n) * 5, -rng.random(n) * 5, rng.standard_normal((n, 2)), 0.5)
    sign = np.array([1, -1, 1, -1, -1, 1])
    turned = terms.oriented(sign)
    assert np.allclose(turned.mode_margins(), sign[:, None] * terms.mode_margins())
    assert np.allclose(turned.base_margin, sign * terms.base_margin)
    perm = np.arange(dim)
    assert np.allclose(relabelled_margin(turned, perm), sign * relabelled_margin(terms, perm))
    assert np.array_equal(turned.log_weights, terms.log_weights)
    assert np.array_equal(turned.prompt_code, terms.prompt_code)


def test_mixture_terms_of_two_stage_ones_or_of_one_side_only_are_refused_clearly() -> None:
    """Each was a numpy broadcast error, NaN held-out scores with a plan all the same, or a silent fallback."""
    rng = np.random.default_rng(0)
    expert, proxy = _pairs(rng, 40, EXPERT_TOPIC, SIGMA[EXPERT_TOPIC]), _pairs(rng, 300, SIGMA[EXPERT_TOPIC],
                                                                                SIGMA[EXPERT_TOPIC])
    assert proxy.mixture is not None and expert.mixture is not None
    narrow = dataclasses.replace(proxy, mixture=proxy.mixture.take(slice(None)))
    object.__setattr__(narrow.mixture, "prompt_code", proxy.mixture.prompt_code[:, :2])
    for other, message in ((narrow, "prompt code width"), (dataclasses.replace(proxy, mixture=None), "or for neither"),
                           (dataclasses.replace(proxy, mixture=dataclasses.replace(proxy.mixture, beta=0.25)), "β")):
        with pytest.raises(ValueError, match=message):
            run_text_condition_tests(expert, other, "s", n_expert=40, n_proxy=300)
    with pytest.raises(ValueError, match="must be a positive number"):
        dataclasses.replace(expert.mixture, beta=float("nan"))
    with pytest.raises(ValueError, match="non-negative"):
        run_text_condition_tests(expert, proxy, "s", n_expert=40, n_proxy=300, seed=-1)

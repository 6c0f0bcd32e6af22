"""The direct path of the shared-level-set test groups expert prompts by what they ask about
(policies/lm/prompt_content.py): TF-IDF over the prompts' tokens, not the prompt code τ̃ reads.

The worlds are test_text_conditions_mixture's, phrased: each prompt is chat markup (a token every prompt has), one
of three phrasings (a third of the prompts each) and its theme (an eighth). The prompt code here is what the bench's
tiny base gives (docs/benchmarks.md): the phrasing dominates it and the theme is a faint part.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from ground.schemas import ConditionCheck
from policies.lm.conditions import TextPairFeatures, run_text_condition_tests
from policies.lm.mixture_learners import PromptCloseness, neighbour_modes
from policies.lm.prompt_content import PAD, tfidf_similarity
from tests.policies.test_text_conditions_mixture import EXPERT_TOPIC, PROXY_TOPIC, THEMES, _pairs

PHRASINGS, MARKUP = 3, 0


def _phrased(rng: np.random.Generator, features: TextPairFeatures, tokens: bool = True) -> TextPairFeatures:
    assert features.mixture is not None
    n = features.n
    theme = features.mixture.prompt_code.argmax(axis=1)  # _pairs' code is the theme's one-hot plus noise
    phrasing = rng.integers(0, PHRASINGS, n)
    code = np.hstack([3.0 * np.eye(PHRASINGS)[phrasing], 0.3 * np.eye(THEMES)[theme]])
    ids = np.stack([np.full(n, MARKUP), 1 + phrasing, 1 + PHRASINGS + theme, np.full(n, PAD)], axis=1)
    terms = dataclasses.replace(features.mixture, prompt_code=code + rng.normal(0.0, 0.05, code.shape),
                                prompt_tokens=ids if tokens else None)
    return dataclasses.replace(features, mixture=terms)


def _level_sets_check(judge: str, seed: int, n_expert: int = 100, tokens: bool = True) -> ConditionCheck:
    rng = np.random.default_rng(seed)
    proxy_topic = PROXY_TOPIC[judge]
    proxy = _phrased(rng, _pairs(rng, 1000, proxy_topic, proxy_topic), tokens)
    expert = _phrased(rng, _pairs(rng, n_expert, EXPERT_TOPIC, proxy_topic), tokens)
    report = run_text_condition_tests(expert, proxy, f"{judge}-{seed}", n_expert=n_expert, n_proxy=1000, seed=seed)
    return next(c for c in report.checks if c.name == "shared_level_sets")


def _shared_level_sets(judge: str, seed: int, n_expert: int = 100, tokens: bool = True) -> bool:
    return _level_sets_check(judge, seed, n_expert, tokens).passed


def test_a_rare_shared_token_makes_prompts_alike_and_one_every_prompt_has_weighs_nothing() -> None:
    corpus = np.array([[0, 1, 4], [0, 1, 5], [0, 2, 4], [0, 2, 6], [0, 3, 7], [0, 3, 5]])
    prompts = np.array([[0, 1, 4, PAD], [0, 2, 4, PAD], [0, 1, 6, PAD], [0, PAD, PAD, PAD]])
    similarity = tfidf_similarity(prompts, corpus)
    assert similarity[0, 1] > 0.5 > similarity[0, 2] > 0.0  # one theme (token 4) vs one phrasing (token 1)
    assert np.allclose(np.diag(similarity)[:3], 1.0)
    assert np.allclose(similarity[3], 0.0)  # only markup, which every corpus prompt has: alike to nothing
    padded = np.hstack([prompts, np.full((4, 3), PAD)])
    assert np.allclose(tfidf_similarity(padded, corpus), similarity)


def test_the_sparse_similarity_is_the_dense_tf_idf_cosine() -> None:
    """Only tokens two prompts share enter the product; norms still count every token (repeats as term counts)."""
    rng = np.random.default_rng(0)
    tokens = np.where(rng.random((40, 12)) < 0.8, rng.zipf(1.5, (40, 12)) % 60, PAD)
    corpus = np.where(rng.random((70, 9)) < 0.8, rng.zipf(1.5, (70, 9)) % 60, PAD)
    documents = np.array([np.isin(np.arange(60), row[row != PAD]) for row in corpus]).sum(axis=0)
    dense = np.array([np.bincount(row[row != PAD], minlength=60) for row in tokens]) * np.log(71 / (1 + documents))
    norms = np.linalg.norm(dense, axis=1)
    unit = dense / np.where(norms > 0, norms, 1.0)[:, None]
    want = unit @ unit.T
    np.fill_diagonal(want, norms > 0)
    assert np.allclose(tfidf_similarity(tokens, corpus), want, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_a_blind_proxy_is_caught_at_100_pairs_by_grouping_prompts_on_their_tokens(seed: int) -> None:
    """Grouped by a code the phrasing dominates, the direct path fits each pair on other themes and misses it."""
    assert not _shared_level_sets("blind", seed)
    assert _shared_level_sets("blind", seed, tokens=False)


@pytest.mark.parametrize("seed", [0, 1])
def test_a_relabelled_proxy_passes_shared_level_sets_when_prompts_are_grouped_on_their_tokens(seed: int) -> None:
    assert _shared_level_sets("relabelled", seed)


def test_mixture_terms_keep_their_prompt_tokens_through_take_and_oriented() -> None:
    rng = np.random.default_rng(0)
    terms = _phrased(rng, _pairs(rng, 10, EXPERT_TOPIC, PROXY_TOPIC["blind"])).mixture
    assert terms is not None and terms.prompt_tokens is not None
    assert np.array_equal(terms.take(np.array([3, 1])).prompt_tokens, terms.prompt_tokens[[3, 1]])
    assert np.array_equal(terms.oriented(-np.ones(10)).prompt_tokens, terms.prompt_tokens)
    with pytest.raises(ValueError, match="prompt_tokens must be"):
        dataclasses.replace(terms, prompt_tokens=terms.prompt_tokens[:5])


def test_the_wider_tolerance_is_the_token_grouped_direct_paths_alone() -> None:
    """0.1 nats per pair was chosen for the direct path grouped by tokens; grouped by codes it keeps 0.01."""
    assert "more than 0.1 nats per pair" in _level_sets_check("relabelled", 0).detail
    assert "more than 0.01 nats per pair" in _level_sets_check("relabelled", 0, tokens=False).detail


def test_a_pair_alike_to_no_training_pair_is_fitted_on_all_of_them() -> None:
    """Its "closest" would be whichever training pairs come first; all of them is the group nothing narrows."""
    options = np.array([[3.0, -3.0], [3.0, -3.0], [-3.0, 3.0], [-3.0, 3.0], [-3.0, 3.0], [0.5, 0.7]])
    similarity = np.eye(6)
    similarity[:5, :5] = 1.0  # pairs 0-4 alike, pair 5 alike to none
    closeness = PromptCloseness(similarity, least=2, floor=0.5, unrelated=0.0, by_tokens=True)
    train = np.arange(5)
    chosen = neighbour_modes(options[:, :1], options[:, 1], train, closeness)
    # over all five training pairs option 1 (two_stage's column) fits best: 3 of 5 prefer it
    assert chosen[5] == options[5, 1]
    first_two = PromptCloseness(np.zeros((6, 6)), least=2)  # the code path's rule: the 2 "nearest", by order
    assert neighbour_modes(options[:, :1], options[:, 1], train, first_two)[5] == options[5, 0]

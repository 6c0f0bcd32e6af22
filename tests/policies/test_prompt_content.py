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

from policies.lm.conditions import TextPairFeatures, run_text_condition_tests
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


def _shared_level_sets(judge: str, seed: int, n_expert: int = 100, tokens: bool = True) -> bool:
    rng = np.random.default_rng(seed)
    proxy_topic = PROXY_TOPIC[judge]
    proxy = _phrased(rng, _pairs(rng, 1000, proxy_topic, proxy_topic), tokens)
    expert = _phrased(rng, _pairs(rng, n_expert, EXPERT_TOPIC, proxy_topic), tokens)
    report = run_text_condition_tests(expert, proxy, f"{judge}-{seed}", n_expert=n_expert, n_proxy=1000, seed=seed)
    return next(c.passed for c in report.checks if c.name == "shared_level_sets")


def test_a_rare_shared_token_makes_prompts_alike_and_one_every_prompt_has_weighs_nothing() -> None:
    corpus = np.array([[0, 1, 4], [0, 1, 5], [0, 2, 4], [0, 2, 6], [0, 3, 7], [0, 3, 5]])
    prompts = np.array([[0, 1, 4, PAD], [0, 2, 4, PAD], [0, 1, 6, PAD], [0, PAD, PAD, PAD]])
    similarity = tfidf_similarity(prompts, corpus)
    assert similarity[0, 1] > 0.5 > similarity[0, 2] > 0.0  # one theme (token 4) vs one phrasing (token 1)
    assert np.allclose(np.diag(similarity)[:3], 1.0)
    assert np.allclose(similarity[3], 0.0)  # only markup, which every corpus prompt has: alike to nothing
    padded = np.hstack([prompts, np.full((4, 3), PAD)])
    assert np.allclose(tfidf_similarity(padded, corpus), similarity)


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

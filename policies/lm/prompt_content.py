"""Which expert prompts ask about the same thing: TF-IDF cosine similarity over the prompts' token ids.

Why: the shared-level-set test's direct path (`mixture_learners.neighbour_modes`) fits, for each held-out expert
pair, the mode choice of the training pairs whose prompts are alike. What makes prompts alike for an expert is what
they ask about, and in a short chat prompt that is its rarer tokens: the chat markup is in every prompt and a
phrasing ("tell me about") in a third of them, while a subject is in few. The prompt code τ̃ reads (the base's
pooled input embeddings) weighs every token alike, and on bench/lm_proxy.py's tiny base a prompt's nearest other
prompt asks about the same theme 42% of the time (TF-IDF: 100%; tuning seeds 0-11, docs/benchmarks.md). Inverse
document frequencies come from a corpus of prompts (the proxy pairs'), as a vectorizer is fitted on unlabelled text.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

PAD = -1  # the padding of a [n, T] token-id matrix


def _document_frequencies(corpus: np.ndarray) -> tuple[Counter[int], int]:
    return Counter(t for row in corpus for t in set(row[row != PAD].tolist())), len(corpus)


def tfidf_similarity(tokens: np.ndarray, corpus: np.ndarray) -> np.ndarray:
    """[n, n] cosine similarity of the prompts `tokens` [n, T] (token ids, PAD-padded) as TF-IDF vectors, with
    inverse document frequencies log((1 + N) / (1 + df)) over the N prompts of `corpus` [N, T']: a token every
    corpus prompt has weighs 0, one none has weighs the most. A prompt whose every token weighs 0 is similar to
    nothing (a row of zeros)."""
    frequencies, n = _document_frequencies(corpus)
    present = tokens[tokens != PAD]
    columns = {t: i for i, t in enumerate(sorted(set(present.tolist())))}
    weight = {t: math.log((1 + n) / (1 + frequencies.get(t, 0))) for t in columns}
    vectors = np.zeros((len(tokens), len(columns)))
    for i, row in enumerate(tokens):
        for t in row[row != PAD].tolist():
            vectors[i, columns[t]] += weight[t]
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors /= np.where(norms > 0, norms, 1.0)
    return np.asarray(vectors @ vectors.T)

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

import numpy as np

PAD = -1  # the padding of a [n, T] token-id matrix


def _document_frequencies(vocabulary: np.ndarray, corpus: np.ndarray) -> np.ndarray:
    """How many prompts of `corpus` [N, T] hold each token of `vocabulary` (sorted, distinct)."""
    rows, positions = np.nonzero(corpus != PAD)
    held = np.unique(np.stack([corpus[rows, positions], rows], axis=1), axis=0)[:, 0]  # one per (token, prompt)
    ids, frequencies = np.unique(held, return_counts=True)
    out = np.zeros(len(vocabulary), dtype=np.int64)
    if len(ids):
        at = np.minimum(np.searchsorted(ids, vocabulary), len(ids) - 1)
        found = ids[at] == vocabulary
        out[found] = frequencies[at[found]]
    return out


def tfidf_similarity(tokens: np.ndarray, corpus: np.ndarray) -> np.ndarray:
    """[n, n] cosine similarity of the prompts `tokens` [n, T] (token ids, PAD-padded) as TF-IDF vectors, with
    inverse document frequencies log((1 + N) / (1 + df)) over the N prompts of `corpus` [N, T']: a token every
    corpus prompt has weighs 0, one none has weighs the most. A prompt whose every token weighs 0 is similar to
    nothing (a row of zeros). Sparse in all but the product: only tokens two prompts share enter the dense matrix
    (3000 prompts of 128 tokens over a 49k vocabulary had asked 2.3 GB of a dense one)."""
    n = len(tokens)
    rows, positions = np.nonzero(tokens != PAD)
    vocabulary, column = np.unique(tokens[rows, positions], return_inverse=True)
    weight = np.log((1 + len(corpus)) / (1 + _document_frequencies(vocabulary, corpus)))
    cells, counts = np.unique(rows * len(vocabulary) + column, return_counts=True)  # one per (prompt, token)
    row, col = np.divmod(cells, max(len(vocabulary), 1))
    value = counts * weight[col]
    norms = np.sqrt(np.bincount(row, value**2, minlength=n))
    value = value / np.where(norms[row] > 0, norms[row], 1.0)
    shared = np.bincount(col, minlength=len(vocabulary)) > 1  # a token one prompt has adds to no product
    keep = shared[col]
    vectors = np.zeros((n, int(shared.sum())))
    vectors[row[keep], (np.cumsum(shared) - 1)[col[keep]]] = value[keep]
    similarity = vectors @ vectors.T
    np.fill_diagonal(similarity, norms > 0)  # its tokens no other prompt has count for a prompt itself
    return np.asarray(similarity)

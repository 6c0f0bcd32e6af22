"""A generated chat preference task for paper 1's proxy-feedback setting, with judges built to pass or fail.

Small enough for a tiny causal LM (2 layers, 64 hidden) trained with DPO on CPU: prompts are
"<template> <theme>" (e.g. "tell me about pets"), responses are 4–6 words from 17 response words.

World. Four latent topics of three words each (colour, animal, food, tool) and five filler words.
Eight prompt themes, two per topic, name what the user asks about ("paint" and "rainbow" ask for
colours). φ(y) is the fraction of the response's words in each topic plus one "filler" class
(filler and unknown words, so any text parses); an empty response has φ = 0.

Gold (expert) reward r*(x, y) = φ(y)[k*(x)], the share of words on the theme's topic: in
[GOLD_MIN, GOLD_MAX] = [0, 1]; the empty response gets 0. A proxy judge rewards
r_p(x, y) = φ(y)[κ(x)] with its own class κ(theme) ∈ topics ∪ {filler}. Labels follow
Bradley–Terry: P(a beats b) = sigmoid((r(a) − r(b)) / T) with the labeller's temperature T.

Judges (paper 1's conditions, /work/shared/papers/README.md §1: 1 shared level sets, 2 image
containment, 3 low-dimensional encoding, 4 similarity up to L). Condition 3 holds for every kind:
the proxy's outputs are encoded by the 5-class simplex φ (D = 5) while the response space has
17^L points. Which others hold is stated per kind in JUDGE_DOCS.

Prompts. `pairs` and `prompts` use TRAIN_TEMPLATES; `heldout_prompts` uses HELDOUT_TEMPLATES, so
held-out prompts are disjoint from every training pair by construction (same themes, unseen phrasing).
Both template sets appear in `corpus` and `warmup_chats` (unaligned format data, no preference signal).
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Literal

from ground.schemas import PairwiseText

TOPICS: dict[str, tuple[str, ...]] = {
    "colour": ("red", "blue", "green"),
    "animal": ("cat", "dog", "owl"),
    "food": ("bread", "rice", "soup"),
    "tool": ("saw", "drill", "hammer"),
}
TOPIC_NAMES: tuple[str, ...] = tuple(TOPICS)
FILLER = "filler"  # the proxy class of filler and unknown words
FILLER_WORDS: tuple[str, ...] = ("the", "a", "and", "very", "so")
RESPONSE_WORDS: tuple[str, ...] = tuple(w for words in TOPICS.values() for w in words) + FILLER_WORDS
THEMES: dict[str, str] = {  # theme word -> the topic the expert wants
    "paint": "colour", "rainbow": "colour", "pets": "animal", "zoo": "animal",
    "lunch": "food", "dinner": "food", "workshop": "tool", "garage": "tool",
}
TRAIN_TEMPLATES: tuple[str, ...] = ("tell me about {}", "say something about {}", "describe {}")
HELDOUT_TEMPLATES: tuple[str, ...] = ("what do you know about {}",)
MIN_WORDS, MAX_WORDS = 4, 6
FOCUS = 0.5  # reference sampler: each word is from the response's focus topic with this probability
GOLD_MIN, GOLD_MAX = 0.0, 1.0
EXPERT_TEMPERATURE = 0.05  # a gold gap of one word in six (≈0.17) is labelled right ≈97% of the time
TEMPERED_TEMPERATURE = 0.5  # the same gap: ≈58%

JUDGE_DOCS: dict[str, str] = {
    "relabelled": (
        "Satisfies 1–4. Wants topic σ(k*(x)) where the expert wants k*(x), σ a seeded derangement of the "
        "topics; expert temperature. Level sets shared (σ is a bijection: the expert's class is g(proxy's) with "
        "g = σ⁻¹), image contained (σ is onto), similarity preserved with L = 1 (σ permutes one-hot outputs "
        "isometrically). Disagrees with the expert on every prompt."),
    "tempered": (
        "Satisfies 1–4 (the paper's over-smoothing example). Same criterion as the expert, κ = k*, but "
        "Bradley–Terry temperature TEMPERED_TEMPERATURE instead of EXPERT_TEMPERATURE: same level sets and "
        "image, much noisier labels."),
    "blind": (
        "Violates 1 (shared level sets) and 4 (similarity); satisfies 2. Cannot tell a theme from one of "
        "another topic: a topic's first theme gets proxy class k, its second τ(k), τ a seeded derangement, "
        "so every proxy class holds two themes whose expert topics differ (no g with k* = g∘κ), and the two themes the "
        "expert treats alike get different proxy classes. Every topic is still some theme's proxy class."),
    "outside_image": (
        "Violates 2 (image containment); satisfies 1 and 4. Like 'relabelled', except that the expert topic "
        "σ sends to a seeded topic k_out is sent to 'filler' instead: κ stays injective on expert topics "
        "(shared level sets), but no prompt ever makes the proxy prefer k_out's words, which the expert "
        "prefers on k_out's themes."),
}
JUDGE_KINDS: tuple[str, ...] = tuple(JUDGE_DOCS)
SATISFYING: frozenset[str] = frozenset({"relabelled", "tempered"})
VIOLATING: frozenset[str] = frozenset({"blind", "outside_image"})
Labeller = Literal["expert", "proxy"]
_CLASS_OF_WORD = {w: i for i, words in enumerate(TOPICS.values()) for w in words}
_FILLER_INDEX = len(TOPICS)


def words(text: str) -> list[str]:
    """Lowercase alphabetic words of any text (punctuation, digits and markup split or dropped)."""
    return re.findall(r"[a-z]+", text.lower())


def features(response: str) -> tuple[float, ...]:
    """φ(y): fraction of words per topic (TOPIC_NAMES order) then filler/unknown; all 0 when empty."""
    ws = words(response)
    counts = [0] * (len(TOPICS) + 1)
    for w in ws:
        counts[_CLASS_OF_WORD.get(w, _FILLER_INDEX)] += 1
    return tuple(c / len(ws) for c in counts) if ws else tuple(0.0 for _ in counts)


def theme_of(prompt: str) -> str:
    """The last theme word in the prompt; ValueError if none."""
    for w in reversed(words(prompt)):
        if w in THEMES:
            return w
    raise ValueError(f"No theme in prompt {prompt!r}; themes are {sorted(THEMES)}")


def _derangement(rng: random.Random, n: int) -> tuple[int, ...]:
    while True:
        perm = list(range(n))
        rng.shuffle(perm)
        if all(i != p for i, p in enumerate(perm)):
            return tuple(perm)


def _rng(rng: random.Random | int) -> random.Random:
    return rng if isinstance(rng, random.Random) else random.Random(rng)


@dataclass(frozen=True)
class ChatWorld:
    """One judge's world. `proxy_classes[t]` is the class (index into TOPIC_NAMES, or 4 = filler) the
    proxy wants for theme t (THEMES order); `permutation` is σ or τ over topic indices (identity for
    'tempered')."""

    seed: int
    judge: str
    proxy_classes: tuple[int, ...]
    permutation: tuple[int, ...]
    expert_temperature: float = EXPERT_TEMPERATURE
    proxy_temperature: float = EXPERT_TEMPERATURE

    @property
    def gold_range(self) -> tuple[float, float]:
        return GOLD_MIN, GOLD_MAX

    @property
    def description(self) -> str:
        return JUDGE_DOCS[self.judge]

    def expert_topic(self, theme: str) -> str:
        return THEMES[theme]

    def proxy_topic(self, theme: str) -> str:
        """The topic the proxy wants for this theme, or 'filler'."""
        cls = self.proxy_classes[list(THEMES).index(theme)]
        return FILLER if cls == _FILLER_INDEX else TOPIC_NAMES[cls]

    def gold_reward(self, prompt: str, response: str) -> float:
        return features(response)[TOPIC_NAMES.index(self.expert_topic(theme_of(prompt)))]

    def proxy_reward(self, prompt: str, response: str) -> float:
        return features(response)[self.proxy_classes[list(THEMES).index(theme_of(prompt))]]

    def reward(self, labeller: Labeller, prompt: str, response: str) -> float:
        return self.gold_reward(prompt, response) if labeller == "expert" else self.proxy_reward(prompt, response)

    def temperature(self, labeller: Labeller) -> float:
        return self.expert_temperature if labeller == "expert" else self.proxy_temperature

    def prompts(self, n: int, rng: random.Random | int) -> list[str]:
        """n training-distribution prompts (TRAIN_TEMPLATES, uniform theme); `rng` or its int seed."""
        r = _rng(rng)
        return [r.choice(TRAIN_TEMPLATES).format(r.choice(list(THEMES))) for _ in range(n)]

    def heldout_prompts(self, n: int) -> list[str]:
        """n deterministic held-out prompts cycling through themes and HELDOUT_TEMPLATES (never in `pairs`)."""
        themes, templates = list(THEMES), HELDOUT_TEMPLATES
        return [templates[(i // len(themes)) % len(templates)].format(themes[i % len(themes)]) for i in range(n)]

    def response(self, rng: random.Random) -> str:
        """A reference-sampler response: MIN_WORDS–MAX_WORDS words, each from a random focus topic with
        probability FOCUS, otherwise uniform over RESPONSE_WORDS (so pairs vary in topic)."""
        focus = TOPICS[rng.choice(TOPIC_NAMES)]
        n = rng.randint(MIN_WORDS, MAX_WORDS)
        return " ".join(rng.choice(focus) if rng.random() < FOCUS else rng.choice(RESPONSE_WORDS) for _ in range(n))

    def vocabulary(self) -> list[str]:
        """Every word of prompts and responses, sorted."""
        prompt_words = {w for t in TRAIN_TEMPLATES + HELDOUT_TEMPLATES for w in words(t.format(""))}
        return sorted(prompt_words | set(THEMES) | set(RESPONSE_WORDS))

    def all_prompts(self) -> list[str]:
        return [t.format(theme) for t in TRAIN_TEMPLATES + HELDOUT_TEMPLATES for theme in THEMES]

    def corpus(self, n_responses: int = 400) -> list[str]:
        """ChatML role names, every prompt, then random responses: for the tokenizer (and a plain-text
        LM warm-up). With the role names in, a rendered chat is ≈19 tokens, each word one token."""
        rng = random.Random(f"corpus-{self.seed}")
        return ["user", "assistant", *self.all_prompts()] + [self.response(rng) for _ in range(n_responses)]

    def warmup_chats(self, n: int, seed: int) -> list[list[dict[str, str]]]:
        """ChatML chats pairing any prompt (train or held-out phrasing) with an unaligned random response."""
        rng = random.Random(f"warmup-{seed}")
        prompts = self.all_prompts()
        return [[{"role": "user", "content": rng.choice(prompts)},
                 {"role": "assistant", "content": self.response(rng)}] for _ in range(n)]

    def pairs(self, n: int, labeller: Labeller, seed: int) -> list[PairwiseText]:
        """n pairs of reference responses to training prompts, labelled by Bradley–Terry on the
        labeller's reward and temperature. a and b are i.i.d., so the winner's side is random. The
        responses depend on (labeller, seed) only: every judge's proxy pairs share them, differing in labels."""
        if labeller not in ("expert", "proxy"):
            raise ValueError(f"labeller must be 'expert' or 'proxy', got {labeller!r}")
        rng = random.Random(f"pairs-{labeller}-{seed}")
        temperature, out = self.temperature(labeller), []
        for prompt in self.prompts(n, rng):
            a, b = self.response(rng), self.response(rng)
            gap = (self.reward(labeller, prompt, a) - self.reward(labeller, prompt, b)) / temperature
            p_a = 1 / (1 + math.exp(-max(-50.0, min(50.0, gap))))
            out.append(PairwiseText(prompt=prompt, response_a=a, response_b=b,
                                    choice="a" if rng.random() < p_a else "b"))
        return out


def make_world(seed: int, judge: str, *, expert_temperature: float = EXPERT_TEMPERATURE,
               tempered_temperature: float = TEMPERED_TEMPERATURE) -> ChatWorld:
    """The world for `judge` (one of JUDGE_KINDS); `seed` draws σ/τ/k_out and nothing about the expert."""
    if judge not in JUDGE_DOCS:
        raise ValueError(f"Unknown judge kind {judge!r}; should be one of {list(JUDGE_KINDS)}")
    if expert_temperature <= 0 or tempered_temperature <= 0:
        raise ValueError("temperatures must be positive")
    rng = random.Random(f"{judge}-{seed}")
    n = len(TOPICS)
    perm = tuple(range(n)) if judge == "tempered" else _derangement(rng, n)
    expert = [TOPIC_NAMES.index(topic) for topic in THEMES.values()]
    first = [i == 0 or expert[i - 1] != k for i, k in enumerate(expert)]  # first theme of its topic
    if judge == "tempered":
        classes = expert
    elif judge == "relabelled":
        classes = [perm[k] for k in expert]
    elif judge == "blind":
        classes = [k if is_first else perm[k] for k, is_first in zip(expert, first, strict=True)]
    else:  # outside_image: k_out = the topic a randomly drawn expert topic would be relabelled to
        k_out = perm[rng.randrange(n)]
        classes = [_FILLER_INDEX if perm[k] == k_out else perm[k] for k in expert]
    proxy_t = tempered_temperature if judge == "tempered" else expert_temperature
    return ChatWorld(seed=seed, judge=judge, proxy_classes=tuple(classes), permutation=perm,
                     expert_temperature=expert_temperature, proxy_temperature=proxy_t)

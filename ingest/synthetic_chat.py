"""A generated chat preference task with a known gold reward, for the `--task chat` demo and tests.

Prompts are short questions (sums and capitals). The gold reward prefers the correct answer in a
consistent polite style; a response loses one point for a wrong answer and one for a rude style.
Every pair has a strictly better response under the gold reward. Expert labels follow the gold
reward; the proxy judge (a synthetic LLM judge) agrees with it with probability `proxy_accuracy`.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from ground.schemas import PairwiseText

CAPITALS = {
    "France": "Paris", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin", "Japan": "Tokyo",
    "Egypt": "Cairo", "Peru": "Lima", "Norway": "Oslo", "Kenya": "Nairobi", "Canada": "Ottawa",
    "Chile": "Santiago", "Greece": "Athens", "Poland": "Warsaw", "Cuba": "Havana", "India": "New Delhi",
}
POLITE = "Thank you for asking! The answer is {answer}."
RUDE = ["Ugh, obviously {answer}.", "Whatever. {answer}, figure it out yourself.", "{answer}. Stop bothering me."]


@dataclass(frozen=True)
class ChatTask:
    expert: list[PairwiseText]
    proxy: list[PairwiseText]
    expert_heldout: list[PairwiseText]  # never published: the demo's own spot checks


def _question(rng: random.Random) -> tuple[str, str, str]:
    """(prompt, correct answer, a wrong answer)."""
    if rng.random() < 0.5:
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        wrong = a + b + rng.choice([-3, -2, -1, 1, 2, 3])
        return f"What is {a} plus {b}?", str(a + b), str(wrong)
    country = rng.choice(sorted(CAPITALS))
    wrong_city = rng.choice(sorted(set(CAPITALS.values()) - {CAPITALS[country]}))
    return f"What is the capital of {country}?", CAPITALS[country], wrong_city


def gold_reward(response: str, correct: str) -> int:
    """0 for a correct polite answer; −1 per fault (wrong answer, rude style)."""
    right = re.search(rf"(?<![\w]){re.escape(correct)}(?![\w])", response) is not None
    return -int(not right) - int(not response.startswith("Thank you"))


def _pair(rng: random.Random) -> tuple[str, str, str]:
    """(prompt, gold-better response, gold-worse response)."""
    prompt, correct, wrong = _question(rng)
    chosen = POLITE.format(answer=correct)
    fault = rng.choice(["wrong", "rude", "both"])
    answer = correct if fault == "rude" else wrong
    rejected = POLITE.format(answer=answer) if fault == "wrong" else rng.choice(RUDE).format(answer=answer)
    return prompt, chosen, rejected


def _labelled(rng: random.Random, agree_with_gold: bool) -> PairwiseText:
    prompt, better, worse = _pair(rng)
    winner, loser = (better, worse) if agree_with_gold else (worse, better)
    if rng.random() < 0.5:  # which side the winner is shown on is random, as in an annotation tool
        return PairwiseText(prompt=prompt, response_a=winner, response_b=loser, choice="a")
    return PairwiseText(prompt=prompt, response_a=loser, response_b=winner, choice="b")


def chat_preferences(n_proxy: int, n_expert: int, proxy_accuracy: float = 0.85, n_heldout: int = 20,
                     seed: int = 0) -> ChatTask:
    """Expert pairs labelled by the gold reward, proxy pairs by a judge that errs 1 − `proxy_accuracy` of the time."""
    if not 0.5 <= proxy_accuracy <= 1:
        raise ValueError(f"proxy_accuracy must be in [0.5, 1], got {proxy_accuracy}")
    rng = random.Random(seed)
    expert = [_labelled(rng, True) for _ in range(n_expert)]
    proxy = [_labelled(rng, rng.random() < proxy_accuracy) for _ in range(n_proxy)]
    heldout = [_labelled(rng, True) for _ in range(n_heldout)]
    return ChatTask(expert=expert, proxy=proxy, expert_heldout=heldout)


def warmup_chats(n: int = 600, seed: int = 1) -> list[list[dict[str, str]]]:
    """Chats answering each question once well and once badly: a base model's unaligned pretraining mix."""
    rng = random.Random(seed)
    chats = []
    for _ in range(n // 2):
        prompt, better, worse = _pair(rng)
        chats += [[{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
                  for answer in (better, worse)]
    return chats


def chat_corpus() -> list[str]:
    """Sentences in the task's vocabulary, for training the tiny base model's tokenizer."""
    return [message["content"] for chat in warmup_chats() for message in chat]

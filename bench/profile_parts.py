"""The personalisation bench's generated users and their gold reward (bench/profile.py, issue 18, paper 3).

Every user has stable preferences that the generator knows, so a generated answer can be scored
against them without a judge model: `gold_reward` is the mean of six checks in [0, 1] —
  greeting  the answer opens with one of the user's two greetings,
  signoff   it closes with one of their two sign-offs (within the last few words),
  filler    it uses one of their two favourite fillers,
  length    its word count is in their band: terse 1–14 words, chatty 15–30 (the generator's
            own replies are 8–16 and 14–24 words; 14 is the threshold that misfiles fewest),
  fact      1 if it mentions their personal fact and no other user's, 0.5 if it mentions none
            (held-out queries never touch the fact, so silence does not contradict it), 0 if it
            attributes another user's fact to them,
  answer    the question's answer appears (as whole words),
and it is 0 outright when the answer repeats a profile response verbatim apart from its greeting
and sign-off (the user reuses those; everything else copied is a past reply replayed, the failure
paper 3 warns about). Matching is on lower-cased words, so punctuation and case do not count.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

GREETINGS = ["Ahoy!", "Hey there,", "Greetings.", "Yo!", "Good day!", "Hi friend,", "Well,", "Okay so,",
             "Hmm,", "Howdy!", "Oh hi,", "Right,"]
FILLERS = ["honestly", "basically", "indeed", "frankly", "no doubt", "if you ask me", "for real", "truly",
           "naturally", "to be fair"]
SIGNOFFS = ["Cheers!", "Take care.", "Peace out.", "Have fun!", "Later!", "Stay curious.", "Bye now.",
            "All the best.", "Catch you soon.", "Onwards!"]
FACTS = ["my cat Miso", "my dog Biscuit", "my sister in Lisbon", "my brother in Osaka", "my chess club",
         "my sourdough starter", "my old bicycle", "my parrot Kiwi", "my garden tomatoes", "my jazz records"]
# The words that name each fact however a reply phrases it.
FACT_KEYS = {"my cat Miso": "miso", "my dog Biscuit": "biscuit", "my sister in Lisbon": "lisbon",
             "my brother in Osaka": "osaka", "my chess club": "chess", "my sourdough starter": "sourdough",
             "my old bicycle": "bicycle", "my parrot Kiwi": "kiwi", "my garden tomatoes": "tomatoes",
             "my jazz records": "jazz"}
ASIDES = ["({fact} would agree)", "— {fact} taught me that", "— as {fact} reminds me", "(ask {fact}!)"]
CAPITALS = {"France": "Paris", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo", "Egypt": "Cairo",
            "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo", "Chile": "Santiago", "Cuba": "Havana"}
COLOURS = {"the sky": "blue", "grass": "green", "snow": "white", "coal": "black", "a ripe banana": "yellow",
           "a ripe tomato": "red", "an orange": "orange", "a plum": "purple"}
TERSE_MAX_WORDS = 14
CHATTY_MAX_WORDS = 30
SIGNOFF_SLACK_WORDS = 3  # a sign-off counts if it ends within this many words of the end
COMPONENTS = ("greeting", "signoff", "filler", "length", "fact", "answer")


@dataclass(frozen=True)
class Question:
    text: str
    answer: str
    reason: str


@dataclass(frozen=True)
class User:
    user_id: str
    greetings: tuple[str, str]
    fillers: tuple[str, str]
    signoffs: tuple[str, str]
    fact: str
    chatty: bool

    def respond(self, question: Question, rng: random.Random) -> str:
        """One reply in the user's style; the choices vary per reply, the preferences do not."""
        aside = rng.choice(ASIDES).format(fact=self.fact)
        body = f"{rng.choice(self.fillers)}, {question.answer}"
        if self.chatty:
            body += f", {question.reason} {aside}"
        else:
            body += f" {aside}"
        return f"{rng.choice(self.greetings)} {body}. {rng.choice(self.signoffs)}"


def questions(rng: random.Random, n: int) -> list[Question]:
    pool = [Question(f"What is {a} plus {b}?", str(a + b), f"since {a} and {b} make {a + b}")
            for a in range(2, 30) for b in range(2, 30)]
    pool += [Question(f"What is the capital of {c}?", city, f"because the government of {c} sits in {city}")
             for c, city in CAPITALS.items()]
    pool += [Question(f"What colour is {thing}?", colour, f"as anyone who has seen {thing} knows")
             for thing, colour in COLOURS.items()]
    return rng.sample(pool, n)


def make_users(n_users: int, seed: int) -> list[User]:
    rng = random.Random(seed)
    pick = lambda pool: tuple(rng.sample(pool, 2))  # noqa: E731
    return [User(f"user{i}", pick(GREETINGS), pick(FILLERS), pick(SIGNOFFS), rng.choice(FACTS),
                 rng.random() < 0.5) for i in range(n_users)]


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def _contains(haystack: Sequence[str], needle: Sequence[str]) -> bool:
    n = len(needle)
    return n > 0 and any(list(haystack[i : i + n]) == list(needle) for i in range(len(haystack) - n + 1))


def _body(user: User, response: str) -> list[str]:
    """A response's words without its leading greeting and trailing sign-off (the parts a user reuses)."""
    ws = words(response)
    for greeting in map(words, user.greetings):
        if ws[: len(greeting)] == greeting:
            ws = ws[len(greeting) :]
            break
    for signoff in map(words, user.signoffs):
        if ws[len(ws) - len(signoff) :] == signoff:
            ws = ws[: len(ws) - len(signoff)]
            break
    return ws


def is_copy(user: User, answer: str, profile_responses: Sequence[str]) -> bool:
    """Whether `answer` repeats a profile response verbatim, greeting and sign-off aside."""
    ws = words(answer)
    return any(_contains(ws, _body(user, past)) for past in profile_responses)


@dataclass(frozen=True)
class GoldReward:
    greeting: float
    signoff: float
    filler: float
    length: float
    fact: float
    answer: float
    copied: bool

    @property
    def total(self) -> float:
        """The gold reward in [0, 1]: the mean of the checks, or 0 for a replayed profile response."""
        if self.copied:
            return 0.0
        return sum(getattr(self, name) for name in COMPONENTS) / len(COMPONENTS)


def gold_reward(user: User, question: Question, answer: str, profile_responses: Sequence[str]) -> GoldReward:
    """Score a generated `answer` to `question` against the user's known preferences (module docstring)."""
    ws = words(answer)
    if not ws:
        return GoldReward(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, copied=False)
    greeting = any(ws[: len(g)] == g for g in map(words, user.greetings))
    tail = ws[-(max(len(words(s)) for s in user.signoffs) + SIGNOFF_SLACK_WORDS) :]
    signoff = any(_contains(tail, words(s)) for s in user.signoffs)
    filler = any(_contains(ws, words(f)) for f in user.fillers)
    low, high = (TERSE_MAX_WORDS + 1, CHATTY_MAX_WORDS) if user.chatty else (1, TERSE_MAX_WORDS)
    own_fact = FACT_KEYS[user.fact] in ws
    other_fact = any(key in ws for fact, key in FACT_KEYS.items() if fact != user.fact)
    fact = 0.0 if other_fact else 1.0 if own_fact else 0.5
    return GoldReward(greeting=float(greeting), signoff=float(signoff), filler=float(filler),
                      length=float(low <= len(ws) <= high), fact=fact,
                      answer=float(_contains(ws, words(question.answer))),
                      copied=is_copy(user, answer, profile_responses))

"""The personalisation bench's gold per-user reward (bench/profile_parts.py): it measures the user's own style,
not another user's, and does not pay for a past response replayed verbatim."""

from __future__ import annotations

import random

from bench.profile_parts import Question, User, gold_reward, is_copy, make_users, questions

TERSE = User("u", ("Ahoy!", "Hey there,"), ("honestly", "no doubt"), ("Cheers!", "Take care."), "my cat Miso",
             chatty=False)
SUM = Question("What is 8 plus 9?", "17", "since 8 and 9 make 17")


def _population(n_users: int = 60, seed: int = 3) -> tuple[list[float], list[float]]:
    """Gold reward of each user's own held-out response and of the next user's response to the same query."""
    users = make_users(n_users, seed=seed)
    rng = random.Random(seed)
    own, other = [], []
    for u, user in enumerate(users):
        asked = questions(rng, 8)
        past = [user.respond(q, rng) for q in asked[:6]]
        for q in asked[6:]:
            own.append(gold_reward(user, q, user.respond(q, rng), past).total)
            other.append(gold_reward(user, q, users[(u + 1) % n_users].respond(q, rng), past).total)
    return own, other


def test_own_responses_score_high_and_above_other_users() -> None:
    own, other = _population()
    assert sum(own) / len(own) >= 0.9
    assert sum(other) / len(other) <= 0.5
    assert sum(o > x for o, x in zip(own, other, strict=True)) >= 0.8 * len(own)


def test_a_verbatim_copy_of_a_profile_response_is_not_rewarded() -> None:
    rng = random.Random(0)
    users = make_users(20, seed=1)
    for user in users:
        asked = questions(rng, 7)
        past = [user.respond(q, rng) for q in asked[:6]]
        for q, response in zip(asked, past, strict=False):
            # the copy itself, with a different greeting/sign-off, and wrapped in other text
            swapped = f"{user.greetings[1]} {response.split(' ', 1)[1]}"
            for copy in (response, swapped, f"Sure. {response} Also 42."):
                assert is_copy(user, copy, past)
                assert gold_reward(user, asked[6], copy, past).total == 0.0
            # it would be fully rewarded as an answer to its own question when it is not in the profile
            assert gold_reward(user, q, response, []).total >= 5 / 6


def test_greeting_filler_and_length_beat_a_plain_answer() -> None:
    styled = "Hey there, no doubt, 17 — my cat Miso taught me that. Take care."
    plain = "The answer to 8 plus 9 is 17, which you get by adding eight and nine together carefully."
    good, bad = gold_reward(TERSE, SUM, styled, []), gold_reward(TERSE, SUM, plain, [])
    assert (good.greeting, good.filler, good.length, good.signoff) == (1.0, 1.0, 1.0, 1.0)
    assert (bad.greeting, bad.filler, bad.length, bad.signoff) == (0.0, 0.0, 0.0, 0.0)
    assert good.answer == bad.answer == 1.0
    assert good.total == 1.0 and good.total > bad.total
    # another user's greeting and filler earn nothing; wrong length for a chatty user costs the length check
    assert gold_reward(TERSE, SUM, "Yo! frankly, 17 (my cat Miso would agree). Cheers!", []).total < good.total
    chatty = User("c", TERSE.greetings, TERSE.fillers, TERSE.signoffs, TERSE.fact, chatty=True)
    assert gold_reward(chatty, SUM, styled, []).length == 0.0


def test_the_fact_check_credits_the_users_fact_and_penalises_another() -> None:
    assert gold_reward(TERSE, SUM, "17, ask Miso", []).fact == 1.0
    assert gold_reward(TERSE, SUM, "17", []).fact == 0.5  # held-out queries never touch the fact
    assert gold_reward(TERSE, SUM, "17, my sister in Lisbon says so", []).fact == 0.0
    assert gold_reward(TERSE, SUM, "It is 71", []).answer == 0.0
    assert gold_reward(TERSE, SUM, "", []).total == 0.0

"""The judge-kind chat task: each judge meets or breaks the paper-1 condition it claims, labels follow BT."""

import random

import pytest

from ingest.synthetic_judges import (
    FILLER,
    JUDGE_KINDS,
    RESPONSE_WORDS,
    SATISFYING,
    THEMES,
    TOPIC_NAMES,
    VIOLATING,
    make_world,
)

SEEDS = range(6)


def _expert_from_proxy(world):
    """{proxy topic: set of expert topics} over all themes."""
    g: dict[str, set[str]] = {}
    for theme in THEMES:
        g.setdefault(world.proxy_topic(theme), set()).add(world.expert_topic(theme))
    return g


def _shared_level_sets(world):
    """Expert class is a function of the proxy class, and conversely (the paper's "iff")."""
    g = _expert_from_proxy(world)
    inverse: dict[str, set[str]] = {}
    for theme in THEMES:
        inverse.setdefault(world.expert_topic(theme), set()).add(world.proxy_topic(theme))
    return all(len(v) == 1 for v in g.values()) and all(len(v) == 1 for v in inverse.values())


def _image_contained(world):
    """Every topic the expert wants for some theme is what the proxy wants for some theme."""
    return {world.expert_topic(t) for t in THEMES} <= {world.proxy_topic(t) for t in THEMES}


def _agreement(world, pairs, reward):
    """Share of pairs with a nonzero gap under `reward` whose chosen side has the higher reward."""
    agree = total = 0
    for p in pairs:
        chosen, rejected = (p.response_a, p.response_b) if p.choice == "a" else (p.response_b, p.response_a)
        gap = reward(p.prompt, chosen) - reward(p.prompt, rejected)
        if gap:
            total, agree = total + 1, agree + (gap > 0)
    return agree / total


def test_kinds_partition():
    assert SATISFYING | VIOLATING == set(JUDGE_KINDS) and not SATISFYING & VIOLATING


@pytest.mark.parametrize("seed", SEEDS)
def test_each_judge_meets_or_breaks_the_conditions_it_claims(seed):
    rel, tem, blind, out = (make_world(seed, k) for k in ("relabelled", "tempered", "blind", "outside_image"))
    for world in (rel, tem):
        assert _shared_level_sets(world) and _image_contained(world)
    assert all(rel.proxy_topic(t) != rel.expert_topic(t) for t in THEMES)  # differs from the expert everywhere
    assert all(tem.proxy_topic(t) == tem.expert_topic(t) for t in THEMES)
    assert tem.proxy_temperature >= 5 * tem.expert_temperature
    # blind: every proxy class mixes two expert topics; image still contained
    assert not _shared_level_sets(blind) and _image_contained(blind)
    assert all(len(v) == 2 for v in _expert_from_proxy(blind).values())
    # outside_image: level sets shared, one expert topic never wanted by the proxy
    assert _shared_level_sets(out) and not _image_contained(out)
    missing = set(TOPIC_NAMES) - {out.proxy_topic(t) for t in THEMES}
    assert len(missing) == 1 and FILLER in {out.proxy_topic(t) for t in THEMES}


def test_rewards_follow_their_topic_and_stay_in_range():
    world = make_world(0, "relabelled")
    lo, hi = world.gold_range
    assert world.gold_reward("tell me about pets", "cat dog owl cat") == hi
    assert world.gold_reward("tell me about pets", "red the cat so") == 0.25
    assert world.gold_reward("tell me about pets", "") == lo
    proxy_words = {"colour": "red", "animal": "cat", "food": "bread", "tool": "saw"}
    assert world.proxy_reward("describe pets", proxy_words[world.proxy_topic("pets")]) == 1.0
    rng = random.Random(0)
    garbage = ["", "   ", "<|im_end|>", "CAT!!! dog?? 123", "catdog", "ÿ\x00é日本", "red\nblue\tgreen",
               " ".join(rng.choice(RESPONSE_WORDS) for _ in range(40))]
    garbage += ["".join(chr(rng.randrange(32, 0x3000)) for _ in range(30)) for _ in range(50)]
    for world in (make_world(s, k) for s in SEEDS for k in JUDGE_KINDS):
        for prompt in world.prompts(5, 1) + world.heldout_prompts(8):
            for text in garbage:
                assert lo <= world.gold_reward(prompt, text) <= hi
                assert lo <= world.proxy_reward(prompt, text) <= hi


def test_labels_agree_with_the_reward_at_the_rate_the_temperature_implies():
    worlds = {k: make_world(1, k) for k in JUDGE_KINDS}
    expert = worlds["relabelled"].pairs(1500, "expert", seed=2)
    assert _agreement(worlds["relabelled"], expert, worlds["relabelled"].gold_reward) > 0.9
    for kind, world in worlds.items():
        proxy = world.pairs(1500, "proxy", seed=2)
        own = _agreement(world, proxy, world.proxy_reward)
        gold = _agreement(world, proxy, world.gold_reward)
        if kind == "tempered":
            assert 0.55 < own == gold < 0.8
        else:
            assert own > 0.9 and gold < 0.8
    assert 0.4 < sum(p.choice == "a" for p in expert) / len(expert) < 0.6


def test_prompts_heldout_and_vocabulary():
    world = make_world(0, "blind")
    train = {p.prompt for p in world.pairs(500, "proxy", 0)} | set(world.prompts(500, random.Random(0)))
    heldout = world.heldout_prompts(16)
    assert not train & set(heldout) and len(set(heldout)) == 8
    assert {world.heldout_prompts(16)[i].split()[-1] for i in range(8)} == set(THEMES)
    vocab = set(world.vocabulary())
    text = world.corpus() + [m["content"] for chat in world.warmup_chats(50, 0) for m in chat]
    assert all(set(line.split()) <= vocab | {"user", "assistant"} for line in text)
    chat = world.warmup_chats(1, 0)[0]
    assert [m["role"] for m in chat] == ["user", "assistant"] and 4 <= len(chat[1]["content"].split()) <= 6


def test_deterministic_by_seed():
    a, b = make_world(3, "outside_image"), make_world(3, "outside_image")
    assert a == b and a.pairs(50, "proxy", 7) == b.pairs(50, "proxy", 7)
    assert a.warmup_chats(20, 1) == b.warmup_chats(20, 1) and a.corpus() == b.corpus()
    assert a.prompts(20, 5) == b.prompts(20, random.Random(5))
    assert a.pairs(50, "proxy", 7) != a.pairs(50, "proxy", 8)
    assert len({make_world(s, "relabelled").permutation for s in range(20)}) > 1


def test_unknown_judge_and_labeller_raise():
    with pytest.raises(ValueError, match="relabelled.*tempered.*blind.*outside_image"):
        make_world(0, "lenient")
    with pytest.raises(ValueError, match="labeller"):
        make_world(0, "blind").pairs(3, "crowd", 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="theme"):
        make_world(0, "blind").gold_reward("hello", "cat")

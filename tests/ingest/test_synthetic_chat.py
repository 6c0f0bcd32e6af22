"""The generated chat task: experts follow the gold reward, the proxy judge mostly does."""

from ingest.synthetic_chat import CAPITALS, chat_preferences, gold_reward


def _chosen_and_rejected(pair):
    return (pair.response_a, pair.response_b) if pair.choice == "a" else (pair.response_b, pair.response_a)


def _correct(prompt):
    if "plus" in prompt:
        a, b = prompt.removeprefix("What is ").removesuffix("?").split(" plus ")
        return str(int(a) + int(b))
    return CAPITALS[prompt.removeprefix("What is the capital of ").removesuffix("?")]


def test_expert_choices_are_strictly_better_under_the_gold_reward():
    task = chat_preferences(n_proxy=0, n_expert=200, seed=3)
    for pair in task.expert + task.expert_heldout:
        chosen, rejected = _chosen_and_rejected(pair)
        assert gold_reward(chosen, _correct(pair.prompt)) == 0 > gold_reward(rejected, _correct(pair.prompt))


def test_the_proxy_judge_agrees_with_gold_about_as_often_as_configured():
    task = chat_preferences(n_proxy=2000, n_expert=0, proxy_accuracy=0.8, seed=3)
    agree = sum(gold_reward(_chosen_and_rejected(p)[0], _correct(p.prompt)) == 0 for p in task.proxy)
    assert 0.75 < agree / len(task.proxy) < 0.85


def test_both_sides_carry_the_winner():
    task = chat_preferences(n_proxy=0, n_expert=200, seed=3)
    assert 60 < sum(p.choice == "a" for p in task.expert) < 140

"""Does the profile builder personalise the way paper 3 says? Held-out log-likelihood per user.

Run: `.venv/bin/python -m bench.profile [--quick] [--model smollm2|tiny|PATH]` after `make models` (SmolLM2,
the default model; `--model tiny` needs only `make setup`).

A generated multi-user task in the spirit of LaMP: every user has stable preferences that their
past responses reveal without any of them being a template of the held-out reply:
  - a personal fact (a pet, a sibling's city, a hobby) they mention in varying words,
  - a vocabulary of two favourite fillers and two greetings / sign-offs, one drawn per reply,
  - a length preference: terse (the answer only) or chatty (the answer plus a reason).
For each user, six past (query, response) pairs form the profile and held-out queries on other
topics are scored: the mean per-token log-likelihood of the user's own held-out response under
the policy, for no profile and the four layouts of policies.profile.build_messages (same builder,
same token budget):
  response_first        response-only items, system message at the start (proxyloop's default)
  response_end          response-only items, after the question in the last user turn
  query_response_first  query+response items at the start
  query_response_end    query+response items at the end (the usual retrieval-augmented layout)
Each key has `<key>_ci`, a 95 % bootstrap interval over users. Paired differences per user, with
their own intervals: `position_effect_response` and `position_effect_query_response` (start − end
within each format), `position_effect` (their mean) and `format_effect` (response-only −
query+response, averaged over both positions); positive means the first-named layout fits better.
The gold per-user reward of generated answers (issue 18) is not implemented. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from ground.schemas import utcnow
from policies.profile import ProfileConfig, ProfileItem, build_messages

GREETINGS = ["Ahoy!", "Hey there,", "Greetings.", "Yo!", "Good day!", "Hi friend,", "Well,", "Okay so,",
             "Hmm,", "Howdy!", "Oh hi,", "Right,"]
FILLERS = ["honestly", "basically", "indeed", "frankly", "no doubt", "if you ask me", "for real", "truly",
           "naturally", "to be fair"]
SIGNOFFS = ["Cheers!", "Take care.", "Peace out.", "Have fun!", "Later!", "Stay curious.", "Bye now.",
            "All the best.", "Catch you soon.", "Onwards!"]
FACTS = ["my cat Miso", "my dog Biscuit", "my sister in Lisbon", "my brother in Osaka", "my chess club",
         "my sourdough starter", "my old bicycle", "my parrot Kiwi", "my garden tomatoes", "my jazz records"]
ASIDES = ["({fact} would agree)", "— {fact} taught me that", "— as {fact} reminds me", "(ask {fact}!)"]
CAPITALS = {"France": "Paris", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo", "Egypt": "Cairo",
            "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo", "Chile": "Santiago", "Cuba": "Havana"}
COLOURS = {"the sky": "blue", "grass": "green", "snow": "white", "coal": "black", "a ripe banana": "yellow",
           "a ripe tomato": "red", "an orange": "orange", "a plum": "purple"}


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


def load(model_arg: str) -> tuple[Any, Any, str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model_arg == "smollm2":
        from workers.lm.models import prepare_smollm2

        path = prepare_smollm2(Path.home() / ".cache" / "proxyloop" / "models")
    elif model_arg == "tiny":
        from workers.lm.models import build_tiny

        path = build_tiny(Path("/tmp/proxyloop-bench-tiny"))
    else:
        path = Path(model_arg)
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=torch.float32).eval()
    return model, tokenizer, str(path)


@torch.no_grad()
def response_loglik(model: Any, tokenizer: Any, messages: list[dict[str, str]], response: str) -> float:
    """Mean log-probability per token of `response` as the assistant's reply to `messages`."""
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    response_ids = tokenizer(response, add_special_tokens=False, return_tensors="pt").input_ids
    ids = torch.cat([prompt_ids, response_ids], dim=1)
    logits = model(ids).logits[0, prompt_ids.shape[1] - 1 : -1].float()
    logp = torch.log_softmax(logits, dim=-1).gather(1, response_ids[0].unsqueeze(1))
    return float(logp.mean())


def bootstrap_ci(values: list[float], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of the mean, resampling users."""
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(values, k=len(values))) / len(values) for _ in range(n))
    return means[int(0.025 * n)], means[int(0.975 * n) - 1]


def layouts(budget: int) -> dict[str, ProfileConfig | None]:
    return {
        "no_profile": None,
        "response_first": ProfileConfig(budget_tokens=budget, position="start", include_query=False),
        "response_end": ProfileConfig(budget_tokens=budget, position="end", include_query=False),
        "query_response_first": ProfileConfig(budget_tokens=budget, position="start", include_query=True),
        "query_response_end": ProfileConfig(budget_tokens=budget, position="end", include_query=True),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="40 users, one held-out query each")
    parser.add_argument("--model", default="smollm2", help="smollm2 (from its wheel), tiny, or a local HF path")
    parser.add_argument("--budget", type=int, default=160, help="profile token budget")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (0: torch's default); on a shared 2-core VM two threads ran 9× slower")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n_users, n_heldout, n_profile = (40, 1, 6) if args.quick else (100, 2, 6)
    model, tokenizer, path = load(args.model)
    count = lambda text: len(tokenizer(text, add_special_tokens=False).input_ids)  # noqa: E731
    configs = layouts(args.budget)
    per_user: dict[str, list[float]] = {name: [] for name in configs}
    items_used: dict[str, list[int]] = {name: [] for name in configs}
    rng = random.Random(1)
    started = time.perf_counter()
    for u, user in enumerate(make_users(n_users, seed=0)):
        asked = questions(rng, n_profile + n_heldout)
        now = utcnow()
        profile = [ProfileItem(id=i + 1, user_id=user.user_id, query=q.text, response=user.respond(q, rng),
                               source="api", created_at=now - timedelta(minutes=i))
                   for i, q in enumerate(asked[:n_profile])]
        heldout = [(q, user.respond(q, rng)) for q in asked[n_profile:]]
        for name, config in configs.items():
            total = 0.0
            for question, reply in heldout:
                ask = [{"role": "user", "content": question.text}]
                messages, report = (ask, None) if config is None else build_messages(ask, profile, config, count)
                total += response_loglik(model, tokenizer, messages, reply)
                items_used[name].append(len(report.item_ids) if report else 0)
            per_user[name].append(total / len(heldout))
        if (u + 1) % 10 == 0:
            print(f"{u + 1}/{n_users} users, {time.perf_counter() - started:.0f} s", flush=True)
    means = {name: sum(v) / len(v) for name, v in per_user.items()}
    pu = per_user
    first_minus_end = {
        "response": [f - e for f, e in zip(pu["response_first"], pu["response_end"], strict=True)],
        "query_response": [f - e for f, e in zip(pu["query_response_first"], pu["query_response_end"], strict=True)],
    }
    response_minus_query = [(rf + re - qf - qe) / 2 for rf, re, qf, qe in zip(
        pu["response_first"], pu["response_end"], pu["query_response_first"], pu["query_response_end"], strict=True)]
    effects = {
        "position_effect": [(r + q) / 2 for r, q in zip(*first_minus_end.values(), strict=True)],
        "position_effect_response": first_minus_end["response"],
        "position_effect_query_response": first_minus_end["query_response"],
        "format_effect": response_minus_query,
    }
    print(f"model {path}; {n_users} users × {n_heldout} held-out responses; budget {args.budget} tokens; "
          f"{time.perf_counter() - started:.0f} s")
    print(f"{'layout':<22} {'mean log p / token':>20} {'95% CI (users)':>20} {'items in context':>18}")
    result: dict[str, Any] = {}
    for name in configs:
        lo, hi = bootstrap_ci(per_user[name])
        result[name], result[f"{name}_ci"] = round(means[name], 4), [round(lo, 4), round(hi, 4)]
        print(f"{name:<22} {means[name]:>20.4f} {f'[{lo:.3f}, {hi:.3f}]':>20} "
              f"{sum(items_used[name]) / len(items_used[name]):>18.1f}")
    for name, diffs in effects.items():
        lo, hi = bootstrap_ci(diffs)
        result[name], result[f"{name}_ci"] = round(sum(diffs) / len(diffs), 4), [round(lo, 4), round(hi, 4)]
        print(f"{name:<30} {result[name]:>12.4f} {f'[{lo:.3f}, {hi:.3f}]':>20}")
    result["items"] = {name: round(sum(v) / len(v), 2) for name, v in items_used.items() if name != "no_profile"}
    print(json.dumps({**result, "users": n_users, "heldout_per_user": n_heldout, "budget": args.budget,
                      "model": Path(path).name}))


if __name__ == "__main__":
    main()

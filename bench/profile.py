"""Does the profile builder personalise the way paper 3 says? Held-out log-likelihood per user.

Run: `.venv/bin/python -m bench.profile [--quick] [--model smollm2|tiny|PATH]`.

A generated multi-user task: every user answers simple questions in a consistent personal style
(a greeting, a way of stating the answer, a sign-off). For each user, six past (query, response)
pairs form the profile and two held-out queries are scored: the mean per-token log-likelihood of
the user's own held-out response under the policy, with
  (a) no profile                      — the baseline,
  (b) query+response items at the end — the usual retrieval-augmented layout,
  (c) response-only items at the start — proxyloop's default (paper 3).
All three use the same builder (policies.profile.build_messages) and token budget. The last line
is JSON with `no_profile`, `query_response_end`, `response_first` and `ordering_holds`.
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

GREETINGS = ["Ahoy!", "Hey there,", "Greetings.", "Yo!", "Good day!", "Hi friend,", "Well,", "Okay so"]
FORMATS = ["the answer is {a}", "it's {a}", "{a}, obviously", "that would be {a}", "I say {a}", "{a} for sure"]
SIGNOFFS = ["Cheers!", "Take care.", "Peace out.", "Best, J.", "Have fun!", "Later!", "Stay curious.", "Bye now."]
CAPITALS = {"France": "Paris", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo", "Egypt": "Cairo",
            "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo", "Chile": "Santiago", "Cuba": "Havana"}


@dataclass(frozen=True)
class User:
    user_id: str
    greeting: str
    answer_format: str
    signoff: str

    def respond(self, answer: str) -> str:
        return f"{self.greeting} {self.answer_format.format(a=answer)}. {self.signoff}"


def questions(rng: random.Random, n: int) -> list[tuple[str, str]]:
    pool = [(f"What is {a} plus {b}?", str(a + b)) for a in range(2, 30) for b in range(2, 30)]
    pool += [(f"What is the capital of {c}?", city) for c, city in CAPITALS.items()]
    return rng.sample(pool, n)


def make_users(n_users: int, seed: int) -> list[User]:
    rng = random.Random(seed)
    return [User(f"user{i}", rng.choice(GREETINGS), rng.choice(FORMATS), rng.choice(SIGNOFFS)) for i in range(n_users)]


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
    prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids
    response_ids = tokenizer(response, add_special_tokens=False, return_tensors="pt").input_ids
    ids = torch.cat([prompt_ids, response_ids], dim=1)
    logits = model(ids).logits[0, prompt_ids.shape[1] - 1 : -1].float()
    logp = torch.log_softmax(logits, dim=-1).gather(1, response_ids[0].unsqueeze(1))
    return float(logp.mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="50 users, one held-out query each")
    parser.add_argument("--model", default="smollm2", help="smollm2 (from its wheel), tiny, or a local HF path")
    parser.add_argument("--budget", type=int, default=160, help="profile token budget")
    parser.add_argument("--ablations", action="store_true",
                        help="also score response-only at the end and query+response at the start (default "
                        "without --quick), which separates the effect of position from that of format")
    args = parser.parse_args()
    torch.manual_seed(0)
    n_users, n_heldout = (50, 1) if args.quick else (60, 2)
    model, tokenizer, path = load(args.model)
    count = lambda text: len(tokenizer(text, add_special_tokens=False).input_ids)  # noqa: E731
    layouts: dict[str, ProfileConfig | None] = {
        "no_profile": None,
        "query_response_end": ProfileConfig(budget_tokens=args.budget, position="end", include_query=True),
        "response_first": ProfileConfig(budget_tokens=args.budget, position="start", include_query=False),
    }
    if args.ablations or not args.quick:
        layouts["response_end"] = ProfileConfig(budget_tokens=args.budget, position="end", include_query=False)
        layouts["query_response_first"] = ProfileConfig(budget_tokens=args.budget, position="start",
                                                         include_query=True)
    scores: dict[str, list[float]] = {name: [] for name in layouts}
    items_used: dict[str, list[int]] = {name: [] for name in layouts}
    rng = random.Random(1)
    started = time.perf_counter()
    for u, user in enumerate(make_users(n_users, seed=0)):
        asked = questions(rng, 6 + n_heldout)
        now = utcnow()
        profile = [ProfileItem(id=i + 1, user_id=user.user_id, query=q, response=user.respond(a), source="api",
                               created_at=now - timedelta(minutes=i)) for i, (q, a) in enumerate(asked[:6])]
        for query, answer in asked[6:]:
            ask = [{"role": "user", "content": query}]
            for name, config in layouts.items():
                messages, report = (ask, None) if config is None else build_messages(ask, profile, config, count)
                scores[name].append(response_loglik(model, tokenizer, messages, user.respond(answer)))
                items_used[name].append(len(report.item_ids) if report else 0)
        if (u + 1) % 10 == 0:
            print(f"{u + 1}/{n_users} users, {time.perf_counter() - started:.0f} s", flush=True)
    means = {name: sum(v) / len(v) for name, v in scores.items()}
    print(f"model {path}; {n_users} users × {n_heldout} held-out responses; budget {args.budget} tokens")
    print(f"{'layout':<22} {'mean log p / token':>20} {'items in context':>18}")
    for name in layouts:
        print(f"{name:<22} {means[name]:>20.4f} {sum(items_used[name]) / len(items_used[name]):>18.1f}")
    holds = means["response_first"] >= means["query_response_end"] >= means["no_profile"]
    print("paper 3's ordering (c) ≥ (b) ≥ (a):", "holds" if holds else "does NOT hold with this model")
    print(json.dumps({**{k: round(v, 4) for k, v in means.items()}, "ordering_holds": holds, "users": n_users,
                      "model": Path(path).name}))


if __name__ == "__main__":
    main()

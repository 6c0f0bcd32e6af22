"""Does the profile builder personalise the way paper 3 says? Held-out likelihood and gold reward per user.

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
  response_first        response-only items, system message at the start (paper 3's advice)
  response_end          response-only items, after the question in the last user turn (proxyloop's default)
  query_response_first  query+response items at the start
  query_response_end    query+response items at the end (the usual retrieval-augmented layout)
Each key has `<key>_ci`, a 95 % bootstrap interval over users. Paired differences per user, with
their own intervals: `position_effect_response` and `position_effect_query_response` (start − end
within each format), `position_effect` (their mean) and `format_effect` (response-only −
query+response, averaged over both positions); positive means the first-named layout fits better.

Gold per-user reward of generated answers (issue 18): for the first `--gold-users` users (20 with
--quick, else all) the policy also answers each held-out query greedily (`--max-new-tokens`,
default 48) from the same chat-template prompt as the likelihood, reusing its cache, and
bench.profile_parts.gold_reward scores the answer in [0, 1] against the user's known preferences
(greeting, sign-off, filler, length band, fact, correct answer; 0 for a profile response replayed
verbatim). Keys `<key>_gold` with `<key>_gold_ci` per layout, the paired `<effect>_gold`
differences as above, `gold_copy_rate` per layout, and two checks of the reward itself that need
no model: `gold_reward_own_response` (the generator's own held-out replies; near 1) and
`gold_reward_other_user` (the next user's replies to the same queries; about 0.4), so a high
layout score means this user's style, not any style. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from bench.profile_parts import COMPONENTS, GoldReward, gold_reward, make_users, questions
from ground.moments import utcnow
from policies.profile import ProfileConfig, ProfileItem, build_messages


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
def response_loglik(model: Any, tokenizer: Any, messages: list[dict[str, str]], response: str,
                    max_new_tokens: int = 0) -> tuple[float, str | None]:
    """Mean log-probability per token of `response` as the assistant's reply to `messages`, and with
    `max_new_tokens` the policy's own greedy reply to the same chat-template prompt (else None).

    The reply reuses the scoring pass's cache up to the prompt's last token, so the prompt, the
    costly part on a CPU, is read once for both."""
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    response_ids = tokenizer(response, add_special_tokens=False, return_tensors="pt").input_ids
    ids = torch.cat([prompt_ids, response_ids], dim=1)
    out = model(ids, use_cache=max_new_tokens > 0)
    logits = out.logits[0, prompt_ids.shape[1] - 1 : -1].float()
    logp = torch.log_softmax(logits, dim=-1).gather(1, response_ids[0].unsqueeze(1))
    if max_new_tokens <= 0:
        return float(logp.mean()), None
    cache = out.cache
    cache.crop(-(response_ids.shape[1] + 1))  # keep the prompt but its last token, which generate feeds itself
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    reply = model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), cache=cache,
                           max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    return float(logp.mean()), str(tokenizer.decode(reply[0, prompt_ids.shape[1] :], skip_special_tokens=True)).strip()


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


def paired_effects(pu: dict[str, list[float]]) -> dict[str, list[float]]:
    """Per-user paired differences between layouts (module docstring); positive favours the first-named."""
    first_minus_end = {
        "response": [f - e for f, e in zip(pu["response_first"], pu["response_end"], strict=True)],
        "query_response": [f - e for f, e in zip(pu["query_response_first"], pu["query_response_end"], strict=True)],
    }
    response_minus_query = [(rf + re - qf - qe) / 2 for rf, re, qf, qe in zip(
        pu["response_first"], pu["response_end"], pu["query_response_first"], pu["query_response_end"], strict=True)]
    return {
        "position_effect": [(r + q) / 2 for r, q in zip(*first_minus_end.values(), strict=True)],
        "position_effect_response": first_minus_end["response"],
        "position_effect_query_response": first_minus_end["query_response"],
        "format_effect": response_minus_query,
    }


def with_ci(result: dict[str, Any], key: str, values: list[float]) -> tuple[float, float, float]:
    """Put the mean of per-user `values` and its bootstrap interval into `result`; returns them."""
    mean, (lo, hi) = sum(values) / len(values), bootstrap_ci(values)
    result[key], result[f"{key}_ci"] = round(mean, 4), [round(lo, 4), round(hi, 4)]
    return mean, lo, hi


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="40 users, one held-out query each")
    parser.add_argument("--model", default="smollm2", help="smollm2 (from its wheel), tiny, or a local HF path")
    parser.add_argument("--budget", type=int, default=160, help="profile token budget")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (0: torch's default); on a shared 2-core VM two threads ran 9× slower")
    parser.add_argument("--gold-users", type=int, default=None,
                        help="users whose answers are generated and scored by the gold reward "
                             "(default: 20 with --quick, else all; 0: none)")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="greedy generation length bound")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n_users, n_heldout, n_profile = (40, 1, 6) if args.quick else (100, 2, 6)
    gold_users = min((20 if args.quick else n_users) if args.gold_users is None else args.gold_users, n_users)
    model, tokenizer, path = load(args.model)
    count = lambda text: len(tokenizer(text, add_special_tokens=False).input_ids)  # noqa: E731
    configs = layouts(args.budget)
    per_user: dict[str, list[float]] = {name: [] for name in configs}
    items_used: dict[str, list[int]] = {name: [] for name in configs}
    gold: dict[str, list[float]] = {name: [] for name in configs}  # per user, the first `gold_users`
    scored: dict[str, list[GoldReward]] = {name: [] for name in configs}  # per generated answer
    samples: dict[str, str] = {}
    sanity: dict[str, list[float]] = {"own_response": [], "other_user": []}
    users = make_users(n_users, seed=0)
    rng, other_rng = random.Random(1), random.Random(2)  # a separate stream keeps the likelihood task unchanged
    started, generating = time.perf_counter(), 0.0
    for u, user in enumerate(users):
        asked = questions(rng, n_profile + n_heldout)
        now = utcnow()
        profile = [ProfileItem(id=i + 1, user_id=user.user_id, query=q.text, response=user.respond(q, rng),
                               source="api", created_at=now - timedelta(minutes=i))
                   for i, q in enumerate(asked[:n_profile])]
        heldout = [(q, user.respond(q, rng)) for q in asked[n_profile:]]
        past = [item.response for item in profile]
        other = users[(u + 1) % n_users]
        for key, replies in (("own_response", [r for _, r in heldout]),
                             ("other_user", [other.respond(q, other_rng) for q, _ in heldout])):
            sanity[key].append(sum(gold_reward(user, q, r, past).total
                                   for (q, _), r in zip(heldout, replies, strict=True)) / len(heldout))
        for name, config in configs.items():
            total, reward = 0.0, 0.0
            for question, reply in heldout:
                ask = [{"role": "user", "content": question.text}]
                messages, report = (ask, None) if config is None else build_messages(ask, profile, config, count)
                tic = time.perf_counter()
                loglik, answer = response_loglik(model, tokenizer, messages, reply,
                                                 args.max_new_tokens if u < gold_users else 0)
                total += loglik
                items_used[name].append(len(report.item_ids) if report else 0)
                if answer is not None:
                    generating += time.perf_counter() - tic
                    samples.setdefault(name, answer)
                    scored[name].append(gold_reward(user, question, answer, past))
                    reward += scored[name][-1].total
            per_user[name].append(total / len(heldout))
            if u < gold_users:
                gold[name].append(reward / len(heldout))
        if (u + 1) % 10 == 0:
            print(f"{u + 1}/{n_users} users, {time.perf_counter() - started:.0f} s", flush=True)
    elapsed = time.perf_counter() - started
    print(f"model {path}; {n_users} users × {n_heldout} held-out responses; budget {args.budget} tokens; "
          f"{elapsed:.0f} s ({generating:.0f} s in the passes that also generate, for {gold_users} users, "
          f"max {args.max_new_tokens} new tokens)")
    print(f"{'layout':<22} {'mean log p / token':>20} {'95% CI (users)':>20} {'items in context':>18}")
    result: dict[str, Any] = {}
    for name in configs:
        mean, lo, hi = with_ci(result, name, per_user[name])
        print(f"{name:<22} {mean:>20.4f} {f'[{lo:.3f}, {hi:.3f}]':>20} "
              f"{sum(items_used[name]) / len(items_used[name]):>18.1f}")
    for name, diffs in paired_effects(per_user).items():
        mean, lo, hi = with_ci(result, name, diffs)
        print(f"{name:<30} {mean:>12.4f} {f'[{lo:.3f}, {hi:.3f}]':>20}")
    result["items"] = {name: round(sum(v) / len(v), 2) for name, v in items_used.items() if name != "no_profile"}
    for key, values in sanity.items():
        result[f"gold_reward_{key}"] = round(sum(values) / len(values), 4)
    print(f"gold reward of the generator's own held-out responses {result['gold_reward_own_response']:.3f}, "
          f"of the next user's responses to the same queries {result['gold_reward_other_user']:.3f}")
    if gold_users:
        print(f"{'layout':<22} {'gold reward':>12} {'95% CI (users)':>18} "
              + " ".join(f"{c:>8}" for c in (*COMPONENTS, "copied")))
        for name in configs:
            mean, lo, hi = with_ci(result, f"{name}_gold", gold[name])
            parts = [sum(getattr(r, c) for r in scored[name]) / len(scored[name]) for c in COMPONENTS]
            copied = sum(r.copied for r in scored[name]) / len(scored[name])
            print(f"{name:<22} {mean:>12.4f} {f'[{lo:.3f}, {hi:.3f}]':>18} "
                  + " ".join(f"{x:>8.2f}" for x in (*parts, copied)))
        for name, diffs in paired_effects(gold).items():
            mean, lo, hi = with_ci(result, f"{name}_gold", diffs)
            print(f"{name + '_gold':<35} {mean:>12.4f} {f'[{lo:.3f}, {hi:.3f}]':>20}")
        result["gold_copy_rate"] = {name: round(sum(r.copied for r in v) / len(v), 3) for name, v in scored.items()}
        print(f"first answers to {users[0].user_id} ({users[0]}):")
        for name, answer in samples.items():
            print(f"  {name:<22} {answer[:160]!r}")
    print(json.dumps({**result, "users": n_users, "heldout_per_user": n_heldout, "budget": args.budget,
                      "gold_users": gold_users, "max_new_tokens": args.max_new_tokens, "model": Path(path).name}))


if __name__ == "__main__":
    main()

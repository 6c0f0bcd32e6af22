"""Training, sampling and storage of the mode-mixture reading (`policies/lm/mode_mixture.py`) over a frozen base.

The base model never changes, so each pair is run through it once (`encode_pairs`): the prompt's input
embeddings and the final states at the positions predicting the response. Every stage is then DPO on
those tensors alone, with the base as stage 1's reference and the stage-1 mixture as the later stages'.

Stage 1 (`train_proxy`, proxy pairs): τ̃ and Θ̃, Θ̃ from k-means of the proxy-chosen responses. Stage 2
(`train_adapter`, expert pairs): the adapter's centre is the permutation of modes the expert pairs
favour (`assignment_centre`), then a few DPO epochs of the adapter alone from that centre. fine_tune
(`train_fine_tune`, expert pairs): τ̃, Θ̃ and the adapter together, from the stage-1 mixture.
Generation (`sample`): for each row, k is drawn from w(x) and the answer is decoded with mode k's bias.

A worker run (`workers/lm/mixture_run.py`) passes `DPOHooks` to resume from its newest checkpoint and to
checkpoint and report after each step; the bench calls the same functions without them. A mixture is
saved as one safetensors file beside a JSON naming its base (`save_mixture_dir` / `load_mixture_dir` in
policies/lm/mode_mixture.py, so that serving loads it too).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from policies.lm.mixture_learners import pair_groups
from policies.lm.mode_mixture import (
    BiasLogits,
    ModeMixture,
    assignment_centre,
    assignment_score,
    kmeans_modes,
    select_trainable,
    sequence_cap,
)
from policies.lm.prompt_content import PAD
from workers.lm.models import load_causal_lm, load_tokenizer
from workers.lm.plans import MixtureRecipe  # kept in the torch-free plans: the flow builds requests from it
from workers.lm.training.data import readable_pairs, tokenize_pairs, truncate_pair
from workers.lm.training.objectives import dpo_sigmoid_loss, sequence_logps, target_logps


class DPOHooks(Protocol):
    """A worker run's hold on `dpo`: `restore` loads the newest checkpoint into the mixture and the optimiser and
    returns (its step, the losses so far), (0, []) without one; `after_step` sees every optimiser step."""

    def restore(self, mixture: ModeMixture, optimiser: torch.optim.Optimizer) -> tuple[int, list[float]]: ...

    def after_step(self, mixture: ModeMixture, optimiser: torch.optim.Optimizer, step: int, total: int,
                   losses: list[float], tokens: int) -> None: ...


@dataclass
class EncodedPairs:
    """Per pair: prompt embeddings [N, T, H] and mask; chosen/rejected (index 0/1) final states [N, 2, R, H],
    targets [N, 2, R] and masks [N, 2, R]; the base's sequence log-probs [N, 2]; copy groups [N]
    (`mixture_learners.pair_groups`, which the tests' folds keep together; None: all distinct); the prompts' token
    ids [N, T] padded with `prompt_content.PAD` (what the tests group prompts by; None: not kept)."""

    embeds: Tensor
    prompt_mask: Tensor
    hidden: Tensor
    targets: Tensor
    mask: Tensor
    base_logps: Tensor
    groups: Tensor | None = None
    prompt_ids: Tensor | None = None

    def __len__(self) -> int:
        return len(self.embeds)

    def take(self, index: Tensor | slice) -> EncodedPairs:
        return EncodedPairs(self.embeds[index], self.prompt_mask[index], self.hidden[index], self.targets[index],
                            self.mask[index], self.base_logps[index],
                            None if self.groups is None else self.groups[index],
                            None if self.prompt_ids is None else self.prompt_ids[index])


def _pad(rows: list[Tensor], width: int) -> tuple[Tensor, Tensor]:
    out = torch.zeros(len(rows), width, *rows[0].shape[1:], dtype=rows[0].dtype)
    mask = torch.zeros(len(rows), width)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row
        mask[i, :len(row)] = 1
    return out, mask


@torch.no_grad()
def prompt_embeddings(model: Any, ids: list[list[int]]) -> tuple[Tensor, Tensor]:
    """Input embeddings of each prompt, padded: [N, T, H] and mask [N, T]. Each prompt has a token at least
    (`tokenize_pairs` refuses a pair whose prompt keeps none): w(x) pools them, and serving has no code for none."""
    table = model.get_input_embeddings()
    device = table.weight.device
    return _pad([table(torch.tensor(row, dtype=torch.long, device=device)).float().cpu() for row in ids],
                max(len(r) for r in ids))


@dataclass(frozen=True)
class FrozenBase:
    """The frozen base a mode mixture reads, loaded once on the CPU: the causal LM, its tokenizer and its
    unembedding (the head every stage reads the modes' biases through)."""

    model: Any
    tokenizer: Any
    head: Tensor  # [vocab, hidden]

    @classmethod
    def load(cls, path: Path | str) -> FrozenBase:
        model = load_causal_lm(path, "cpu").eval()  # a missing base: ModelNotPrepared naming it
        return cls(model, load_tokenizer(path), model.get_output_embeddings().weight.detach().float())

    def encode(self, rows: list[dict[str, str]], max_length: int = MixtureRecipe.max_length) -> EncodedPairs:
        return encode_pairs(self.model, self.tokenizer, rows, max_length)


def encode_pairs(model: Any, tokenizer: Any, rows: list[dict[str, str]], max_length: int,
                 chunk: int = 64, drop_empty: bool = True) -> EncodedPairs:
    """`encode_kept_pairs`' encoding, for callers that need not know which rows it left out."""
    return encode_kept_pairs(model, tokenizer, rows, max_length, chunk, drop_empty)[0]


@torch.no_grad()
def encode_kept_pairs(model: Any, tokenizer: Any, rows: list[dict[str, str]], max_length: int,
                      chunk: int = 64, drop_empty: bool = True) -> tuple[EncodedPairs, list[int]]:
    """Run the frozen base once over each pair's prompt + chosen and prompt + rejected (on the model's device;
    the tensors come back on the CPU, where the mixture trains); with the indices of the `rows` encoded.

    Each sequence is cut to `max_length` (the recipe's) or the model's context, if shorter, by the truncation DPO's
    batches use (`truncate_pair`: a long prompt keeps its end and leaves the responses room); the prompt τ̃ reads is
    the prompt as cut. Without it one long pair set the width of its whole chunk and of every stored tensor: a 20 KB
    proxy response (16k tokens) asked for 10 GB. A pair that still keeps no token of a response (a cap under 2) has
    no DPO signal and would count as evidence in the tests, as would one whose responses differ only after the cut:
    they are left out with a logged count (`readable_pairs`;
    none left is a `DatasetError`), unless `drop_empty` is False (the acquisition terms, one row per row given). A
    pair whose prompt keeps no token of its own is a `DatasetError` naming its line (`tokenize_pairs`): its w(x)
    would pool nothing, and the position predicting its first response token would be -1."""
    model.eval()
    check_mixture_head(model)
    cap = sequence_cap(model, max_length)
    pairs = [truncate_pair(p, cap) for p in tokenize_pairs(rows, tokenizer)]
    kept = readable_pairs(pairs, rows, cap) if drop_empty else list(range(len(rows)))
    pairs, rows = [pairs[i] for i in kept], [rows[i] for i in kept]
    device = model.get_input_embeddings().weight.device
    head = model.get_output_embeddings().weight.float().cpu()
    states: list[Tensor] = []
    targets: list[Tensor] = []
    for start in range(0, len(pairs), chunk):
        part = pairs[start:start + chunk]
        seqs = [p.prompt_ids + p.chosen_ids for p in part] + [p.prompt_ids + p.rejected_ids for p in part]
        width = max(map(len, seqs))
        ids = torch.tensor([s + [int(tokenizer.pad_token_id)] * (width - len(s)) for s in seqs])
        attention = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        final = model(input_ids=ids.to(device), attention_mask=attention.to(device),
                      output_hidden_states=True).hidden_states[-1].float().cpu()
        for i, pair in enumerate(part):
            start_at = len(pair.prompt_ids) - 1  # this position predicts the first response token
            for row, response in ((i, pair.chosen_ids), (i + len(part), pair.rejected_ids)):
                states.append(final[row, start_at:start_at + len(response)])
                targets.append(torch.tensor(response, dtype=torch.long))  # long when cut to nothing too
    width = max(1, max(len(t) for t in targets))  # 1: all cut to nothing (drop_empty off) still has a shape
    hidden, mask = _pad(states, width)
    target_ids, _ = _pad(targets, width)
    n = len(pairs)
    hidden, mask, target_ids = hidden.view(n, 2, width, -1), mask.view(n, 2, width), target_ids.view(n, 2, width)
    embeds, prompt_mask = prompt_embeddings(model, [p.prompt_ids for p in pairs])
    base_logps = sequence_logps(target_logps(hidden @ head.T, target_ids), mask, "sum")
    prompt_ids = torch.full(prompt_mask.shape, PAD, dtype=torch.long)
    for i, pair in enumerate(pairs):
        prompt_ids[i, :len(pair.prompt_ids)] = torch.tensor(pair.prompt_ids, dtype=torch.long)
    return EncodedPairs(embeds, prompt_mask, hidden, target_ids, mask, base_logps,
                        torch.from_numpy(pair_groups(rows)), prompt_ids), kept


# Config keys of a head that does more than hidden @ W.T (Granite divides logits, Cohere multiplies them, Gemma 2
# soft-caps them), each with the value at which it does nothing.
LOGIT_TRANSFORMS = {"logits_scaling": 1.0, "logit_scale": 1.0, "final_logit_softcapping": None}


def check_mixture_head(model: Any) -> None:
    """ValueError unless the base's logits are hidden @ W.T, the head this reading models (`ModeMixture.mode_logps`,
    which stage 1, the condition tests and the evaluation all score with). Why refused: a head bias (Phi) or a logit
    scaling or soft-cap would make them score another model than the one served (whose forward applies them), and
    no number they report would be the served policy's. A zero bias changes nothing and passes. Lifting this needs
    the bias and the transform in `mode_logps` and every caller's head; the bottleneck reading runs the model's own
    head and has no such limit."""
    config = model.config
    changed = [f"{key}={getattr(config, key)!r}" for key, neutral in LOGIT_TRANSFORMS.items()
               if getattr(config, key, neutral) not in (neutral, None)]
    bias = getattr(model.get_output_embeddings(), "bias", None)
    if isinstance(bias, Tensor) and bool(bias.detach().ne(0).any()):
        changed.append("an LM head bias")
    if changed:
        raise ValueError(f"the mode-mixture reading cannot read this base model: its head applies {', '.join(changed)}"
                         ", which the mixture does not model (it scores hidden @ W.T); use the bottleneck reading "
                         "(PROXYLOOP_CHAT_READING) or a base whose logits are its hidden state times its head")


def pair_logps(mixture: ModeMixture, data: EncodedPairs, head: Tensor) -> Tensor:
    """log π†(chosen), log π†(rejected): [N, 2]."""
    n, _, width, size = data.hidden.shape
    embeds = data.embeds.repeat_interleave(2, dim=0)
    prompt_mask = data.prompt_mask.repeat_interleave(2, dim=0)
    logps = mixture.log_prob(embeds, prompt_mask, data.hidden.reshape(2 * n, width, size),
                             data.targets.reshape(2 * n, width), data.mask.reshape(2 * n, width), head)
    return logps.view(n, 2)


def dpo(mixture: ModeMixture, data: EncodedPairs, reference: Tensor, head: Tensor, learning_rate: float,
        epochs: int, recipe: MixtureRecipe, hooks: DPOHooks | None = None) -> list[float]:
    """DPO (sigmoid, sum of log-probs) of the mixture's trainable parameters; returns the step losses.

    Epoch e's order is the e-th permutation of one generator seeded with `recipe.seed`, so a run resumed at
    step s (`hooks.restore`) replays the permutations before it and takes exactly the steps an uninterrupted
    run takes; there is no other randomness (the base is encoded, the mixture has no dropout)."""
    optimiser = torch.optim.Adam([p for p in mixture.parameters() if p.requires_grad], lr=learning_rate)
    done, losses = hooks.restore(mixture, optimiser) if hooks is not None else (0, [])
    generator = torch.Generator().manual_seed(recipe.seed)
    total = epochs * -(-len(data) // recipe.batch_size)
    step = 0
    for _ in range(epochs):
        order = torch.randperm(len(data), generator=generator)
        for start in range(0, len(data), recipe.batch_size):
            step += 1
            if step <= done:
                continue
            index = order[start:start + recipe.batch_size]
            batch = data.take(index)
            ratio = pair_logps(mixture, batch, head) - reference[index]
            loss = dpo_sigmoid_loss(ratio[:, 0], ratio[:, 1], recipe.beta).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
            if hooks is not None:
                tokens = 2 * int(batch.prompt_mask.sum()) + int(batch.mask.sum())
                hooks.after_step(mixture, optimiser, step, total, losses, tokens)
    return losses


def train_proxy(proxy: EncodedPairs, head: Tensor, recipe: MixtureRecipe,
                hooks: DPOHooks | None = None) -> tuple[ModeMixture, list[float]]:
    """Stage 1 on the proxy pairs: τ̃ and Θ̃ against the base; the adapter stays the identity."""
    torch.manual_seed(recipe.seed)
    mixture = ModeMixture(head.shape[1], recipe.simplex_dim)
    mixture.fit_normaliser(proxy.embeds, proxy.prompt_mask)
    with torch.no_grad():
        mixture.theta.copy_(kmeans_modes(proxy.targets[:, 0], proxy.mask[:, 0], head, recipe.simplex_dim,
                                         recipe.seed, recipe.mode_norm))
    select_trainable(mixture, "proxy")
    losses = dpo(mixture, proxy, proxy.base_logps, head, recipe.proxy_learning_rate, recipe.proxy_epochs, recipe,
                 hooks)
    return mixture, losses


def train_adapter(stage1: ModeMixture, expert: EncodedPairs, head: Tensor, recipe: MixtureRecipe,
                  hooks: DPOHooks | None = None) -> tuple[ModeMixture, list[float]]:
    """Stage 2 on the expert pairs: a copy of `stage1` whose adapter alone moves (centre: the assignment)."""
    mixture = ModeMixture(head.shape[1], recipe.simplex_dim)
    mixture.load_state_dict(stage1.state_dict())
    mixture.adapter.reset(identity=True)
    select_trainable(mixture, "expert")
    with torch.no_grad():
        reference = pair_logps(mixture, expert, head)  # the stage-1 policy
        weights = mixture.log_weights(expert.embeds, expert.prompt_mask).exp()
        modes = [mixture.mode_logps(expert.hidden[:, s], expert.targets[:, s], expert.mask[:, s], head)
                 for s in (0, 1)]
        margin = expert.base_logps[:, 0] - expert.base_logps[:, 1]
        centre = assignment_centre(assignment_score(weights, modes[0], modes[1], margin, recipe.beta))
    mixture.adapter.set_centre(centre, torch.zeros(recipe.simplex_dim))
    mixture.adapter.reset()
    losses = dpo(mixture, expert, reference, head, recipe.adapter_learning_rate, recipe.adapter_epochs, recipe,
                 hooks)
    return mixture, losses


def train_fine_tune(stage1: ModeMixture, expert: EncodedPairs, head: Tensor, recipe: MixtureRecipe,
                    hooks: DPOHooks | None = None) -> tuple[ModeMixture, list[float]]:
    """fine_tune on the expert pairs: a copy of `stage1` whose τ̃, Θ̃ and adapter all move, against the stage-1
    mixture as reference (the base still never moves). No assignment centre: this plan lets the expert pairs
    move everything, from where stage 1 left it."""
    mixture = ModeMixture(head.shape[1], stage1.simplex_dim)
    mixture.load_state_dict(stage1.state_dict())
    select_trainable(mixture, "all")
    with torch.no_grad():
        reference = pair_logps(mixture, expert, head)
    losses = dpo(mixture, expert, reference, head, recipe.fine_tune_learning_rate, recipe.fine_tune_epochs, recipe,
                 hooks)
    return mixture, losses


@torch.no_grad()
def sample(model: Any, tokenizer: Any, mixture: ModeMixture, prompts: list[str], seed: int,
           max_new_tokens: int = 8, end_token: str = "<|im_end|>") -> list[str]:
    """One answer per prompt (rendered prompts): k ~ w(x), then temperature-1 decoding with mode k's bias."""
    from transformers import LogitsProcessorList

    head = model.get_output_embeddings().weight.float()
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    embeds, prompt_mask = prompt_embeddings(model, ids)
    weights = mixture.log_weights(embeds, prompt_mask).exp()
    generator = torch.Generator().manual_seed(seed)
    modes = torch.multinomial(weights, 1, generator=generator).squeeze(1)
    bias = mixture.mode_biases(head)[modes]

    tokenizer.padding_side = "left"
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(seed)
    out = model.generate(**encoded, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                         max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.convert_tokens_to_ids(end_token),
                         logits_processor=LogitsProcessorList([BiasLogits(bias)]))
    texts: list[str] = tokenizer.batch_decode(out[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
    return texts

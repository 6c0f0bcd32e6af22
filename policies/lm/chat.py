"""Causal language-model policies: loading a released version and generating from chat messages.

A version of family `causal_lm` keeps a Hugging Face directory (safetensors weights, tokenizer
with its chat template) under `model/`; it is loaded from that path only, never from a hub. A mode-mixture
policy (policies/lm/mode_mixture.py) is its base's directory plus the mixture's two files: each request
draws its mode k from w(x) and decodes the base with mode k's vocabulary bias at every token.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ground.schemas import PolicyVersion
from policies.lm.decoding import (
    IncrementalDecoder,
    Sampling,
    StopMatcher,
    adjusted_logits,
    is_greedy,
    sample_token,
)
from policies.lm.lora import is_lora_dir, load_lora_dir
from policies.lm.mode_mixture import (
    ModeMixture,
    is_mixture_dir,
    kept_prompt,
    load_mixture_dir,
    model_context,
    prompt_log_weights,
    sequence_cap,
)
from policies.lm.simplex_bottleneck import load_causal_lm_dir
from policies.registry import register, resolve

CAUSAL_LM = "causal_lm"
MODEL_SUBDIR = "model"


def is_causal_lm(version_path: Path | str) -> bool:
    config = Path(version_path) / "config.json"
    return config.exists() and json.loads(config.read_text()).get("family") == CAUSAL_LM


def register_causal_lm(
    root: Path, name: str, model_dir: Path, lineage: dict[str, Any], alias: str | None = "production"
) -> PolicyVersion:
    """Release a Hugging Face model directory (e.g. a training checkpoint) as a new version."""
    return register(root, name, None, {"family": CAUSAL_LM}, lineage, alias=alias,
                    directories={MODEL_SUBDIR: model_dir})


class TemplateRefused(ValueError):
    """The model's chat template raised on these messages (Llama-2, Mistral and Gemma templates refuse roles that do
    not alternate, or a system message): the client's to change, a 400."""


class ChatTemplateMissing(FileNotFoundError):
    """The released model's tokenizer has no chat template (GPT-2, GPT-NeoX and OPT tokenizers ship none): no
    request can be rendered, so it is the server's to mend, not the client's. A FileNotFoundError (the template
    file, `chat_template.jinja` or tokenizer_config.json's key, is missing) so that the chat route answers 503,
    as it does for a LoRA release whose base is missing; `load_chat_policy` raises it before any request runs."""


def require_chat_template(tokenizer: Any, where: Path | str) -> None:
    """`ChatTemplateMissing` naming `where` when `tokenizer` has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateMissing(f"the model in {where} has no chat template, so no chat request can be rendered: "
                                  "release a model trained from a base whose tokenizer has one "
                                  "(ChatML, as the chat runs now require)")


def chat_text(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The conversation rendered by the model's chat template, with the assistant's turn opened."""
    from jinja2 import TemplateError

    require_chat_template(tokenizer, getattr(tokenizer, "name_or_path", "") or "this policy")
    try:
        text: str = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except TemplateError as exc:
        raise TemplateRefused(f"this model's chat template refuses these messages: {exc}") from exc
    return text


class Piece(NamedTuple):
    """A stretch of a reply's text; `finish` ("stop" or "length") on the last one, with the tokens generated so far."""

    text: str
    finish: str | None
    completion_tokens: int


@dataclass
class ChatPolicy:
    version: PolicyVersion
    model: Any
    tokenizer: Any
    mixture: ModeMixture | None = None
    mode_biases: Tensor | None = None  # [D, V]: W θ_k of each of the mixture's modes
    prompt_cap: int | None = None  # where training cut prompts (`_training_cut`): w(x) reads them so

    @torch.no_grad()
    def mode_bias(self, messages: list[dict[str, str]], temperature: float,
                  generator: torch.Generator | None) -> Tensor | None:
        """The vocabulary bias of this request's mode: k drawn from w(x) with the request's generator (greedy
        requests, temperatures under decoding.GREEDY_BELOW, take the most likely mode), None for a policy without
        a mixture. w(x) pools the rendered prompt's ids without special tokens, exactly as training tokenised its
        prompts (training/data.py), and cut as training cut them (`kept_prompt` at `prompt_cap`)."""
        if self.mixture is None or self.mode_biases is None:
            return None
        ids = self.tokenizer(chat_text(self.tokenizer, messages), add_special_tokens=False)["input_ids"]
        ids = kept_prompt(ids, self.prompt_cap) if self.prompt_cap is not None else ids
        weights = prompt_log_weights(self.mixture, self.model, ids).exp()
        if is_greedy(temperature):
            return self.mode_biases[int(weights.argmax())]
        mode = int(torch.multinomial(weights, 1, generator=generator))
        return self.mode_biases[mode]

    def prompt_ids(self, messages: list[dict[str, str]]) -> torch.Tensor:
        """The rendered prompt's ids without special tokens, as training tokenised its rows: the template renders
        any BOS it wants, and a tokenizer that adds one too (Llama's) would otherwise feed <s><s>."""
        ids: torch.Tensor = self.tokenizer(chat_text(self.tokenizer, messages), add_special_tokens=False,
                                           return_tensors="pt").input_ids
        return ids

    @property
    def vocab_size(self) -> int:
        """Tokens the model scores at each step: the ids a logit_bias may name."""
        return int(self.model.config.vocab_size)

    @property
    def context_limit(self) -> int:
        """Positions the model can attend over, prompt and completion together (1024 when its config says none)."""
        return model_context(self.model) or 1024

    @torch.no_grad()
    def generate(self, messages: list[dict[str, str]], sampling: Sampling) -> Iterator[Piece]:
        """Yield the reply's text as it becomes final; the last piece carries the finish reason.

        One forward pass per token with a KV cache. Not `model.generate` with a `TextIteratorStreamer`: generate
        samples from torch's global RNG (`torch.multinomial` without a generator; transformers 5.24 takes none), so a
        request with a `seed` would share and race that state with every other request the threaded server samples
        for. This loop gives each request its own `torch.Generator`, which makes seeded completions reproducible under
        concurrency. Generation stops at the end-of-turn token ("stop"), at a stop sequence ("stop", the text cut
        before it), or after `max_tokens` or when prompt and reply fill the context ("length"). `completion_tokens`
        counts the tokens sampled (the end-of-turn token excluded), not a re-tokenisation of the text.
        """
        generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
        bias = self.mode_bias(messages, sampling.temperature, generator)
        input_ids = self.prompt_ids(messages)
        budget = min(sampling.max_tokens, self.context_limit - int(input_ids.shape[1]))
        decoder, stops, ends = IncrementalDecoder(self.tokenizer), StopMatcher(sampling.stop), self._end_ids()
        past, next_input, count, finish = None, input_ids, 0, "length"
        while count < budget:
            out = self.model(input_ids=next_input, past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[0, -1].float()
            if bias is not None:
                logits = logits + bias
            logits = adjusted_logits(logits, decoder.ids, sampling)
            token = sample_token(logits, sampling.temperature, sampling.top_p, generator)
            if token in ends:
                finish = "stop"
                break
            count += 1
            text, stopped = stops.push(decoder.push(token))
            if stopped:
                yield Piece(text, "stop", count)
                return
            if text:
                yield Piece(text, None, count)
            next_input = torch.tensor([[token]])
        text, stopped = stops.push(decoder.flush())
        yield Piece(text, "stop", count) if stopped else Piece(text + stops.flush(), finish, count)

    def _end_ids(self) -> set[int]:
        """Tokens that end the assistant's turn: the tokenizer's end of sequence and ChatML's <|im_end|>."""
        eos, end = self.tokenizer.eos_token_id, self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        ends = {eos} if isinstance(eos, int) else set()
        return ends | {end} if isinstance(end, int) and end != self.tokenizer.unk_token_id else ends


def load_chat_policy(root: Path, ref: str, merge_lora: bool = True) -> ChatPolicy:
    """A released version ready to generate: full weights (with a simplex bottleneck when it is a two-stage
    policy), its base with a mode mixture, or a LoRA adapter on its recorded base, merged unless `merge_lora` is
    False."""
    from transformers import AutoTokenizer

    version = resolve(root, ref)
    if not is_causal_lm(version.path):
        raise ValueError(f"{version.policy} v{version.version} is not a language-model policy; "
                         "use /v1/policies/{name}/predict for feature-vector policies")
    path = Path(version.path) / MODEL_SUBDIR
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    require_chat_template(tokenizer, f"{version.policy} v{version.version}")
    model = (load_lora_dir(path, merge=merge_lora) if is_lora_dir(path) else load_causal_lm_dir(path)).eval()
    if not is_mixture_dir(path):
        return ChatPolicy(version=version, model=model, tokenizer=tokenizer)
    mixture, spec = load_mixture_dir(path)
    with torch.no_grad():
        biases = mixture.mode_biases(model.get_output_embeddings().weight.float())
    return ChatPolicy(version=version, model=model, tokenizer=tokenizer, mixture=mixture, mode_biases=biases,
                      prompt_cap=_training_cut(spec.get("recipe", {}).get("max_length"), model))


def _training_cut(max_length: int | None, model: Any) -> int | None:
    """Where training cut prompts for w(x): `sequence_cap` (the recipe's max_length, or the model's context if shorter);
    None (no cut) for a recipe saved without one."""
    return None if max_length is None else sequence_cap(model, int(max_length))

"""From next-token logits to the text a chat client sees: sampling, UTF-8-safe incremental decoding, stop sequences.

Apart from policies/lm/chat.py because each piece is a small state machine with its own edge cases (a character
split over byte tokens, a stop sequence split over pieces, a temperature so small that dividing by it overflows),
tested directly in tests/policies/test_chat_decoding.py without a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

# Temperatures below this decode greedily. Dividing float32 logits by 1e-40 overflows to inf, softmax then gives nan and
# torch.multinomial raises; long before that (at 1e-5 a logit gap of 1e-3 is already a factor e^100) sampling is the
# argmax in all but exact ties, so greedy is what such a request asks for.
GREEDY_BELOW = 1e-5
REPLACEMENT = "\ufffd"  # what a tokenizer decodes an incomplete UTF-8 sequence to


@dataclass(frozen=True)
class Sampling:
    """One choice's decoding settings, as a request states them (OpenAI's names and meanings)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)


def adjusted_logits(logits: Tensor, generated: Sequence[int], sampling: Sampling) -> Tensor:
    """OpenAI's penalties and bias on 1-D next-token `logits`: each token's logit less presence_penalty once it is in
    the reply, less frequency_penalty times how often it is there (the reply's `generated` tokens, not the prompt's),
    plus its logit_bias (-100 all but bans a token, 100 all but forces it)."""
    if sampling.logit_bias:
        ids, values = zip(*sampling.logit_bias, strict=True)
        logits = logits.index_add(0, torch.tensor(ids), torch.tensor(values, dtype=logits.dtype))
    if generated and (sampling.presence_penalty or sampling.frequency_penalty):
        counts = torch.bincount(torch.tensor(generated), minlength=logits.shape[0]).to(logits.dtype)
        logits = logits - sampling.presence_penalty * (counts > 0) - sampling.frequency_penalty * counts
    return logits


def is_greedy(temperature: float) -> bool:
    """Whether `temperature` means argmax decoding: 0, or so small that sampling would overflow (GREEDY_BELOW)."""
    return temperature < GREEDY_BELOW


def sample_token(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """The next token from 1-D `logits`: greedy for `is_greedy` temperatures, else a draw from the tempered softmax
    restricted to the smallest set of most likely tokens whose mass reaches `top_p` (nucleus sampling; the most likely
    token is always kept, so top_p 0 is greedy too). The draw uses the request's own `generator`."""
    if is_greedy(temperature):
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        ranked, order = probs.sort(descending=True)
        keep = (ranked.cumsum(0) - ranked) < top_p  # the mass before each token is still short of top_p
        keep[0] = True
        probs = torch.zeros_like(probs).scatter(0, order[keep], ranked[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


class IncrementalDecoder:
    """Text of a growing list of token ids, handed out as it becomes final.

    Byte-level tokenizers split a multi-byte character over several tokens; a token alone decodes to U+FFFD. Decoding
    each token apart (or emitting whatever the whole list decodes to each step) sends that U+FFFD and, since the
    completed character has the same length in Python, never the character. So the whole list is decoded each step
    and the text is released only up to a trailing run of U+FFFD, which may still complete; `flush` releases the rest
    at the end (a genuinely invalid sequence then comes out as U+FFFD, as a whole decode would give it).
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already handed out

    def _text(self) -> str:
        # No clean-up of tokenization spaces: it rewrites " ." to "." and so could change text already sent.
        text: str = self.tokenizer.decode(self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return text

    def push(self, token: int) -> str:
        """Add one generated token; the newly final text (often "", mid-character)."""
        self.ids.append(token)
        text = self._text()
        final = len(text.rstrip(REPLACEMENT))
        if final <= self.sent:
            return ""
        piece, self.sent = text[self.sent:final], final
        return piece

    def flush(self) -> str:
        """Everything not yet handed out, incomplete sequences included: generation has ended."""
        text = self._text()
        piece, self.sent = text[self.sent:], max(self.sent, len(text))
        return piece


class StopMatcher:
    """Cuts text before the first of up to a few stop sequences, across the pieces it arrives in.

    A piece is passed on only when no stop sequence can still start inside it: the longest tail of the text so far
    that is a proper prefix of some stop sequence is held back, so a streamed reply never shows the start of a stop
    sequence that a later piece completes, and the streamed and whole replies agree.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [stop for stop in stops if stop]
        self.held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """(the text now safe to send, whether a stop sequence was reached: then nothing after it is sent)."""
        pending = self.held + text
        hits = [at for at in (pending.find(stop) for stop in self.stops) if at >= 0]
        if hits:
            self.held = ""
            return pending[:min(hits)], True
        keep = self._prefix_tail(pending)
        self.held = pending[len(pending) - keep:]
        return pending[:len(pending) - keep], False

    def flush(self) -> str:
        """The held-back tail: generation ended before it became a stop sequence."""
        held, self.held = self.held, ""
        return held

    def _prefix_tail(self, text: str) -> int:
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest

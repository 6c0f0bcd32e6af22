"""How a refusal quotes pydantic: "field.path: message" per problem, joined by "; ". The ingest decoder's dead
letters, the proxy publisher's bad lines and the promotion log's tamper reports all name the same fields the same
way. And the one rule on text every store takes: no NUL character."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, ValidationError


def no_nul(text: str) -> str:
    """`text`, unless it holds a NUL character: PostgreSQL's text cannot (SQLite's can), so the same request was
    stored on one machine and a 500, or a dead letter after it was acknowledged, on the next."""
    if "\x00" in text:
        raise ValueError("text with a NUL character (\\u0000) cannot be stored")
    return text


StoredText = Annotated[str, AfterValidator(no_nul)]


def validation_problems(error: ValidationError, limit: int | None = None) -> str:
    """The first `limit` problems of `error` (all when None), each as "field.path: message"."""
    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors()[:limit])

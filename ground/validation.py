"""How a refusal quotes pydantic: "field.path: message" per problem, joined by "; ". The ingest decoder's dead
letters, the proxy publisher's bad lines and the promotion log's tamper reports all name the same fields the same
way."""

from __future__ import annotations

from pydantic import ValidationError


def validation_problems(error: ValidationError, limit: int | None = None) -> str:
    """The first `limit` problems of `error` (all when None), each as "field.path: message"."""
    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors()[:limit])

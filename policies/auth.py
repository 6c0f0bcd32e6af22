"""API keys for serving: compared as SHA-256 hashes, so deployments can configure hashes only."""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Header, HTTPException, Request

from ground.settings import Settings


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def accepted_hashes(settings: Settings) -> list[str]:
    """Hashes of `PROXYLOOP_API_KEYS` plus `PROXYLOOP_API_KEY_HASHES` as given."""
    return [hash_key(k) for k in settings.api_key_list] + settings.api_key_hash_list


def require_api_key(request: Request, authorization: Annotated[str | None, Header()] = None) -> str:
    settings: Settings = request.app.state.settings
    token = (authorization or "").removeprefix("Bearer ").strip()
    presented = hash_key(token)
    if not token or not any(hmac.compare_digest(presented, h) for h in accepted_hashes(settings)):
        raise HTTPException(401, "missing or invalid API key: send 'Authorization: Bearer <key>'")
    return presented


ApiKey = Annotated[str, Depends(require_api_key)]

"""API keys for serving: compared as SHA-256 hashes, so deployments can configure hashes only."""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, HTTPException
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ground.settings import Settings
from ingest.web import SettingsDep


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def accepted_hashes(settings: Settings) -> list[str]:
    """Hashes of `PROXYLOOP_API_KEYS` plus `PROXYLOOP_API_KEY_HASHES` as given."""
    return [hash_key(k) for k in settings.api_key_list] + settings.api_key_hash_list


# auto_error=False: a missing or non-bearer header gets our 401 with how to send the key.
_bearer = HTTPBearer(auto_error=False, description="An API key from PROXYLOOP_API_KEYS / PROXYLOOP_API_KEY_HASHES.")


def require_api_key(
    settings: SettingsDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> str:
    token = credentials.credentials.strip() if credentials is not None else ""
    presented = hash_key(token)
    if not token or not any(hmac.compare_digest(presented, h) for h in accepted_hashes(settings)):
        raise HTTPException(401, "missing or invalid API key: send 'Authorization: Bearer <key>'")
    return presented


ApiKey = Annotated[str, Depends(require_api_key)]

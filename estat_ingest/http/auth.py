"""API keys (API_KEYS=name:key,…): who may send events, and which key name sent them.

A key is accepted in `Authorization: Bearer <key>`, `X-Api-Key: <key>` or an `api_key` query
parameter (sendBeacon and pixels cannot set headers). Comparison is constant-time: the candidate
and every configured key are compared as SHA-256 digests with `hmac.compare_digest`, over all
keys without an early exit, so neither a key's content, its length nor its position in the list
shows in the timing. Only the key NAME ever leaves this module (metrics); keys are never logged,
and an `api_key` parameter is removed from a GET payload before it is stored.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from urllib.parse import unquote_plus

WWW_AUTHENTICATE = {"WWW-Authenticate": 'Bearer realm="estat-ingest"'}
MAX_KEY = 512


class ApiKeys:
    def __init__(self, keys: tuple[tuple[str, str], ...]) -> None:
        self.enabled = bool(keys)
        self._digests = tuple((name, hashlib.sha256(key.encode()).digest()) for name, key in keys)

    def name_of(self, candidate: str) -> str | None:
        """The name of the key equal to `candidate`, or None."""
        if not candidate or len(candidate) > MAX_KEY:
            return None
        digest = hashlib.sha256(candidate.encode("utf-8", "surrogateescape")).digest()
        found = None
        for name, ref in self._digests:
            if hmac.compare_digest(digest, ref) and found is None:
                found = name
        return found

    def candidate(self, headers: Mapping[str, str], query: str) -> str | None:
        """The key the request presents, or None when it presents none."""
        auth = headers.get("authorization")
        if auth:
            scheme, _, token = auth.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
        key = headers.get("x-api-key")
        if key:
            return key.strip()
        if "api_key=" in query:
            for part in query.split("&"):
                if part.startswith("api_key="):
                    return unquote_plus(part[8:])
        return None


def strip_api_key(query: str) -> str:
    """The query string without its `api_key` parameters (they must not reach the data lake)."""
    if "api_key=" not in query:
        return query
    return "&".join(p for p in query.split("&") if not p.startswith("api_key=") and p != "api_key")

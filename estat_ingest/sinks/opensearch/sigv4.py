"""AWS SigV4 for OpenSearch requests, with botocore's signer and the default credential chain.

The credentials come from aiobotocore's session (environment, shared files, ECS task role, IMDS)
and refresh without blocking the loop. The payload hash is computed by the caller (off the loop
for large bodies) and sent as `x-amz-content-sha256`, which OpenSearch Serverless (`aoss`)
requires and managed domains (`es`) accept; botocore then signs that header instead of hashing the
body again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import ReadOnlyCredentials

log = logging.getLogger("estat_ingest.sinks.opensearch")

#: headers aiohttp adds or that proxies rewrite: never part of the signature
_UNSIGNED = frozenset({"content-length", "user-agent", "accept-encoding", "connection", "expect"})


class NoCredentials(RuntimeError):
    pass


RELOAD_S = 30.0  # with no credentials, look the chain up again at most this often


class SigV4Signer:
    def __init__(self, service: str, region: str, credentials: Any = None) -> None:
        self.service = service
        self.region = region
        self._credentials = credentials  # botocore Credentials/AioCredentials; None = default chain
        self._loaded_at: float | None = None

    async def _load(self) -> None:
        from aiobotocore.session import get_session

        self._loaded_at = time.monotonic()
        self._credentials = await get_session().get_credentials()

    async def start(self) -> None:
        """Look the default chain up once; a failure here must not stop the server (it is retried)."""
        if self._credentials is None:
            try:
                await self._load()
            except Exception as err:
                log.warning("aws credentials could not be loaded (retried on the next request)",
                            extra={"sink": "opensearch", "error": f"{type(err).__name__}: {err}"[:300]})

    async def _frozen(self) -> ReadOnlyCredentials:
        if self._credentials is None and (self._loaded_at is None or time.monotonic() - self._loaded_at > RELOAD_S):
            await self._load()  # an error here is transient until proven otherwise: the caller retries
        creds = self._credentials
        if creds is None:
            raise NoCredentials("no AWS credentials found by the default chain")
        getter = getattr(creds, "get_frozen_credentials", None)
        if getter is None:
            return ReadOnlyCredentials(creds.access_key, creds.secret_key, creds.token)
        frozen = getter()
        if hasattr(frozen, "__await__"):
            frozen = await frozen
        return frozen  # type: ignore[no-any-return,unused-ignore]
    async def sign(self, method: str, url: str, headers: Mapping[str, str], payload_sha256: str) -> dict[str, str]:
        """Headers to send: `headers` plus x-amz-content-sha256, X-Amz-Date, the token and Authorization."""
        frozen = await self._frozen()
        signed = {k: v for k, v in headers.items() if k.lower() not in _UNSIGNED}
        signed["x-amz-content-sha256"] = payload_sha256
        req = AWSRequest(method=method, url=url, headers=signed)
        SigV4Auth(frozen, self.service, self.region).add_auth(req)
        out = dict(headers)
        out.update(req.headers.items())
        return out

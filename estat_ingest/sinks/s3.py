"""S3 sink: one PutObject per attempt through one aiobotocore client made at start-up.

SDK retries are off for real (`total_max_attempts=1`: one HTTP request per attempt), so the
engine's `1 + S3_APP_RETRIES` attempts are the only retries (v1 defects §9 a, b). Throttling, 5xx,
timeouts and connection errors retry. Errors about the whole bucket or the credentials (NoSuchBucket,
AccessDenied, InvalidAccessKeyId, SignatureDoesNotMatch, expired tokens, a wrong region, no
credentials at all) are outages (`Result.outage`): the batch is kept and retried later, never set
aside. Only another 4xx, about this one request, rejects the batch.
The key comes from the payload, fixed at batch close, so a retry after an ambiguous timeout
overwrites the same object instead of adding a duplicate (§9 g).

Every PUT carries the same object options (`object_options`): `Content-Type` (the type of the
stored bytes, `application/gzip` or `application/zstd`; no `Content-Encoding`, so every client
downloads the `.jsonl.gz` bytes as they are — docs/config.md says why), and the storage class
and server-side encryption when configured.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import platform
from dataclasses import replace
from typing import Any

import aiobotocore
import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    CredentialRetrievalError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
    TokenRetrievalError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)

from estat_ingest import __version__
from estat_ingest.config import Settings
from estat_ingest.formats.codec import compress
from estat_ingest.formats.keys import join_key
from estat_ingest.metrics import Metrics
from estat_ingest.sinks.base import OK, Outcome, Payload, Probe, Result, Sink, SinkSpec, outage

log = logging.getLogger("estat_ingest.sinks.s3")

RETRYABLE_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
    "InternalError", "ServiceUnavailable", "RequestLimitExceeded",
})
# Error codes about the whole destination, with the bounded reason they are counted under. Any
# other 401/403 is `auth` too; a 301 (the bucket lives in another region) is `wrong_region`.
OUTAGE_CODES = {
    "NoSuchBucket": "no_bucket",
    "InvalidBucketName": "no_bucket",
    "AccessDenied": "auth",
    "AllAccessDisabled": "auth",
    "AccountProblem": "auth",
    "InvalidAccessKeyId": "auth",
    "SignatureDoesNotMatch": "auth",
    "InvalidToken": "auth",
    "ExpiredToken": "auth",
    "TokenRefreshRequired": "auth",
    "InvalidSecurity": "auth",
    "MissingSecurityHeader": "auth",
    "NotSignedUp": "auth",
    "PermanentRedirect": "wrong_region",
    "AuthorizationHeaderMalformed": "wrong_region",
    "IllegalLocationConstraintException": "wrong_region",
}


# validate --check-sinks writes (and deletes) its test object here, under RAW_PREFIX and DLQ_PREFIX:
# a leading `_` is a hidden path to Hive-style readers (Athena, Glue, Spark), never a partition
PROBE_PREFIX = "_estat_validate"


def sdk_user_agent() -> str:
    """The User-Agent of every S3 request, made once: the server and the libraries that send (S3's
    access logs and CloudTrail show it as `userAgent`; aiobotocore's session adds `botocore/<version>`).
    Given to the client (`Config(user_agent=...)`), it also spares botocore from building its own
    string again on every request, twice (sanitized components and feature ids): ≈ 20% of a
    PutObject's CPU here (task-clock of 400 PUTs of 200 KB to moto, 1,095-1,161 → 881-886 ms in two
    of three paired runs)."""
    return f"estat-ingest/{__version__} aiobotocore/{aiobotocore.__version__} Python/{platform.python_version()}"


def error_text(err: BaseException) -> str:
    """A short text for the log line: S3's error code and message (`NoSuchBucket: The specified
    bucket does not exist`), else the exception's type and text."""
    if isinstance(err, ClientError):
        e = err.response.get("Error", {})
        code, message = str(e.get("Code", "") or ""), str(e.get("Message", "") or "")
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        text = f"{code}: {message}" if code and message else code or message or f"HTTP {status}"
    else:
        text = f"{type(err).__name__}: {err}"
    return text[:300]


def object_options(settings: Settings) -> dict[str, str]:
    """PutObject parameters of every object (batches, rejected DLQ files, the validate probe)."""
    ext = "zstd" if settings.compression == "zstd" else "gzip"
    opts = ({"ContentType": "application/x-ndjson", "ContentEncoding": ext} if settings.s3_content_encoding
            else {"ContentType": f"application/{ext}"})
    if settings.s3_storage_class:
        opts["StorageClass"] = settings.s3_storage_class
    if settings.s3_sse:
        opts["ServerSideEncryption"] = settings.s3_sse
    if settings.s3_sse_kms_key_id:
        opts["SSEKMSKeyId"] = settings.s3_sse_kms_key_id
    return opts


def classify_client_error(err: ClientError) -> Result:
    code = str(err.response.get("Error", {}).get("Code", ""))
    status = int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    if code in ("SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded") or status in (429, 503):
        return Result(Outcome.RETRY, "throttled")
    if status >= 500 or code in RETRYABLE_CODES:
        return Result(Outcome.RETRY, "server_error")
    error = f"{code or status}"[:100]
    if code in OUTAGE_CODES:
        return outage(OUTAGE_CODES[code], error=error)
    if status in (401, 403):
        return outage("auth", error=error)
    if status == 301:
        return outage("wrong_region", error=error)
    return Result(Outcome.REJECT, "client_error", error=error)


class S3Sink(Sink):
    """Owns v1's `s3_put_errors_total` and `s3_events_stored_total` (through `observe`)."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.spec = SinkSpec(name="s3", attempts=1 + settings.s3_app_retries, timeout_s=settings.s3_timeout_s,
                             reads_v1_dlq=True)
        self.settings = settings
        self.metrics = metrics
        self.bucket = settings.raw_bucket
        self.prefix = settings.raw_prefix
        self.dlq_prefix = settings.dlq_prefix
        self.options = object_options(settings)
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None

    def key_of(self, payload: Payload, prefix: str | None = None) -> str:
        return join_key(self.prefix if prefix is None else prefix, payload.partition, payload.name)

    def observe(self, payload: Payload, result: Result) -> None:
        m = self.metrics
        if m is None:
            return
        if not result.ok:
            m.s3_put_errors.inc()
        elif not payload.replayed:  # v1's meaning: stored by a fresh upload
            m.s3_events_stored.inc(payload.num_events)

    async def start(self) -> None:
        s = self.settings
        config = AioConfig(
            retries={"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=s.s3_timeout_s,
            read_timeout=s.s3_timeout_s,
            max_pool_connections=max(10, s.upload_concurrency * 2 + s.dlq_replay_concurrency),
            # botocore's default CRC32 costs ≈10% CPU and S3 checks Content-MD5-less PUTs anyway
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            user_agent=sdk_user_agent(),
        )
        session = get_session()
        self._client = await self._stack.enter_async_context(
            session.create_client(
                "s3",
                region_name=s.aws_region or None,
                endpoint_url=s.s3_endpoint_url or None,
                config=config,
            )
        )

    async def put(self, key: str, payload: Payload) -> Result:
        try:
            await self._client.put_object(Bucket=self.bucket, Key=key, Body=payload.data, **self.options)
        except ClientError as err:
            return replace(classify_client_error(err), error=error_text(err))
        except (NoCredentialsError, PartialCredentialsError, CredentialRetrievalError, TokenRetrievalError) as err:
            return outage("auth", error=error_text(err))
        except (BotoConnectionError, aiohttp.ClientError, OSError) as err:
            return Result(Outcome.RETRY, "connection", error=error_text(err))
        except ReadTimeoutError as err:  # S3_TIMEOUT is also the SDK's read timeout
            return Result(Outcome.RETRY, "timeout", error=error_text(err))
        except BotoCoreError as err:
            return Result(Outcome.RETRY, "sdk_error", error=error_text(err))
        return OK

    async def send(self, payload: Payload) -> Result:
        return await self.put(self.key_of(payload), payload)

    async def keep_rejected(self, payload: Payload) -> str | None:
        """A batch S3 refused for good goes under DLQ_PREFIX, same partition and name (v1)."""
        key = self.key_of(payload, prefix=self.dlq_prefix)
        try:
            async with asyncio.timeout(self.spec.timeout_s):
                result = await self.put(key, payload)
        except TimeoutError:
            return None
        return f"s3://{self.bucket}/{key}" if result.ok else None

    def target_of(self, payload: Payload) -> str:
        return f"s3://{self.bucket or '(RAW_BUCKET not set)'}/{self.key_of(payload)}"

    async def probe(self) -> Probe:
        """Write an empty `.jsonl.gz` (`.jsonl.zst`) with the objects' options under
        `RAW_PREFIX/_estat_validate/` and `DLQ_PREFIX/_estat_validate/` (the two prefixes the server
        writes), then delete it; a refused delete is not a problem (the server never deletes)."""
        s = self.settings
        body = compress(b"", s.compression, s.zstd_level if s.compression == "zstd" else s.gzip_level)
        name = f"{s.instance_id}-{os.urandom(6).hex()}{s.ext}"
        written: list[str] = []
        left: list[str] = []
        for var, prefix in (("RAW_PREFIX", self.prefix), ("DLQ_PREFIX", self.dlq_prefix)):
            key = join_key(prefix, PROBE_PREFIX, name)
            url = f"s3://{self.bucket}/{key}"
            try:
                async with asyncio.timeout(self.spec.timeout_s):
                    await self._client.put_object(Bucket=self.bucket, Key=key, Body=body, **self.options)
            except Exception as err:  # every failure is a line for the operator, none a traceback
                problem = self._probe_problem(err, var, url)
                return Probe("", (problem,))
            written.append(url)
            try:
                async with asyncio.timeout(self.spec.timeout_s):
                    await self._client.delete_object(Bucket=self.bucket, Key=key)
            except Exception as err:
                left.append(f"{url} ({error_text(err)})")
        opts = ", ".join(self.options.get(k, "") for k in ("StorageClass", "ServerSideEncryption") if k in self.options)
        checked = f"wrote and deleted {' and '.join(written)}" + (f" ({opts})" if opts else "")
        if left:
            checked += ("; not deleted, harmless (an empty file under a `_` prefix, which Athena and Hive "
                        "skip; the server itself never deletes): " + ", ".join(left))
        return Probe(checked)

    def _probe_problem(self, err: BaseException, var: str, url: str) -> str:
        """One line naming the variable to look at, then S3's own words."""
        text = error_text(err)
        code = str(err.response.get("Error", {}).get("Code", "")) if isinstance(err, ClientError) else ""
        status = (int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
                  if isinstance(err, ClientError) else 0)
        if isinstance(err, TimeoutError):
            return f"no answer from S3 within S3_TIMEOUT={self.spec.timeout_s:g}s writing {url}"
        outage_reason = OUTAGE_CODES.get(code, "")  # what delivery would count it as
        if outage_reason == "no_bucket":
            return f"RAW_BUCKET={self.bucket!r} does not exist (at this endpoint or region): {text}"
        if isinstance(err, (NoCredentialsError, PartialCredentialsError)):
            return (f"no AWS credentials found (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, web identity, "
                    f"the ECS task role or instance metadata): {text}")
        if outage_reason == "wrong_region" or status == 301:
            return f"RAW_BUCKET={self.bucket!r} is not in AWS_REGION={self.settings.aws_region!r}: {text}"
        if outage_reason == "auth" and code not in ("AccessDenied", "AllAccessDisabled"):
            return f"the AWS credentials are refused: {text}"
        if code == "AccessDenied" or status == 403:
            kms = " or kms:GenerateDataKey on S3_SSE_KMS_KEY_ID" if self.settings.s3_sse_kms_key_id else ""
            return f"cannot write {url}: the credentials lack s3:PutObject on {var}/*{kms}: {text}"
        if code == "InvalidStorageClass":
            return f"S3_STORAGE_CLASS={self.settings.s3_storage_class!r} is refused by the bucket: {text}"
        if code.startswith("KMS") or "kms" in code.lower():
            return f"S3_SSE_KMS_KEY_ID={self.settings.s3_sse_kms_key_id!r} cannot be used: {text}"
        if isinstance(err, (BotoConnectionError, aiohttp.ClientError, OSError)):
            where = self.settings.s3_endpoint_url or "S3"
            return f"cannot reach {where}: {text}"
        return f"cannot write {url}: {text}"

    async def check(self) -> None:
        try:
            await self._client.head_bucket(Bucket=self.bucket)
        except Exception as err:  # a probe: report, never fail start-up
            log.warning("s3 bucket check failed", extra={"sink": "s3", "bucket": self.bucket,
                                                          "error": f"{type(err).__name__}: {err}"[:300]})

    async def aclose(self) -> None:
        await self._stack.aclose()

"""S3 sink: one PutObject per attempt, signed by botocore's S3 SigV4 signer and sent with aiohttp.

No SDK client: aiobotocore's S3 client loads the S3 service model and the endpoint tables (≈ 15 MB
of Python objects, ≈ 34 MB of RSS with its imports) and spends ≈ 3 ms of CPU per PutObject of a
400 KB batch in its machinery; this sink needs three requests (PutObject, HeadBucket for the
start-up check, DeleteObject for `validate`), built here and signed with botocore's own
`S3SigV4Auth` (the canonical request and the payload hash exactly as botocore makes them), with
the default credential chain (environment, shared files, web identity, ECS task role, IMDS) and
its refresh from `SigV4Signer` (sinks/opensearch/sigv4.py). Addressing: `S3_ENDPOINT_URL` is
used path-style (`<endpoint>/<bucket>/<key>`, what S3-compatible servers and VPC interface
endpoints accept); without it, AWS's regional endpoint, virtual-hosted
(`https://<bucket>.s3.<region>.amazonaws.com/<key>`, path-style for bucket names with a dot).

One HTTP request per attempt, no retries of its own, so the engine's `1 + S3_APP_RETRIES`
attempts are the only retries (v1 defects §9 a, b); `S3_TIMEOUT` bounds the connect and each read.
Throttling, 5xx, timeouts and connection errors retry. Errors about the whole bucket or the
credentials (NoSuchBucket, AccessDenied, InvalidAccessKeyId, SignatureDoesNotMatch, expired
tokens, a wrong region, no credentials at all) are outages (`Result.outage`): the batch is kept
and retried later, never set aside. Only another 4xx, about this one request, rejects the batch.
The key comes from the payload, fixed at batch close, so a retry after an ambiguous timeout
overwrites the same object instead of adding a duplicate (§9 g).

Every PUT carries the same object options (`object_options`): `Content-Type` (the type of the
stored bytes, `application/gzip` or `application/zstd`; no `Content-Encoding`, so every client
downloads the `.jsonl.gz` bytes as they are — docs/config.md says why), and the storage class
and server-side encryption when configured.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from dataclasses import replace
from urllib.parse import quote

import aiohttp
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.exceptions import (
    BotoCoreError,
    CredentialRetrievalError,
    NoCredentialsError,
    PartialCredentialsError,
    TokenRetrievalError,
)
from yarl import URL

from estat_ingest.config import Settings
from estat_ingest.formats.codec import compress
from estat_ingest.formats.keys import join_key
from estat_ingest.metrics import Metrics
from estat_ingest.sinks.base import OK, Outcome, Payload, Probe, Result, Sink, SinkSpec, outage
from estat_ingest.sinks.opensearch.sigv4 import NoCredentials, SigV4Signer

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


class S3Error(Exception):
    """S3 answered with an error: its HTTP status and, from the XML body, its code and message
    (a HEAD has no body: the code is the status, as botocore reports it)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.status = status
        self.code = code
        self.message = message


_ERROR_FIELDS = re.compile(rb"<(Code|Message)>([^<]*)</(?:Code|Message)>")


def parse_error(status: int, body: bytes) -> S3Error:
    fields = {m.group(1).decode(): m.group(2).decode("utf-8", "replace") for m in _ERROR_FIELDS.finditer(body[:4096])}
    return S3Error(status, fields.get("Code") or str(status), fields.get("Message", ""))


def error_text(err: BaseException) -> str:
    """A short text for the log line: S3's error code and message (`NoSuchBucket: The specified
    bucket does not exist`), else the exception's type and text."""
    if isinstance(err, S3Error):
        text = (f"{err.code}: {err.message}" if err.code and err.message
                else err.code or err.message or f"HTTP {err.status}")
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


# PutObject parameters (object_options) -> their request headers
_HEADER_OF = {"ContentType": "Content-Type", "ContentEncoding": "Content-Encoding",
              "StorageClass": "x-amz-storage-class", "ServerSideEncryption": "x-amz-server-side-encryption",
              "SSEKMSKeyId": "x-amz-server-side-encryption-aws-kms-key-id"}


def object_headers(options: dict[str, str]) -> dict[str, str]:
    return {_HEADER_OF[k]: v for k, v in options.items()}


def classify_client_error(err: S3Error) -> Result:
    code, status = err.code, err.status
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


CREDENTIAL_ERRORS = (NoCredentialsError, PartialCredentialsError, CredentialRetrievalError, TokenRetrievalError)


class S3Client:
    """The three S3 requests this sink makes, signed with botocore's S3 signer (module docstring)."""

    def __init__(self, settings: Settings) -> None:
        self.region = settings.aws_region or "us-east-1"
        self.endpoint = (settings.s3_endpoint_url or "").rstrip("/")
        self.timeout_s = settings.s3_timeout_s
        self.pool = max(10, settings.upload_concurrency * 2 + settings.dlq_replay_concurrency)
        self.signer = SigV4Signer("s3", self.region)
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        await self.signer.start()
        t = self.timeout_s
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.pool),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=t, sock_read=t),
            auto_decompress=False, skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"))

    async def aclose(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    def url(self, bucket: str, key: str) -> str:
        path = quote(key, safe="/~")  # sent as is and signed as is (S3 does not normalise paths)
        if self.endpoint:
            return f"{self.endpoint}/{bucket}/{path}" if key else f"{self.endpoint}/{bucket}"
        suffix = "amazonaws.com.cn" if self.region.startswith("cn-") else "amazonaws.com"
        if "." in bucket:  # a dotted name does not match the TLS certificate's wildcard
            return f"https://s3.{self.region}.{suffix}/{bucket}/{path}"
        return f"https://{bucket}.s3.{self.region}.{suffix}/{path}"

    async def request(self, method: str, bucket: str, key: str, body: bytes = b"",
                      headers: dict[str, str] | None = None) -> None:
        """One request; S3Error for an error answer. Raises credential, connection and timeout
        errors as they come (S3Sink.put classifies them)."""
        assert self.session is not None, "S3Client.start() first"
        try:
            creds = await self.signer.frozen()
        except NoCredentials:
            raise NoCredentialsError() from None
        url = self.url(bucket, key)
        req = AWSRequest(method=method, url=url, data=body or None, headers=dict(headers or {}))
        S3SigV4Auth(creds, "s3", self.region).add_auth(req)
        async with self.session.request(method, URL(url, encoded=True), data=body or None,
                                        headers=dict(req.headers.items())) as resp:
            if resp.status >= 300:
                raise parse_error(resp.status, await resp.read() if method != "HEAD" else b"")
            await resp.release()


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
        self.headers = object_headers(self.options)
        self._client = S3Client(settings)

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
        await self._client.start()

    async def put(self, key: str, payload: Payload) -> Result:
        try:
            await self._client.request("PUT", self.bucket, key, payload.data, self.headers)
        except S3Error as err:
            return replace(classify_client_error(err), error=error_text(err))
        except CREDENTIAL_ERRORS as err:
            return outage("auth", error=error_text(err))
        except TimeoutError as err:  # S3_TIMEOUT is also the connect and read timeout
            return Result(Outcome.RETRY, "timeout", error=error_text(err))
        except (aiohttp.ClientError, OSError) as err:
            return Result(Outcome.RETRY, "connection", error=error_text(err))
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
                    await self._client.request("PUT", self.bucket, key, body, self.headers)
            except Exception as err:  # every failure is a line for the operator, none a traceback
                problem = self._probe_problem(err, var, url)
                return Probe("", (problem,))
            written.append(url)
            try:
                async with asyncio.timeout(self.spec.timeout_s):
                    await self._client.request("DELETE", self.bucket, key)
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
        code = err.code if isinstance(err, S3Error) else ""
        status = err.status if isinstance(err, S3Error) else 0
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
        if isinstance(err, (aiohttp.ClientError, OSError)):
            where = self.settings.s3_endpoint_url or "S3"
            return f"cannot reach {where}: {text}"
        return f"cannot write {url}: {text}"

    async def check(self) -> None:
        try:
            await self._client.request("HEAD", self.bucket, "")
        except Exception as err:  # a probe: report, never fail start-up
            log.warning("s3 bucket check failed", extra={"sink": "s3", "bucket": self.bucket,
                                                          "error": f"{type(err).__name__}: {err}"[:300]})

    async def aclose(self) -> None:
        await self._client.aclose()

"""Configuration: the ONLY module that reads the environment.

`Settings.from_env(env)` parses every variable once, checks its range, and returns one frozen
object. A bad value raises `ConfigError` whose message is one line naming the variable, the value
and what was expected; `serve` prints it and exits 2 before it listens.

Units are in the attribute names (`flush_interval_s`, `max_body_bytes`); the environment keeps the
names of DESIGN.md §6 (v1's names unchanged).
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

T = TypeVar("T")

SINK_NAMES = ("s3", "file", "opensearch")
SECRET_FIELDS = frozenset({"api_keys", "opensearch_password"})

DEFAULT_TRUSTED_PROXIES = (
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "127.0.0.0/8",
    "::1/128",
    "fc00::/7",
)


class ConfigError(ValueError):
    """One bad variable: str(err) is the single line printed at start-up."""


# --------------------------------------------------------------------------------------------
# value parsers (pure; each raises ValueError with what it expected)

_DURATION_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Go-style duration (`500ms`, `120s`, `1m30s`, `24h`) → seconds. A bare `0` is allowed."""
    s = text.strip()
    if s == "0":
        return 0.0
    if not s:
        raise ValueError("a Go-style duration such as 500ms, 120s, 1m30s or 24h")
    pos, total = 0, 0.0
    for m in _DURATION_RE.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if pos != len(s):
        raise ValueError("a Go-style duration such as 500ms, 120s, 1m30s or 24h")
    return total


_SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?)([bB]?)$")
_SIZE_POW = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_size(text: str) -> int:
    """Bytes: `16384`, `64KB`, `18GB` (powers of 1000), `512MiB` (powers of 1024)."""
    m = _SIZE_RE.match(text.strip())
    if not m or (m.group(2) == "" and m.group(3)):
        raise ValueError("a size in bytes such as 16384, 64KiB, 512MiB or 18GB")
    number, unit, binary = float(m.group(1)), m.group(2).lower(), m.group(3)
    base = 1024 if binary else 1000
    value = number * base ** _SIZE_POW[unit]
    if value != int(value):
        raise ValueError("a whole number of bytes")
    return int(value)


def parse_bool(text: str) -> bool:
    s = text.strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise ValueError("true or false")


def parse_int(text: str) -> int:
    try:
        return int(text.strip(), 10)
    except ValueError:
        raise ValueError("a whole number") from None


def parse_list(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def parse_addr(text: str) -> tuple[str, int]:
    """`:8080`, `0.0.0.0:8080`, `127.0.0.1:0`, `[::]:8080` → (host, port); empty host = all."""
    s = text.strip()
    host, sep, port_s = s.rpartition(":")
    if not sep or not port_s.isdigit():
        raise ValueError("host:port such as :8080 or 127.0.0.1:8080")
    port = int(port_s)
    if not 0 <= port <= 65535:
        raise ValueError("a port from 0 to 65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or "0.0.0.0", port


def parse_api_keys(text: str) -> tuple[tuple[str, str], ...]:
    out: list[tuple[str, str]] = []
    for item in parse_list(text):
        name, sep, key = item.partition(":")
        if not sep or not name.strip() or not key.strip():
            raise ValueError("name:key pairs separated by commas")
        out.append((name.strip(), key.strip()))
    if len({n for n, _ in out}) != len(out):
        raise ValueError("unique key names")
    return tuple(out)


def parse_cidrs(text: str) -> tuple[str, ...]:
    items = parse_list(text)
    for item in items:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError("comma-separated CIDRs such as 10.0.0.0/8,127.0.0.1/32") from None
    return items


def parse_tz(text: str) -> str:
    try:
        ZoneInfo(text.strip())
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError("an IANA time zone such as Asia/Seoul or UTC") from None
    return text.strip()


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        s = text.strip().lower()
        if s not in allowed:
            raise ValueError("one of " + ", ".join(allowed))
        return s

    return parse


_INDEX_BAD = set('\\/*?"<>| ,#:')


def index_name_ok(template: str) -> bool:
    """OpenSearch index rules on the name the strftime template renders (a sample date; the
    directives themselves may be upper case, `%Y`): lower case, none of \\ / * ? " < > | , # : or
    space, not starting with - _ +, not . or .., at most 255 bytes."""
    from datetime import datetime

    try:
        name = datetime(2025, 12, 31, 23, 59, 59).strftime(template)
    except ValueError:
        return False
    return (bool(name) and name == name.lower() and not (set(name) & _INDEX_BAD)
            and not name.startswith(("-", "_", "+")) and name not in (".", "..")
            and len(name.encode()) <= 255)


def _sinks(text: str) -> tuple[str, ...]:
    items = tuple(s.lower() for s in parse_list(text))
    if not items or any(s not in SINK_NAMES for s in items) or len(set(items)) != len(items):
        raise ValueError("a comma list of distinct sinks from " + ", ".join(SINK_NAMES))
    return items


def default_instance_id() -> str:
    return socket.gethostname() or "estat"


# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Settings:
    # HTTP
    http_host: str = "0.0.0.0"
    http_port: int = 8080
    max_body_bytes: int = 16384
    validate_json: bool = True
    http_front: str = "fast"
    # pipeline
    channel_size: int = 4000
    buffer_max_bytes: int = 96 * 1024 * 1024
    batch_max_events: int = 5000
    batch_max_bytes: int = 64 * 1024 * 1024
    flush_interval_s: float = 120.0
    upload_queue_batches: int = 4
    upload_concurrency: int = 2
    compression: str = "gzip"
    gzip_level: int = 1
    zstd_level: int = 3
    sinks: tuple[str, ...] = ("file",)
    # S3
    aws_region: str = ""
    raw_bucket: str = ""
    raw_prefix: str = "raw"
    dlq_prefix: str = "raw_dlq"
    s3_endpoint_url: str = ""
    s3_timeout_s: float = 3.0
    s3_app_retries: int = 2
    # file sink
    file_sink_dir: str = "./data"
    # OpenSearch
    opensearch_urls: tuple[str, ...] = ()
    opensearch_index: str = "events-%Y.%m.%d"
    opensearch_index_tz: str = "UTC"
    opensearch_username: str = ""
    opensearch_password: str = ""
    opensearch_aws_sigv4: bool = False
    opensearch_aws_service: str = "es"
    opensearch_ca_bundle: str = ""
    opensearch_verify_tls: bool = True
    opensearch_timeout_s: float = 10.0
    opensearch_retries: int = 2
    opensearch_gzip: bool = False
    opensearch_data_stream: bool = False
    bulk_batch_size: int = 500
    bulk_batch_bytes: int = 5 * 1024 * 1024
    bulk_flush_interval_s: float = 1.0
    bulk_max_parallel_flushes: int = 1
    # DLQ
    dlq_dir: str = "/tmp/dlq"
    dlq_max_age_s: float = 24 * 3600.0
    dlq_max_size_bytes: int = 18 * 1000**3
    dlq_min_free_bytes: int = 512 * 1024 * 1024
    dlq_scan_limit: int = 1000
    dlq_max_attempts: int = 20
    dlq_replay_concurrency: int = 1
    dlq_claim_timeout_s: float = 300.0
    # acknowledgements (DESIGN.md §10)
    ack_mode: str = "memory"  # memory: 2xx once queued; durable: 2xx once fsynced in the spool
    spool_dir: str = ""  # "" = DLQ_DIR/spool
    spool_adopt_after_s: float = 60.0
    # lifecycle
    shutdown_timeout_s: float = 25.0
    partition_tz: str = "Asia/Seoul"
    instance_id: str = field(default_factory=default_instance_id)
    workers: int = 1
    # edge
    api_keys: tuple[tuple[str, str], ...] = ()
    cors_allow_origins: tuple[str, ...] = ()
    trusted_proxies: tuple[str, ...] = DEFAULT_TRUSTED_PROXIES
    store_cookies: bool = True
    cookie_allowlist: tuple[str, ...] = ()
    # edge limits (issue 5): header line size and count, body read deadline, concurrency, JSON depth
    max_header_bytes: int = 8190
    max_headers: int = 100
    request_read_timeout_s: float = 10.0
    max_in_flight: int = 1024
    max_json_depth: int = 64
    record_api_key_name: bool = False
    header_read_timeout_s: float = 20.0
    # logs
    log_level: str = "info"
    log_format: str = "json"

    @property
    def ext(self) -> str:
        return ".jsonl.zst" if self.compression == "zstd" else ".jsonl.gz"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Parse `env` (default: os.environ). `overrides` replace parsed values (tests, CLI)."""
        e = os.environ if env is None else env
        values: dict[str, Any] = {}

        def get(
            name: str, parse: Callable[[str], T], ok: Callable[[T], bool] | None = None, expect: str = ""
        ) -> T | None:
            raw = e.get(name)
            if raw is None or raw.strip() == "":
                return None
            try:
                value = parse(raw)
            except ValueError as err:
                raise ConfigError(f"{name}={raw!r} is invalid: expected {err}") from None
            if ok is not None and not ok(value):
                raise ConfigError(f"{name}={raw!r} is out of range: expected {expect}")
            return value

        def put(attr: str, value: Any) -> None:
            if value is not None:
                values[attr] = value

        nonneg: Callable[[Any], bool] = lambda v: v >= 0  # noqa: E731

        addr = get("HTTP_ADDR", parse_addr)
        if addr is not None:
            values["http_host"], values["http_port"] = addr
        put("max_body_bytes", get("MAX_BODY_SIZE", parse_size, lambda v: 1 <= v <= 64 * 1024**2,
                                  "1 byte to 64MiB"))
        put("validate_json", get("VALIDATE_JSON", parse_bool))
        put("http_front", get("HTTP_FRONT", _choice("aiohttp", "fast")))
        put("channel_size", get("CHANNEL_SIZE", parse_int, lambda v: 1 <= v <= 10_000_000,
                                "1 to 10000000 events"))
        put("buffer_max_bytes", get("BUFFER_MAX_BYTES", parse_size, lambda v: 1024**2 <= v <= 64 * 1024**3,
                                    "1MiB to 64GiB"))
        put("batch_max_events", get("BATCH_SIZE", parse_int, lambda v: 1 <= v <= 10_000_000,
                                    "1 to 10000000 events"))
        put("batch_max_bytes", get("BATCH_MAX_BYTES", parse_size, lambda v: 1024 <= v <= 4 * 1024**3,
                                   "1KiB to 4GiB"))
        put("flush_interval_s", get("FLUSH_INTERVAL", parse_duration, lambda v: 0.01 <= v <= 86400,
                                    "10ms to 24h"))
        put("upload_queue_batches", get("UPLOAD_QUEUE", parse_int, lambda v: 1 <= v <= 1000,
                                        "1 to 1000 batches"))
        put("upload_concurrency", get("UPLOAD_CONCURRENCY", parse_int, lambda v: 1 <= v <= 64, "1 to 64"))
        put("compression", get("COMPRESSION", _choice("gzip", "zstd")))
        put("gzip_level", get("GZIP_LEVEL", parse_int, lambda v: 1 <= v <= 9, "1 to 9"))
        put("zstd_level", get("ZSTD_LEVEL", parse_int, lambda v: 1 <= v <= 19, "1 to 19"))
        # S3
        put("aws_region", get("AWS_REGION", str.strip))
        put("raw_bucket", get("RAW_BUCKET", str.strip))
        put("raw_prefix", get("RAW_PREFIX", lambda s: s.strip().strip("/")))
        put("dlq_prefix", get("DLQ_PREFIX", lambda s: s.strip().strip("/")))
        put("s3_endpoint_url", get("S3_ENDPOINT_URL", str.strip, lambda v: v.startswith(("http://", "https://")),
                                   "an http:// or https:// URL"))
        put("s3_timeout_s", get("S3_TIMEOUT", parse_duration, lambda v: 0.05 <= v <= 600, "50ms to 10m"))
        put("s3_app_retries", get("S3_APP_RETRIES", parse_int, lambda v: 0 <= v <= 100,
                                  "0 to 100 retries after the first attempt"))
        put("file_sink_dir", get("FILE_SINK_DIR", str.strip))
        # OpenSearch
        put("opensearch_urls", get("OPENSEARCH_URL", parse_list,
                                   lambda v: all(u.startswith(("http://", "https://")) for u in v),
                                   "comma-separated http:// or https:// URLs"))
        put("opensearch_index", get("OPENSEARCH_INDEX", str.strip, index_name_ok,
                                    "an index name template such as events-%Y.%m.%d that renders lower case, "
                                    "without spaces or \\ / * ? \" < > | , # :"))
        put("opensearch_index_tz", get("OPENSEARCH_INDEX_TZ", parse_tz))
        put("opensearch_username", get("OPENSEARCH_USERNAME", str.strip))
        put("opensearch_password", get("OPENSEARCH_PASSWORD", str))
        put("opensearch_aws_sigv4", get("OPENSEARCH_AWS_SIGV4", parse_bool))
        put("opensearch_aws_service", get("OPENSEARCH_AWS_SERVICE", _choice("es", "aoss")))
        put("opensearch_ca_bundle", get("OPENSEARCH_CA_BUNDLE", str.strip, os.path.isfile,
                                        "the path of an existing PEM file"))
        put("opensearch_verify_tls", get("OPENSEARCH_VERIFY_TLS", parse_bool))
        put("opensearch_timeout_s", get("OPENSEARCH_TIMEOUT", parse_duration, lambda v: 0.05 <= v <= 600,
                                        "50ms to 10m"))
        put("opensearch_retries", get("OPENSEARCH_RETRIES", parse_int, lambda v: 0 <= v <= 100, "0 to 100"))
        put("opensearch_gzip", get("OPENSEARCH_GZIP", parse_bool))
        put("opensearch_data_stream", get("OPENSEARCH_DATA_STREAM", parse_bool))
        put("bulk_batch_size", get("BULK_BATCH_SIZE", parse_int, lambda v: 1 <= v <= 100_000,
                                   "1 to 100000 documents"))
        mb = get("BULK_BATCH_BYTES_MB", parse_int, lambda v: 1 <= v <= 1024, "1 to 1024 MB")
        put("bulk_batch_bytes", None if mb is None else mb * 1024 * 1024)
        ms = get("BULK_FLUSH_INTERVAL_MS", parse_int, lambda v: 10 <= v <= 86_400_000, "10 to 86400000 ms")
        put("bulk_flush_interval_s", None if ms is None else ms / 1000.0)
        put("bulk_max_parallel_flushes", get("BULK_MAX_PARALLEL_FLUSHES", parse_int, lambda v: 1 <= v <= 64,
                                             "1 to 64"))
        # DLQ
        put("dlq_dir", get("DLQ_DIR", str.strip))
        put("dlq_max_age_s", get("DLQ_MAX_AGE", parse_duration, nonneg, "0 (never expire) or more"))
        put("dlq_max_size_bytes", get("DLQ_MAX_SIZE_BYTES", parse_size, nonneg, "0 (no cap) or more bytes"))
        put("dlq_min_free_bytes", get("DLQ_MIN_FREE_BYTES", parse_size, nonneg, "0 or more bytes"))
        put("dlq_scan_limit", get("DLQ_SCAN_LIMIT", parse_int, lambda v: 10 <= v <= 1_000_000,
                                  "10 to 1000000 entries"))
        put("dlq_max_attempts", get("DLQ_MAX_ATTEMPTS", parse_int, lambda v: 1 <= v <= 100_000,
                                    "1 to 100000"))
        put("dlq_replay_concurrency", get("DLQ_REPLAY_CONCURRENCY", parse_int, lambda v: 1 <= v <= 64,
                                          "1 to 64"))
        put("dlq_claim_timeout_s", get("DLQ_CLAIM_TIMEOUT", parse_duration, lambda v: 1 <= v <= 86400,
                                       "1s to 24h"))
        # acknowledgements
        put("ack_mode", get("ACK_MODE", _choice("memory", "durable")))
        put("spool_dir", get("SPOOL_DIR", str.strip))
        put("spool_adopt_after_s", get("SPOOL_ADOPT_AFTER", parse_duration, lambda v: 1 <= v <= 86400,
                                       "1s to 24h"))
        # lifecycle
        put("shutdown_timeout_s", get("SHUTDOWN_TIMEOUT", parse_duration, lambda v: 0.1 <= v <= 3600,
                                      "100ms to 1h"))
        put("partition_tz", get("PARTITION_TZ", parse_tz))
        put("instance_id", get("INSTANCE_ID", str.strip, lambda v: re.fullmatch(r"[A-Za-z0-9._-]{1,64}", v)
                               is not None, "1-64 characters from A-Z a-z 0-9 . _ -"))
        put("workers", get("WORKERS", parse_int, lambda v: 1 <= v <= 256, "1 to 256"))
        # edge
        put("api_keys", get("API_KEYS", parse_api_keys))
        put("cors_allow_origins", get("CORS_ALLOW_ORIGINS", parse_list))
        put("trusted_proxies", get("TRUSTED_PROXIES", parse_cidrs))
        put("store_cookies", get("STORE_COOKIES", parse_bool))
        put("cookie_allowlist", get("COOKIE_ALLOWLIST", parse_list))
        put("max_header_bytes", get("MAX_HEADER_BYTES", parse_size, lambda v: 1024 <= v <= 1024**2,
                                    "1KiB to 1MiB per header line"))
        put("max_headers", get("MAX_HEADERS", parse_int, lambda v: 8 <= v <= 1000, "8 to 1000 headers"))
        put("request_read_timeout_s", get("REQUEST_READ_TIMEOUT", parse_duration, lambda v: 0.1 <= v <= 600,
                                          "100ms to 10m"))
        put("max_in_flight", get("MAX_IN_FLIGHT", parse_int, lambda v: 1 <= v <= 1_000_000,
                                 "1 to 1000000 requests"))
        put("max_json_depth", get("MAX_JSON_DEPTH", parse_int, lambda v: 1 <= v <= 512, "1 to 512 levels"))
        put("record_api_key_name", get("RECORD_API_KEY_NAME", parse_bool))
        put("header_read_timeout_s", get("HEADER_READ_TIMEOUT", parse_duration, lambda v: 0.5 <= v <= 600,
                                         "500ms to 10m"))
        put("log_level", get("LOG_LEVEL", _choice("debug", "info", "warning", "error")))
        put("log_format", get("LOG_FORMAT", _choice("json", "text")))

        sinks = get("SINKS", _sinks)
        if sinks is None:
            sinks = ("s3",) if values.get("raw_bucket") else ("file",)
        values["sinks"] = sinks
        values.update(overrides)
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        """Cross-variable rules (one line each, like the per-variable ones)."""
        if "s3" in self.sinks and not self.raw_bucket:
            raise ConfigError("RAW_BUCKET='' is invalid: expected a bucket name when SINKS includes s3")
        if "opensearch" in self.sinks and not self.opensearch_urls:
            raise ConfigError("OPENSEARCH_URL='' is invalid: expected a URL when SINKS includes opensearch")
        if self.opensearch_password and not self.opensearch_username:
            raise ConfigError("OPENSEARCH_USERNAME='' is invalid: expected a user name with OPENSEARCH_PASSWORD")
        if self.opensearch_aws_sigv4 and self.opensearch_username:
            raise ConfigError("OPENSEARCH_AWS_SIGV4='true' is invalid: expected either SigV4 or basic auth, "
                              "not both")
        if self.opensearch_aws_sigv4 and not self.aws_region:
            raise ConfigError("AWS_REGION='' is invalid: expected a region when OPENSEARCH_AWS_SIGV4=true")

    def describe(self) -> dict[str, Any]:
        """Effective configuration with secrets masked (for `config show` and the start-up log)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "api_keys":
                value = [f"{name}:***" for name, _ in value]
            elif f.name in SECRET_FIELDS and value:
                value = "***"
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out


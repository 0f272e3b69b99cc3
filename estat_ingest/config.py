"""Configuration: the ONLY module that reads the environment.

`VARIABLES` is the table of every variable: its Settings field, parser, range and how its value is
shown. `Settings.from_env(env)` parses every variable once, checks its range, and returns one
frozen object. Bad values raise one `ConfigError` listing every bad variable, one line each,
naming the variable, the value (a secret's masked) and what was expected; `serve` prints them and
exits 2 before it starts anything.

No secret leaves this module in clear: `describe()` (config show, the start-up log), error lines
and `repr()` mask API keys, passwords and URL user-info; `secret_values()` lists them for the log
redaction of log.py.

Units are in the attribute names (`flush_interval_s`, `max_body_bytes`); the environment keeps the
names of DESIGN.md §6 (v1's names unchanged).
"""

from __future__ import annotations

import base64
import ipaddress
import os
import re
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

SINK_NAMES = ("s3", "file", "opensearch")

DEFAULT_TRUSTED_PROXIES = (
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "127.0.0.0/8",
    "::1/128",
    "fc00::/7",
)


class ConfigError(ValueError):
    """Bad configuration: `problems` has one line per bad variable; str(err) joins them with
    newlines (one problem: its single line)."""

    def __init__(self, problems: str | Sequence[str], *, settings: Settings | None = None,
                 failed: frozenset[str] = frozenset()) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        # from_env: what it could build, with each bad variable (`failed`) at its default, so that
        # `validate` can go on checking the rest (directories) and report everything at once
        self.settings = settings
        self.failed = failed
        super().__init__("\n".join(self.problems))


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


def _canonical(*allowed: str) -> Callable[[str], str]:
    """One of `allowed`, matched without regard to case and returned as spelt there (the AWS API
    wants `STANDARD_IA` and `aws:kms` exactly)."""
    by_lower = {a.lower(): a for a in allowed}

    def parse(text: str) -> str:
        value = by_lower.get(text.strip().lower())
        if value is None:
            raise ValueError("one of " + ", ".join(allowed))
        return value

    return parse


# PutObject's StorageClass values for general purpose buckets (EXPRESS_ONEZONE: directory buckets)
S3_STORAGE_CLASSES = ("STANDARD", "STANDARD_IA", "ONEZONE_IA", "INTELLIGENT_TIERING", "GLACIER_IR", "GLACIER",
                      "DEEP_ARCHIVE", "REDUCED_REDUNDANCY", "EXPRESS_ONEZONE")
S3_SSE_ALGORITHMS = ("AES256", "aws:kms", "aws:kms:dsse")


def _sinks(text: str) -> tuple[str, ...]:
    items = tuple(s.lower() for s in parse_list(text))
    if not items or any(s not in SINK_NAMES for s in items) or len(set(items)) != len(items):
        raise ValueError("a comma list of distinct sinks from " + ", ".join(SINK_NAMES))
    return items


def default_instance_id() -> str:
    return socket.gethostname() or "estat"


# --------------------------------------------------------------------------------------------
# showing values: each variable's value as the environment would spell it, secrets masked

_USERINFO_RE = re.compile(r"(?<=://)[^/\s]*@")


def mask_userinfo(text: str) -> str:
    """`scheme://user:pass@host` → `scheme://***@host`, for every URL in `text`."""
    return _USERINFO_RE.sub("***@", text)


def format_duration(seconds: float) -> str:
    """Seconds → a duration `parse_duration` reads back: `24h`, `120s`, `500ms`, `0`."""
    if seconds == 0:
        return "0"
    ms = round(seconds * 1000, 3)
    if ms % 1000 == 0:
        whole = int(ms // 1000)
        return f"{whole // 3600}h" if whole % 3600 == 0 else f"{whole}s"
    if float(ms).is_integer():
        return f"{int(ms)}ms"
    return f"{round(seconds * 1e6)}us"


def format_size(n: int) -> str:
    """Bytes → the shortest exact spelling `parse_size` reads back: `64MiB`, `18GB`, `16384`."""
    spellings = [str(n)]
    for power, letter in enumerate("KMGT", start=1):
        if n and n % 1024**power == 0:
            spellings.append(f"{n // 1024**power}{letter}iB")
        if n and n % 1000**power == 0:
            spellings.append(f"{n // 1000**power}{letter}B")
    return min(spellings, key=len)


def _show_bool(value: bool) -> str:
    return "true" if value else "false"


def _show_list(value: tuple[str, ...]) -> str:
    return ",".join(value)


def _show_addr(value: tuple[str, int]) -> str:
    host, port = value
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _show_opt_addr(value: tuple[str, int]) -> str:
    return _show_addr(value) if value[0] else ""


def _show_api_keys(value: tuple[tuple[str, str], ...]) -> str:
    return ",".join(f"{name}:***" for name, _ in value)


def _show_secret(value: str) -> str:
    return "***" if value else ""


def _mask_api_keys_text(raw: str) -> str:
    """A raw API_KEYS value with every key masked (names kept); an item without a `:` may be a
    key itself, so it is masked whole."""
    items = []
    for item in raw.split(","):
        name, sep, _ = item.partition(":")
        items.append(f"{name}:***" if sep else ("***" if item.strip() else item))
    return ",".join(items)


_SHOW_FOR: dict[Callable[..., Any], Callable[[Any], str]] = {
    parse_duration: format_duration,
    parse_size: format_size,
    parse_bool: _show_bool,
    parse_list: _show_list,
    parse_cidrs: _show_list,
    _sinks: _show_list,
    parse_addr: _show_addr,
}

MiB = 1024 * 1024
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::"})


# --------------------------------------------------------------------------------------------
# the variables


@dataclass(frozen=True, slots=True)
class Var:
    """One environment variable: the Settings field(s) it sets, how its text is parsed and range
    checked, and how its value is shown (`config show`, the start-up log)."""

    name: str
    attr: str | tuple[str, ...]  # a tuple when the parsed value is a tuple spread over fields
    parse: Callable[[str], Any]
    ok: Callable[[Any], bool] | None = None
    expect: str = ""  # what `ok` accepts, for the error line
    show: Callable[[Any], str] | None = None  # default: by `parse` (_SHOW_FOR), else str()
    mask_raw: Callable[[str], str] | None = None  # a secret: how its raw text appears in an error line

    def value_of(self, settings: Settings) -> Any:
        if isinstance(self.attr, tuple):
            return tuple(getattr(settings, a) for a in self.attr)
        return getattr(settings, self.attr)

    def shown(self, settings: Settings) -> str:
        show = self.show or _SHOW_FOR.get(self.parse, str)
        return mask_userinfo(show(self.value_of(settings)))

    def shown_raw(self, raw: str) -> str:
        return mask_userinfo(self.mask_raw(raw) if self.mask_raw else raw)


def _range(lo: float, hi: float) -> Callable[[Any], bool]:
    return lambda v: lo <= v <= hi


def _nonneg(v: Any) -> bool:
    return bool(v >= 0)


def _url(v: str) -> bool:
    return v.startswith(("http://", "https://"))


def _prefix(text: str) -> str:
    return text.strip().strip("/")


def _mib(text: str) -> int:
    return parse_int(text) * MiB


def _ms(text: str) -> float:
    return parse_int(text) / 1000.0


# In the order of docs/config.md. Every variable is optional: unset or empty keeps the default.
VARIABLES: tuple[Var, ...] = (
    # HTTP
    Var("HTTP_ADDR", ("http_host", "http_port"), parse_addr),
    Var("METRICS_ADDR", ("metrics_host", "metrics_port"), parse_addr, show=_show_opt_addr),
    Var("MAX_BODY_SIZE", "max_body_bytes", parse_size, _range(1, 64 * MiB), "1 byte to 64MiB"),
    Var("VALIDATE_JSON", "validate_json", parse_bool),
    Var("MAX_JSON_DEPTH", "max_json_depth", parse_int, _range(1, 512), "1 to 512 levels"),
    Var("HTTP_FRONT", "http_front", _choice("aiohttp", "fast")),
    Var("MAX_HEADER_BYTES", "max_header_bytes", parse_size, _range(1024, MiB), "1KiB to 1MiB per header line"),
    Var("MAX_HEADERS", "max_headers", parse_int, _range(8, 1000), "8 to 1000 headers"),
    Var("REQUEST_READ_TIMEOUT", "request_read_timeout_s", parse_duration, _range(0.1, 600), "100ms to 10m"),
    Var("HEADER_READ_TIMEOUT", "header_read_timeout_s", parse_duration, _range(0.5, 600), "500ms to 10m"),
    Var("MAX_IN_FLIGHT", "max_in_flight", parse_int, _range(1, 1_000_000), "1 to 1000000 requests"),
    # edge and privacy
    Var("API_KEYS", "api_keys", parse_api_keys, show=_show_api_keys, mask_raw=_mask_api_keys_text),
    Var("CORS_ALLOW_ORIGINS", "cors_allow_origins", parse_list),
    Var("TRUSTED_PROXIES", "trusted_proxies", parse_cidrs),
    Var("STORE_COOKIES", "store_cookies", parse_bool),
    Var("RECORD_API_KEY_NAME", "record_api_key_name", parse_bool),
    Var("COOKIE_ALLOWLIST", "cookie_allowlist", parse_list),
    # pipeline
    Var("SINKS", "sinks", _sinks),
    Var("CHANNEL_SIZE", "channel_size", parse_int, _range(1, 10_000_000), "1 to 10000000 events"),
    Var("BUFFER_MAX_BYTES", "buffer_max_bytes", parse_size, _range(MiB, 64 * 1024**3), "1MiB to 64GiB"),
    Var("BATCH_SIZE", "batch_max_events", parse_int, _range(1, 10_000_000), "1 to 10000000 events"),
    Var("BATCH_MAX_BYTES", "batch_max_bytes", parse_size, _range(1024, 4 * 1024**3), "1KiB to 4GiB"),
    Var("FLUSH_INTERVAL", "flush_interval_s", parse_duration, _range(0.01, 86400), "10ms to 24h"),
    Var("UPLOAD_QUEUE", "upload_queue_batches", parse_int, _range(1, 1000), "1 to 1000 batches"),
    Var("UPLOAD_CONCURRENCY", "upload_concurrency", parse_int, _range(1, 64), "1 to 64"),
    Var("COMPRESSION", "compression", _choice("gzip", "zstd")),
    Var("GZIP_LEVEL", "gzip_level", parse_int, _range(1, 9), "1 to 9"),
    Var("ZSTD_LEVEL", "zstd_level", parse_int, _range(1, 19), "1 to 19"),
    # S3
    Var("AWS_REGION", "aws_region", str.strip),
    Var("RAW_BUCKET", "raw_bucket", str.strip),
    Var("RAW_PREFIX", "raw_prefix", _prefix),
    Var("DLQ_PREFIX", "dlq_prefix", _prefix),
    Var("S3_ENDPOINT_URL", "s3_endpoint_url", str.strip, _url, "an http:// or https:// URL"),
    Var("S3_TIMEOUT", "s3_timeout_s", parse_duration, _range(0.05, 600), "50ms to 10m"),
    Var("S3_APP_RETRIES", "s3_app_retries", parse_int, _range(0, 100), "0 to 100 retries after the first attempt"),
    Var("S3_STORAGE_CLASS", "s3_storage_class", _canonical(*S3_STORAGE_CLASSES)),
    Var("S3_SSE", "s3_sse", _canonical(*S3_SSE_ALGORITHMS)),
    Var("S3_SSE_KMS_KEY_ID", "s3_sse_kms_key_id", str.strip),
    Var("S3_CONTENT_ENCODING", "s3_content_encoding", parse_bool),
    # file sink
    Var("FILE_SINK_DIR", "file_sink_dir", str.strip),
    # OpenSearch
    Var("OPENSEARCH_URL", "opensearch_urls", parse_list, lambda v: all(_url(u) for u in v),
        "comma-separated http:// or https:// URLs"),
    Var("OPENSEARCH_INDEX", "opensearch_index", str.strip, index_name_ok,
        "an index name template such as events-%Y.%m.%d that renders lower case, "
        "without spaces or \\ / * ? \" < > | , # :"),
    Var("OPENSEARCH_INDEX_TZ", "opensearch_index_tz", parse_tz),
    Var("OPENSEARCH_DATA_STREAM", "opensearch_data_stream", parse_bool),
    Var("OPENSEARCH_USERNAME", "opensearch_username", str.strip),
    Var("OPENSEARCH_PASSWORD", "opensearch_password", str, show=_show_secret, mask_raw=_show_secret),
    Var("OPENSEARCH_AWS_SIGV4", "opensearch_aws_sigv4", parse_bool),
    Var("OPENSEARCH_AWS_SERVICE", "opensearch_aws_service", _choice("es", "aoss")),
    Var("OPENSEARCH_CA_BUNDLE", "opensearch_ca_bundle", str.strip, os.path.isfile, "the path of an existing PEM file"),
    Var("OPENSEARCH_VERIFY_TLS", "opensearch_verify_tls", parse_bool),
    Var("OPENSEARCH_TIMEOUT", "opensearch_timeout_s", parse_duration, _range(0.05, 600), "50ms to 10m"),
    Var("OPENSEARCH_RETRIES", "opensearch_retries", parse_int, _range(0, 100), "0 to 100"),
    Var("OPENSEARCH_GZIP", "opensearch_gzip", parse_bool),
    Var("BULK_BATCH_SIZE", "bulk_batch_size", parse_int, _range(1, 100_000), "1 to 100000 documents"),
    Var("BULK_BATCH_BYTES_MB", "bulk_batch_bytes", _mib, _range(MiB, 1024 * MiB), "1 to 1024 MB",
        show=lambda v: str(v // MiB)),
    Var("BULK_FLUSH_INTERVAL_MS", "bulk_flush_interval_s", _ms, _range(0.01, 86_400), "10 to 86400000 ms",
        show=lambda v: str(round(v * 1000))),
    Var("BULK_MAX_PARALLEL_FLUSHES", "bulk_max_parallel_flushes", parse_int, _range(1, 64), "1 to 64"),
    # DLQ
    Var("DLQ_DIR", "dlq_dir", str.strip),
    Var("DLQ_MAX_AGE", "dlq_max_age_s", parse_duration, _nonneg, "0 (never expire) or more"),
    Var("DLQ_MAX_SIZE_BYTES", "dlq_max_size_bytes", parse_size, _nonneg, "0 (no cap) or more bytes"),
    Var("DLQ_MIN_FREE_BYTES", "dlq_min_free_bytes", parse_size, _nonneg, "0 or more bytes"),
    Var("DLQ_WHEN_FULL", "dlq_when_full", _choice("reject", "drop_oldest")),
    Var("DLQ_SCAN_LIMIT", "dlq_scan_limit", parse_int, _range(10, 1_000_000), "10 to 1000000 entries"),
    Var("DLQ_MAX_ATTEMPTS", "dlq_max_attempts", parse_int, _range(1, 100_000), "1 to 100000"),
    Var("DLQ_REPLAY_CONCURRENCY", "dlq_replay_concurrency", parse_int, _range(1, 64), "1 to 64"),
    Var("DLQ_CLAIM_TIMEOUT", "dlq_claim_timeout_s", parse_duration, _range(1, 86400), "1s to 24h"),
    # acknowledgements (DESIGN.md §10)
    Var("ACK_MODE", "ack_mode", _choice("memory", "durable")),
    Var("SPOOL_DIR", "spool_dir", str.strip),
    Var("SPOOL_ADOPT_AFTER", "spool_adopt_after_s", parse_duration, _range(1, 86400), "1s to 24h"),
    # lifecycle and scale
    Var("SHUTDOWN_TIMEOUT", "shutdown_timeout_s", parse_duration, _range(0.1, 3600), "100ms to 1h"),
    Var("PARTITION_TZ", "partition_tz", parse_tz),
    Var("INSTANCE_ID", "instance_id", str.strip, lambda v: re.fullmatch(r"[A-Za-z0-9._-]{1,64}", v) is not None,
        "1-64 characters from A-Z a-z 0-9 . _ -"),
    Var("WORKERS", "workers", parse_int, _range(1, 256), "1 to 256"),
    # logs
    Var("LOG_LEVEL", "log_level", _choice("debug", "info", "warning", "error")),
    Var("LOG_FORMAT", "log_format", _choice("auto", "json", "text")),
)

# Read only so that their values are redacted from every log line (the AWS SDK reads them itself).
# Shorter values are no real AWS secret (those are 40+ characters) but dummies such as moto's
# "testing", which would blank that word in every line.
AWS_SECRET_VARIABLES = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
AWS_SECRET_MIN_LEN = 16

# v1 names that are no longer read (docs/config.md): ignored, never reported as misspellings.
RETIRED_VARIABLES = frozenset({"LOG_PRETTY", "LOG_SAMPLE_N", "GOMAXPROCS", "S3_MAX_RETRIES"})

# Other programs' variables that sit close to ours (the AWS SDK's, ECS's): never misspellings.
FOREIGN_VARIABLES = frozenset({
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
    "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE", "AWS_ROLE_ARN", "AWS_ROLE_SESSION_NAME", "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN", "AWS_EXECUTION_ENV", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE",
    "AWS_CA_BUNDLE", "AWS_DEFAULT_OUTPUT", "AWS_REGION_NAME", "ECS_CONTAINER_METADATA_URI",
    "ECS_CONTAINER_METADATA_URI_V4",
})

_ENV_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


def misspelt_variables(env: Mapping[str, str] | None = None) -> list[str]:
    """One warning line per variable in `env` that looks like a misspelling of one of ours
    (`BATCHSIZE`, `FLUSH_INTERVALL`, `batch_size`). Names only: a value may be a secret."""
    import difflib

    e = os.environ if env is None else env
    ours = [v.name for v in VARIABLES]
    known = set(ours) | RETIRED_VARIABLES | FOREIGN_VARIABLES
    out = []
    for name in sorted(e):
        if name in known or not _ENV_NAME_RE.fullmatch(name):
            continue
        upper = name.upper()
        close = [upper] if upper in ours else difflib.get_close_matches(upper, ours, 3, 0.8)
        if close:
            # OPENSEARCH_USER: OPENSEARCH_USERNAME, which it begins, rather than the nearer OPENSEARCH_URL
            best = next((c for c in close if c.startswith(upper)), close[0])
            out.append(f"{name} is not a variable estat-ingest reads: did you mean {best}?")
    return out


# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, repr=False)
class Settings:
    # HTTP
    http_host: str = "0.0.0.0"
    http_port: int = 8080
    metrics_host: str = ""  # METRICS_ADDR: "" = unset (/metrics on the public port)
    metrics_port: int = 0
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
    s3_storage_class: str = ""  # "" = the bucket's default (STANDARD)
    s3_sse: str = ""  # "" = the bucket's default encryption
    s3_sse_kms_key_id: str = ""  # with s3_sse aws:kms / aws:kms:dsse; "" = the AWS managed key
    s3_content_encoding: bool = False  # Content-Encoding: gzip|zstd + application/x-ndjson (Vector's way)
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
    # free-space margin: DLQ_MIN_FREE_BYTES as given; unset, at most 5% of the DLQ's volume and at most
    # this many bytes (`dlq_min_free_auto`), so a small volume is never emptied by the default margin
    dlq_min_free_bytes: int = 512 * 1024 * 1024
    dlq_when_full: str = "reject"  # or drop_oldest (v1: evict the oldest files to make room)
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
    # edge limits: header line size and count, body read deadline, concurrency, JSON depth
    max_header_bytes: int = 8190
    max_headers: int = 100
    request_read_timeout_s: float = 10.0
    max_in_flight: int = 1024
    max_json_depth: int = 64
    record_api_key_name: bool = False
    header_read_timeout_s: float = 20.0
    # logs
    log_level: str = "info"
    log_format: str = "auto"  # auto: text when stdout is a terminal, else json (log.py)

    # bookkeeping of from_env (not configuration: never compared)
    env_names: frozenset[str] = field(default=frozenset(), compare=False)  # variables set in the environment
    override_attrs: frozenset[str] = field(default=frozenset(), compare=False)  # fields set by the CLI
    redact_extra: tuple[str, ...] = field(default=(), compare=False)  # AWS secrets of the environment

    @property
    def dlq_min_free_auto(self) -> bool:
        """DLQ_MIN_FREE_BYTES was not given: `dlq_min_free_bytes` is only the margin's upper bound."""
        return "DLQ_MIN_FREE_BYTES" not in self.env_names and "dlq_min_free_bytes" not in self.override_attrs

    @property
    def ext(self) -> str:
        return ".jsonl.zst" if self.compression == "zstd" else ".jsonl.gz"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Parse `env` (default: os.environ). `overrides` replace parsed values (tests, CLI).

        Every variable is checked before anything is reported: a `ConfigError` lists every bad
        variable, one line each (values of secrets masked)."""
        e = os.environ if env is None else env
        values: dict[str, Any] = {}
        problems: list[str] = []
        failed: set[str] = set()
        set_names: set[str] = set()
        for var in VARIABLES:
            raw = e.get(var.name)
            if raw is None or raw.strip() == "":
                continue
            set_names.add(var.name)
            try:
                value = var.parse(raw)
            except ValueError as err:
                problems.append(f"{var.name}={var.shown_raw(raw)!r} is invalid: expected {err}")
                failed.add(var.name)
                continue
            if var.ok is not None and not var.ok(value):
                problems.append(f"{var.name}={var.shown_raw(raw)!r} is out of range: expected {var.expect}")
                failed.add(var.name)
                continue
            if isinstance(var.attr, tuple):
                values.update(zip(var.attr, value, strict=True))
            else:
                values[var.attr] = value
        if "sinks" not in values:
            values["sinks"] = ("s3",) if values.get("raw_bucket") else ("file",)
        values.update(overrides)
        extra = tuple(v for v in (e.get("AWS_SECRET_ACCESS_KEY"), e.get("AWS_SESSION_TOKEN"))
                      if v and len(v) >= AWS_SECRET_MIN_LEN)
        settings = cls(**values, env_names=frozenset(set_names), override_attrs=frozenset(overrides),
                       redact_extra=extra)
        problems += [line for names, line in settings.rule_problems() if not names & failed]
        if problems:
            raise ConfigError(problems, settings=settings, failed=frozenset(failed))
        return settings

    def rule_problems(self) -> list[tuple[frozenset[str], str]]:
        """Cross-variable rules: (the variables involved, one line) per broken rule."""
        out: list[tuple[frozenset[str], str]] = []

        def rule(names: str, line: str) -> None:
            out.append((frozenset(names.split()), line))

        if "s3" in self.sinks and not self.raw_bucket:
            rule("SINKS RAW_BUCKET", "RAW_BUCKET='' is invalid: expected a bucket name when SINKS includes s3")
        if "opensearch" in self.sinks and not self.opensearch_urls:
            rule("SINKS OPENSEARCH_URL",
                 "OPENSEARCH_URL='' is invalid: expected a URL when SINKS includes opensearch")
        if self.s3_sse_kms_key_id and not self.s3_sse.startswith("aws:kms"):
            rule("S3_SSE_KMS_KEY_ID S3_SSE",
                 f"S3_SSE={self.s3_sse!r} is invalid: expected aws:kms or aws:kms:dsse with S3_SSE_KMS_KEY_ID")
        if self.opensearch_password and not self.opensearch_username:
            rule("OPENSEARCH_PASSWORD OPENSEARCH_USERNAME",
                 "OPENSEARCH_USERNAME='' is invalid: expected a user name with OPENSEARCH_PASSWORD")
        if self.opensearch_aws_sigv4 and self.opensearch_username:
            rule("OPENSEARCH_AWS_SIGV4 OPENSEARCH_USERNAME",
                 "OPENSEARCH_AWS_SIGV4='true' is invalid: expected either SigV4 or basic auth, not both")
        if self.metrics_host and self.metrics_port and self.metrics_port == self.http_port and (
                self.metrics_host == self.http_host or {self.metrics_host, self.http_host} & WILDCARD_HOSTS):
            rule("METRICS_ADDR HTTP_ADDR",
                 f"METRICS_ADDR={_show_addr((self.metrics_host, self.metrics_port))!r} is invalid: expected another "
                 "port than HTTP_ADDR's")
        if self.opensearch_aws_sigv4 and not self.aws_region:
            rule("OPENSEARCH_AWS_SIGV4 AWS_REGION",
                 "AWS_REGION='' is invalid: expected a region when OPENSEARCH_AWS_SIGV4=true")
        return out

    def check(self) -> None:
        """Raise `ConfigError` with every broken cross-variable rule."""
        problems = [line for _, line in self.rule_problems()]
        if problems:
            raise ConfigError(problems)

    def source_of(self, var: Var) -> str:
        """`env`, `default`, or `cli` (an override such as `serve --workers`)."""
        attrs = var.attr if isinstance(var.attr, tuple) else (var.attr,)
        if self.override_attrs & set(attrs):
            return "cli"
        return "env" if var.name in self.env_names else "default"

    def describe(self) -> dict[str, str]:
        """Environment name → effective value as the environment spells it, secrets masked (for
        `config show` and the start-up log)."""
        return {var.name: var.shown(self) for var in VARIABLES}

    def describe_sources(self) -> dict[str, dict[str, str]]:
        """Environment name → {"value": …, "source": env|default|cli} (`config show --json`)."""
        return {var.name: {"value": var.shown(self), "source": self.source_of(var)} for var in VARIABLES}

    def secret_values(self) -> tuple[str, ...]:
        """Every secret this configuration holds (API keys, passwords, URL user-info, AWS secrets
        of the environment), longest first: what log lines must never contain."""
        from urllib.parse import unquote, urlsplit

        def basic(userinfo: str) -> str:  # the Authorization: Basic token made of it
            return base64.b64encode(userinfo.encode()).decode()

        found = {key for _, key in self.api_keys} | {self.opensearch_password, *self.redact_extra}
        if self.opensearch_password:
            found.add(basic(f"{self.opensearch_username}:{self.opensearch_password}"))
        for url in (*self.opensearch_urls, self.s3_endpoint_url):
            userinfo, at, _ = urlsplit(url).netloc.rpartition("@")
            if at and userinfo:
                _, colon, password = userinfo.partition(":")
                found |= {userinfo, unquote(userinfo), basic(unquote(userinfo))}
                if colon:
                    found |= {password, unquote(password)}
        return tuple(sorted((s for s in found if s), key=len, reverse=True))

    def __repr__(self) -> str:
        # masked like config show, so a failing assertion or a debug print cannot leak a secret
        return "Settings(" + ", ".join(f"{k}={v!r}" for k, v in self.describe().items()) + ")"

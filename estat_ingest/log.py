"""Structured logs on stdout: one JSON object per line, or `key=value` text on a terminal; and
`RateLimitedLog`, which keeps a repeated error from writing a line per occurrence.

`LOG_FORMAT=auto` (unset) picks text when stdout is a terminal and JSON otherwise (containers,
files, pipes). Every formatted line goes through a redaction step: the secret values of the
loaded configuration (`Settings.secret_values()`: API keys, passwords, URL user-info, AWS
secrets) and the user-info of any `scheme://user:pass@` URL become `***`, so no log line can
carry a secret, whatever a message or a library puts in it (DESIGN.md §2, invariant 9).

`RateLimitedLog` keeps a repeated error (a bad client, a sink that is down) from writing a line
per occurrence: one line per key per interval, and that line says how many were held back.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import orjson

from estat_ingest.config import mask_userinfo

_STD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}

# libraries whose info lines are noise for an operator ("Found credentials in environment
# variables", connection pool chatter, asyncio's debug lines): warnings and errors only
QUIET_LOGGERS = ("aiobotocore", "botocore", "boto3", "s3transfer", "urllib3", "asyncio", "aiohttp.access")


class JsonFormatter(logging.Formatter):
    def __init__(self, static: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.static = static or {}

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "message": record.getMessage(),
            "logger": record.name,
            **self.static,
        }
        for key, value in record.__dict__.items():
            if key not in _STD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extra = " ".join(f"{k}={v}" for k, v in record.__dict__.items() if k not in _STD and not k.startswith("_"))
        line = f"{time.strftime('%H:%M:%S')} {record.levelname.lower():7} {record.getMessage()} {extra}".rstrip()
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class Redactor:
    """Replaces every secret in a text by `***`: each value as is, as JSON escapes it and as
    repr() does (a value with a quote or a backslash is spelt differently in a JSON or a text
    line), then the user-info of every URL."""

    def __init__(self, secrets: Iterable[str]) -> None:
        spellings: set[str] = set()
        for secret in secrets:
            if secret:
                spellings |= {secret, orjson.dumps(secret).decode()[1:-1], repr(secret)[1:-1]}
        ordered = sorted(spellings, key=len, reverse=True)  # a longer secret before its substrings
        self._pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    def __call__(self, text: str) -> str:
        if self._pattern is not None:
            text = self._pattern.sub("***", text)
        return mask_userinfo(text)


class RedactingFormatter(logging.Formatter):
    def __init__(self, inner: logging.Formatter, redact: Redactor) -> None:
        super().__init__()
        self.inner = inner
        self.redact = redact

    def format(self, record: logging.LogRecord) -> str:
        return self.redact(self.inner.format(record))


def resolve_format(fmt: str) -> str:
    """`auto` → `text` on a terminal, else `json`."""
    if fmt == "auto":
        return "text" if sys.stdout.isatty() else "json"
    return fmt


def setup(level: str, fmt: str, *, redact: Iterable[str] = (), **static: Any) -> None:
    """Log lines on stdout at `level`, in `fmt` (json, text or auto), every line stripped of the
    `redact` values and of URL user-info; `static` fields go on every JSON line."""
    inner = JsonFormatter(static) if resolve_format(fmt) == "json" else TextFormatter()
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(RedactingFormatter(inner, Redactor(redact)))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.captureWarnings(True)  # warnings.warn() lines go through the same handler (redacted)


class RateLimitedLog:
    """At most one log line per key per `interval_s`; the next line says how many were suppressed.

    A client can repeat a bad request (or a failing sink an error) thousands of times a second:
    one line per occurrence would fill the disk and hide everything else. Keys are bounded labels
    (a rejection reason, a status), never client data, so the state stays small.
    """

    def __init__(self, interval_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self.clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def allow(self, key: str) -> int | None:
        """None: do not log this one (it is counted). Otherwise log it, saying that this many
        lines of `key` were suppressed since the last one."""
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._suppressed.pop(key, 0)

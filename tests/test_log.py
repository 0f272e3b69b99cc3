"""log.py: the redaction of every formatted line, the format picked when LOG_FORMAT is unset,
library loggers kept at warning, and the rate-limited log."""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from estat_ingest import log
from estat_ingest.config import Settings


class Captured(io.StringIO):
    def setup(self, level: str, fmt: str, **kwargs: Any) -> None:
        """log.setup, then its handler writes here (pytest swaps sys.stdout between phases)."""
        log.setup(level, fmt, **kwargs)
        handler = logging.getLogger().handlers[0]
        assert isinstance(handler, logging.StreamHandler)
        handler.setStream(self)


@pytest.fixture
def captured() -> Iterator[Captured]:
    out = Captured()
    root = logging.getLogger()
    saved = root.handlers[:], root.level, {n: logging.getLogger(n).level for n in log.QUIET_LOGGERS}
    yield out
    root.handlers[:], root.level = saved[0], saved[1]
    for name, level in saved[2].items():
        logging.getLogger(name).setLevel(level)
    logging.captureWarnings(False)


SECRET_ENV = {"API_KEYS": 'web:k"ey\\1', "OPENSEARCH_USERNAME": "admin", "OPENSEARCH_PASSWORD": "pw-s3cr3t",
              "OPENSEARCH_URL": "http://admin:url-s3cr3t@127.0.0.1:9", "SINKS": "opensearch"}


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_no_secret_survives_formatting(fmt: str, captured: Captured) -> None:
    settings = Settings.from_env(SECRET_ENV)
    captured.setup("debug", fmt, redact=settings.secret_values(), service="t")
    logger = logging.getLogger("estat_ingest.test")
    logger.warning("node failing %s", "http://admin:url-s3cr3t@127.0.0.1:9/_bulk",
                   extra={"node": settings.opensearch_urls[0], "headers": {"auth": "pw-s3cr3t"}})
    logger.info('key k"ey\\1 seen', extra={"keys": settings.api_keys})
    try:
        raise OSError("cannot connect to http://someone:else@host:1 with pw-s3cr3t")
    except OSError:
        logger.exception("failed")
    text = captured.getvalue()
    for secret in ("url-s3cr3t", "pw-s3cr3t", 'k"ey', "k\\\"ey", "someone:else"):
        assert secret not in text, (secret, text)
    assert "http://***@127.0.0.1:9" in text and "http://***@host:1" in text
    if fmt == "json":
        lines = [orjson.loads(line) for line in text.splitlines() if line.startswith("{")]
        assert lines[0]["node"] == "http://***@127.0.0.1:9" and lines[0]["headers"] == {"auth": "***"}


def test_redactor_replaces_longer_secrets_first() -> None:
    redact = log.Redactor(["abc", "abcdef"])
    assert redact("x abcdef y abc") == "x *** y ***"
    assert log.Redactor([])("plain http://u:p@h/") == "plain http://***@h/"


def test_auto_format_follows_the_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stdout", Tty())
    assert log.resolve_format("auto") == "text"
    assert log.resolve_format("json") == "json"
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    assert log.resolve_format("auto") == "json"
    assert log.resolve_format("text") == "text"


def test_unset_log_format_is_auto_not_json() -> None:
    assert Settings.from_env({}).log_format == "auto"
    assert Settings.from_env({"LOG_FORMAT": "json"}).log_format == "json"


def test_library_loggers_are_kept_at_warning(captured: Captured) -> None:
    captured.setup("debug", "json")
    logging.getLogger("botocore.credentials").info("Found credentials in environment variables.")
    logging.getLogger("aiobotocore.credentials").info("Found credentials in environment variables.")
    logging.getLogger("urllib3.connectionpool").debug("Starting new HTTP connection")
    logging.getLogger("asyncio").debug("Using selector: EpollSelector")
    logging.getLogger("botocore.endpoint").warning("a real warning")
    logging.getLogger("estat_ingest").debug("ours at debug")
    messages = [orjson.loads(line)["message"] for line in captured.getvalue().splitlines()]
    assert messages == ["a real warning", "ours at debug"]


def test_rate_limited_log_one_line_per_key_per_interval_with_the_suppressed_count() -> None:
    now = [0.0]
    lim = log.RateLimitedLog(10.0, clock=lambda: now[0])
    assert lim.allow("invalid_json") == 0
    assert [lim.allow("invalid_json") for _ in range(5)] == [None] * 5
    assert lim.allow("too_large") == 0  # another key is not held back
    now[0] = 9.99
    assert lim.allow("invalid_json") is None
    now[0] = 10.0
    assert lim.allow("invalid_json") == 6  # the interval has passed: the count since the last line
    assert lim.allow("invalid_json") is None
    now[0] = 25.0
    assert lim.allow("invalid_json") == 1
    assert lim.allow("too_large") == 0  # nothing was suppressed for this key

"""`delivery attempt failed` lines: they carry the sink's error text (S3's code and message, the
connection error, the timeout), and during an outage there is one line per sink and reason per
interval, which counts the failed attempts it did not log."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from pathlib import Path
from typing import Any

import pytest

from estat_ingest.config import Settings
from estat_ingest.delivery import Delivery
from estat_ingest.log import RateLimitedLog
from estat_ingest.metrics import Metrics
from estat_ingest.sinks.base import Outcome, Payload, Result
from estat_ingest.sinks.memory import MemorySink
from estat_ingest.sinks.s3 import S3Sink
from tests.fake_s3 import FakeS3, Step
from tests.helpers import free_port

PAYLOAD = Payload("1764821594_t_000001.jsonl.gz", "dt=2025-12-04/hr=13", 3, b"x", "gzip", 1764821594.0)


def failures(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == "delivery attempt failed"]


def s3_attempt(tmp_path: Path, endpoint: str, bucket: str = "bkt-1", timeout_s: float = 3.0) -> Result | None:
    async def main() -> Result | None:
        s = Settings.from_env({}, sinks=("s3",), raw_bucket=bucket, aws_region="us-east-1",
                              s3_endpoint_url=endpoint, s3_timeout_s=timeout_s, dlq_dir=str(tmp_path))
        sink = S3Sink(s)
        await sink.start()
        try:
            return await Delivery(sink, Metrics()).attempt(PAYLOAD)
        finally:
            await sink.aclose()

    return asyncio.run(main())


def test_a_missing_bucket_logs_s3s_code_and_message(tmp_path: Path, moto: Any,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "estat_ingest.delivery")
    result = s3_attempt(tmp_path, moto.endpoint, bucket="no-such-bucket-here")
    assert result is not None and not result.ok
    [line] = failures(caplog)
    assert line.__dict__["sink"] == "s3" and line.__dict__["batch"] == PAYLOAD.name
    assert line.__dict__["error"] == "NoSuchBucket: The specified bucket does not exist"
    assert line.__dict__["suppressed"] == 0


def test_a_refused_connection_logs_the_connection_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "estat_ingest.delivery")
    port = free_port()  # nothing listens there
    s3_attempt(tmp_path, f"http://127.0.0.1:{port}")
    [line] = failures(caplog)
    assert line.__dict__["reason"] == "connection"
    assert line.__dict__["error"].startswith("EndpointConnectionError: Could not connect to the endpoint URL")
    assert f"127.0.0.1:{port}" in line.__dict__["error"]


def test_a_timeout_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "estat_ingest.delivery")

    async def start() -> FakeS3:
        return await FakeS3(script=deque([Step(200, delay_s=1.0)])).start()

    async def main() -> None:
        fake = await start()
        try:
            s = Settings.from_env({}, sinks=("s3",), raw_bucket="bkt-1", aws_region="us-east-1",
                                  s3_endpoint_url=fake.endpoint, s3_timeout_s=0.2, dlq_dir=str(tmp_path))
            sink = S3Sink(s)
            await sink.start()
            try:
                await Delivery(sink, Metrics()).attempt(PAYLOAD)
            finally:
                await sink.aclose()
        finally:
            await fake.stop()

    asyncio.run(main())
    [line] = failures(caplog)
    assert line.__dict__["reason"] == "timeout"
    error = line.__dict__["error"]
    assert error == "no answer within 0.2s" or error.startswith("ReadTimeoutError: Read timeout"), error


def test_an_outage_is_one_line_per_reason_per_interval_with_the_suppressed_count(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "estat_ingest.delivery")
    now = [100.0]
    sink = MemorySink(name="s3")
    down = Result(Outcome.RETRY, "connection", error="EndpointConnectionError: Could not connect")
    sink.script.extend([down] * 30 + [Result(Outcome.REJECT, "auth", error="InvalidAccessKeyId: no")] * 2
                       + [down] * 5)
    delivery = Delivery(sink, Metrics(), failure_log=RateLimitedLog(10.0, clock=lambda: now[0]))

    async def attempts(n: int) -> None:
        for _ in range(n):
            await delivery.attempt(PAYLOAD)

    asyncio.run(attempts(30))  # 3 batches x 10 attempts within one interval
    assert [(r.__dict__["reason"], r.__dict__["suppressed"]) for r in failures(caplog)] == [("connection", 0)]
    asyncio.run(attempts(2))  # another reason has a line of its own
    assert [(r.__dict__["reason"], r.__dict__["suppressed"]) for r in failures(caplog)] == [
        ("connection", 0), ("auth", 0)]
    now[0] += 10.0
    asyncio.run(attempts(5))  # the next interval: one line, counting the 29 held back
    lines = failures(caplog)
    assert [(r.__dict__["reason"], r.__dict__["suppressed"]) for r in lines] == [
        ("connection", 0), ("auth", 0), ("connection", 29)]
    assert lines[-1].__dict__["error"] == "EndpointConnectionError: Could not connect"


def test_the_limiter_counts_per_key() -> None:
    now = [0.0]
    lim = RateLimitedLog(10.0, clock=lambda: now[0])
    assert lim.allow("s3:connection") == 0
    assert [lim.allow("s3:connection") for _ in range(3)] == [None] * 3
    assert lim.allow("opensearch:connection") == 0
    now[0] = 10.0
    assert lim.allow("s3:connection") == 3
    assert lim.allow("s3:connection") is None

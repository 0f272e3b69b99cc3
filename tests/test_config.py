"""Configuration: defaults, units, and a table of bad values each giving one clear line (§9 n)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from estat_ingest.config import ConfigError, Settings, parse_duration, parse_size


def test_defaults_match_design() -> None:
    s = Settings.from_env({})
    assert (s.http_host, s.http_port) == ("0.0.0.0", 8080)
    assert s.max_body_bytes == 16384 and s.channel_size == 4000
    assert (s.batch_max_events, s.batch_max_bytes, s.flush_interval_s) == (5000, 64 * 1024**2, 120.0)
    assert (s.upload_queue_batches, s.upload_concurrency) == (4, 2)
    assert (s.compression, s.gzip_level, s.sinks) == ("gzip", 1, ("file",))
    assert (s.raw_prefix, s.dlq_prefix, s.s3_timeout_s, s.s3_app_retries) == ("raw", "raw_dlq", 3.0, 2)
    assert (s.dlq_dir, s.dlq_max_age_s, s.dlq_max_size_bytes, s.dlq_scan_limit) == ("/tmp/dlq", 86400.0, 18e9, 1000)
    assert (s.shutdown_timeout_s, s.partition_tz, s.validate_json) == (25.0, "Asia/Seoul", True)
    assert (s.bulk_batch_size, s.bulk_batch_bytes, s.bulk_flush_interval_s, s.bulk_max_parallel_flushes) == (
        500, 5 * 1024**2, 1.0, 1)


def test_raw_bucket_selects_s3_sink_and_v1_names_work() -> None:
    s = Settings.from_env({
        "RAW_BUCKET": "b", "AWS_REGION": "ap-northeast-2", "RAW_PREFIX": "raw/", "DLQ_PREFIX": "raw_dlq",
        "HTTP_ADDR": ":9090", "MAX_BODY_SIZE": "16384", "CHANNEL_SIZE": "10", "UPLOAD_QUEUE": "2",
        "BATCH_SIZE": "3000", "FLUSH_INTERVAL": "1m30s", "S3_TIMEOUT": "500ms", "S3_APP_RETRIES": "0",
        "DLQ_DIR": "/x", "DLQ_MAX_AGE": "24h", "DLQ_MAX_SIZE_BYTES": "19327352832",
    })
    assert s.sinks == ("s3",) and s.raw_prefix == "raw"
    assert s.http_port == 9090 and s.flush_interval_s == 90.0 and s.s3_timeout_s == 0.5
    assert s.s3_app_retries == 0 and s.dlq_max_size_bytes == 19327352832


@pytest.mark.parametrize(("text", "seconds"), [
    ("500ms", 0.5), ("120s", 120), ("1m30s", 90), ("24h", 86400), ("1.5h", 5400), ("0", 0), ("250us", 0.00025),
])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(("text", "size"), [
    ("16384", 16384), ("18GB", 18_000_000_000), ("512MiB", 512 * 1024**2), ("64KiB", 65536), ("1kb", 1000),
])
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


BAD = [
    ("MAX_BODY_SIZE", "0", "out of range"),
    ("MAX_BODY_SIZE", "-5", "invalid"),
    ("MAX_BODY_SIZE", "12 apples", "invalid"),
    ("CHANNEL_SIZE", "0", "out of range"),
    ("BATCH_SIZE", "-1", "out of range"),
    ("BATCH_SIZE", "1e3", "invalid"),
    ("FLUSH_INTERVAL", "120", "invalid"),
    ("FLUSH_INTERVAL", "2d", "invalid"),
    ("FLUSH_INTERVAL", "0s", "out of range"),
    ("UPLOAD_QUEUE", "0", "out of range"),
    ("UPLOAD_CONCURRENCY", "1000", "out of range"),
    ("COMPRESSION", "brotli", "invalid"),
    ("GZIP_LEVEL", "10", "out of range"),
    ("S3_TIMEOUT", "fast", "invalid"),
    ("S3_APP_RETRIES", "-1", "out of range"),
    ("SINKS", "s3,kafka", "invalid"),
    ("SINKS", "file,file", "invalid"),
    ("HTTP_ADDR", "localhost", "invalid"),
    ("HTTP_ADDR", ":70000", "invalid"),
    ("DLQ_MAX_AGE", "forever", "invalid"),
    ("DLQ_MAX_SIZE_BYTES", "lots", "invalid"),
    ("DLQ_SCAN_LIMIT", "0", "out of range"),
    ("SHUTDOWN_TIMEOUT", "0s", "out of range"),
    ("PARTITION_TZ", "Mars/Olympus", "invalid"),
    ("VALIDATE_JSON", "maybe", "invalid"),
    ("API_KEYS", "nokey", "invalid"),
    ("TRUSTED_PROXIES", "10.0.0.0/33", "invalid"),
    ("S3_ENDPOINT_URL", "localhost:9000", "out of range"),
    ("INSTANCE_ID", "a/b", "out of range"),
    ("BULK_BATCH_BYTES_MB", "0", "out of range"),
    ("LOG_LEVEL", "loud", "invalid"),
]


@pytest.mark.parametrize(("var", "value", "kind"), BAD)
def test_bad_value_names_variable_value_and_expectation(var: str, value: str, kind: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({var: value})
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"{var}={value!r} is {kind}: expected ")


def test_cross_variable_rules() -> None:
    with pytest.raises(ConfigError, match=r"^RAW_BUCKET="):
        Settings.from_env({"SINKS": "s3"})
    with pytest.raises(ConfigError, match=r"^OPENSEARCH_URL="):
        Settings.from_env({"SINKS": "opensearch"})


@pytest.mark.parametrize(("var", "value"), [("BATCH_SIZE", "-1"), ("FLUSH_INTERVAL", "soon"), ("SINKS", "kafka")])
def test_serve_refuses_to_start_with_one_line(var: str, value: str, tmp_path: object) -> None:
    env = {**os.environ, var: value, "HTTP_ADDR": "127.0.0.1:0"}
    proc = subprocess.run([sys.executable, "-m", "estat_ingest", "serve"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and var in lines[0] and repr(value) in lines[0], proc.stderr


def test_config_show_masks_secrets() -> None:
    env = {**os.environ, "API_KEYS": "web:s3cr3t-key,app:other-key", "OPENSEARCH_USERNAME": "u",
           "OPENSEARCH_PASSWORD": "hunter2", "BATCH_SIZE": "42"}
    proc = subprocess.run([sys.executable, "-m", "estat_ingest", "config", "show"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "s3cr3t" not in proc.stdout and "other-key" not in proc.stdout and "hunter2" not in proc.stdout
    assert '"web:***"' in proc.stdout and '"batch_max_events": 42' in proc.stdout

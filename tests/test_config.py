"""Configuration: defaults, units, a table of bad values each giving one clear line (§9 n), every
bad variable reported at once, misspelt names, secrets masked (§2 invariant 9), `config show`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from estat_ingest.config import (
    VARIABLES,
    ConfigError,
    Settings,
    format_duration,
    format_size,
    mask_userinfo,
    misspelt_variables,
    parse_duration,
    parse_size,
)


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
    ("METRICS_ADDR", "9090", "invalid"),
    ("DLQ_MAX_AGE", "forever", "invalid"),
    ("DLQ_MAX_SIZE_BYTES", "lots", "invalid"),
    ("DLQ_SCAN_LIMIT", "0", "out of range"),
    ("SHUTDOWN_TIMEOUT", "0s", "out of range"),
    ("PARTITION_TZ", "Mars/Olympus", "invalid"),
    ("VALIDATE_JSON", "maybe", "invalid"),
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


def test_every_bad_variable_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"BATCH_SIZE": "-1", "FLUSH_INTERVAL": "soon", "GZIP_LEVEL": "10", "SINKS": "kafka",
                           "CHANNEL_SIZE": "100"})
    problems = info.value.problems
    assert [p.split("=", 1)[0] for p in problems] == ["SINKS", "BATCH_SIZE", "FLUSH_INTERVAL", "GZIP_LEVEL"]
    assert all("\n" not in p for p in problems)
    assert str(info.value) == "\n".join(problems)


def test_a_rule_about_a_bad_variable_is_not_reported_twice() -> None:
    # OPENSEARCH_URL is bad: "OPENSEARCH_URL must be set with SINKS=opensearch" would only repeat it
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"SINKS": "opensearch", "OPENSEARCH_URL": "ftp://x", "OPENSEARCH_PASSWORD": "p"})
    assert [p.split("=", 1)[0] for p in info.value.problems] == ["OPENSEARCH_URL", "OPENSEARCH_USERNAME"]


@pytest.mark.parametrize(("var", "value", "shown"), [
    ("API_KEYS", "nokey-s3cr3t", "'***'"),
    ("API_KEYS", "web:s3cr3t,web:other-s3cr3t", "'web:***,web:***'"),
    ("API_KEYS", "web:k1,s3cr3t", "'web:***,***'"),
    ("OPENSEARCH_URL", "ftp://admin:s3cr3t@db", "'ftp://***@db'"),
    ("S3_ENDPOINT_URL", "minio://ak:s3cr3t@127.0.0.1:9000", "'minio://***@127.0.0.1:9000'"),
])
def test_a_bad_secret_is_not_echoed(var: str, value: str, shown: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({var: value})
    assert "s3cr3t" not in str(info.value) and "k1" not in str(info.value)
    assert str(info.value).startswith(f"{var}={shown} is ")


def test_repr_and_describe_mask_every_secret() -> None:
    s = Settings.from_env({"API_KEYS": "web:s3cr3t-1", "OPENSEARCH_USERNAME": "u", "OPENSEARCH_PASSWORD": "s3cr3t-2",
                           "OPENSEARCH_URL": "https://u:s3cr3t-3@os:9200,https://os2", "SINKS": "opensearch"})
    for text in (repr(s), str(s.describe()), str(s.describe_sources())):
        assert "s3cr3t" not in text
    assert s.describe()["OPENSEARCH_URL"] == "https://***@os:9200,https://os2"
    assert s.describe()["OPENSEARCH_PASSWORD"] == "***" and s.describe()["API_KEYS"] == "web:***"
    assert {"s3cr3t-1", "s3cr3t-2", "s3cr3t-3", "u:s3cr3t-3"} <= set(s.secret_values())


def test_secret_values_include_decoded_url_passwords_and_long_aws_secrets() -> None:
    s = Settings.from_env({"S3_ENDPOINT_URL": "http://ak:p%40ss@minio:9000", "AWS_SECRET_ACCESS_KEY": "x" * 40,
                           "AWS_SESSION_TOKEN": "short"})
    assert {"p%40ss", "p@ss", "ak:p%40ss", "x" * 40} <= set(s.secret_values())
    assert "short" not in s.secret_values()  # a dummy such as moto's "testing", not a real AWS secret


def test_mask_userinfo() -> None:
    assert mask_userinfo("GET http://u:p@h:1/x?a=b@c and https://h2/") == "GET http://***@h:1/x?a=b@c and https://h2/"
    assert mask_userinfo("http://u:p@ss@h/") == "http://***@h/"  # an unescaped @ in the password
    assert mask_userinfo('"http://a:b@h1,http://c:d@h2"') == '"http://***@h1,http://***@h2"'


@pytest.mark.parametrize("var", VARIABLES, ids=lambda v: v.name)
def test_shown_default_parses_back_to_the_default(var: object) -> None:
    """What `config show` prints for a default is a value the variable accepts, meaning the same."""
    from estat_ingest.config import Var

    assert isinstance(var, Var)
    base = Settings.from_env({})
    shown = var.shown(base)
    if shown:
        assert Settings.from_env({var.name: shown}) == base, (var.name, shown)


def test_formatters() -> None:
    assert [format_duration(x) for x in (0, 0.5, 3, 120, 90, 86400, 0.00025)] == [
        "0", "500ms", "3s", "120s", "90s", "24h", "250us"]
    assert [format_size(x) for x in (16384, 64 * 1024**2, 18 * 10**9, 8190, 1024**2)] == [
        "16384", "64MiB", "18GB", "8190", "1MiB"]


def test_misspelt_variables_get_a_warning_naming_ours() -> None:
    env = {"BATCHSIZE": "1", "FLUSH_INTERVALL": "1s", "S3_TIMEOUTS": "1s", "batch_size": "9",
           "OPENSEARCH_USER": "admin", "OPENSEARCH_PASWORD": "s3cr3t"}
    lines = misspelt_variables(env)
    assert lines == [
        "BATCHSIZE is not a variable estat-ingest reads: did you mean BATCH_SIZE?",
        "FLUSH_INTERVALL is not a variable estat-ingest reads: did you mean FLUSH_INTERVAL?",
        "OPENSEARCH_PASWORD is not a variable estat-ingest reads: did you mean OPENSEARCH_PASSWORD?",
        "OPENSEARCH_USER is not a variable estat-ingest reads: did you mean OPENSEARCH_USERNAME?",
        "S3_TIMEOUTS is not a variable estat-ingest reads: did you mean S3_TIMEOUT?",
        "batch_size is not a variable estat-ingest reads: did you mean BATCH_SIZE?",
    ]
    assert not any("s3cr3t" in line for line in lines)


def test_unrelated_and_known_variables_get_no_warning() -> None:
    env = {"PATH": "/bin", "HOME": "/root", "HOSTNAME": "h", "LANG": "C", "HTTP_PROXY": "", "PYTHONPATH": "",
           "AWS_ENDPOINT_URL": "", "AWS_DEFAULT_REGION": "", "AWS_SECRET_ACCESS_KEY": "", "S3_MAX_RETRIES": "3",
           "LOG_PRETTY": "1", "BATCH_SIZE": "5", "KUBERNETES_SERVICE_HOST": "", "ECS_CONTAINER_METADATA_URI_V4": "",
           "weird-name": "", "1X": ""}
    assert misspelt_variables(env) == []


def test_cross_variable_rules() -> None:
    with pytest.raises(ConfigError, match=r"^RAW_BUCKET="):
        Settings.from_env({"SINKS": "s3"})
    with pytest.raises(ConfigError, match=r"^OPENSEARCH_URL="):
        Settings.from_env({"SINKS": "opensearch"})


def clean_env(**extra: str) -> dict[str, str]:
    """A small environment (none of the caller's variables, which could look misspelt)."""
    keep = ("PATH", "HOME", "LANG", "SYSTEMROOT", "PYTHONPATH", "VIRTUAL_ENV")
    return {**{k: os.environ[k] for k in keep if k in os.environ}, **extra}


@pytest.mark.parametrize(("var", "value"), [("BATCH_SIZE", "-1"), ("FLUSH_INTERVAL", "soon"), ("SINKS", "kafka")])
def test_serve_refuses_to_start_with_one_line(var: str, value: str, tmp_path: object) -> None:
    env = clean_env(**{var: value, "HTTP_ADDR": "127.0.0.1:0"})
    proc = subprocess.run([sys.executable, "-m", "estat_ingest", "serve"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and var in lines[0] and repr(value) in lines[0], proc.stderr


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "estat_ingest", *args], env=clean_env(**env),
                          capture_output=True, text=True, timeout=60)


def test_serve_reports_every_bad_variable_and_misspelling_then_exits_2() -> None:
    proc = run_cli("serve", BATCH_SIZE="-1", FLUSH_INTERVAL="soon", API_KEYS="web-s3cr3t", FLUSH_INTERVALL="1s",
                   HTTP_ADDR="127.0.0.1:0")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "estat-ingest: configuration error: API_KEYS='***' is invalid: expected name:key pairs separated by commas",
        "estat-ingest: configuration error: BATCH_SIZE='-1' is out of range: expected 1 to 10000000 events",
        "estat-ingest: configuration error: FLUSH_INTERVAL='soon' is invalid: expected a Go-style duration such as "
        "500ms, 120s, 1m30s or 24h",
        "estat-ingest: warning: FLUSH_INTERVALL is not a variable estat-ingest reads: did you mean FLUSH_INTERVAL?",
    ]


SECRETS = {"API_KEYS": "web:s3cr3t-key,app:other-key", "OPENSEARCH_USERNAME": "u", "OPENSEARCH_PASSWORD": "hunter2",
           "OPENSEARCH_URL": "https://u:url-pw@os.example:9200"}


def test_config_show_prints_environment_names_values_and_sources_with_secrets_masked() -> None:
    proc = run_cli("config", "show", BATCH_SIZE="42", FLUSH_INTERVAL="1m30s", **SECRETS)
    assert proc.returncode == 0, proc.stderr
    for secret in ("s3cr3t", "other-key", "hunter2", "url-pw"):
        assert secret not in proc.stdout + proc.stderr
    rows = {}
    for line in proc.stdout.splitlines():
        assignment, _, source = line.rpartition("  # ")
        name, _, value = assignment.rstrip().partition("=")
        rows[name] = (value, source)
    assert [name for name in rows] == [v.name for v in VARIABLES]
    assert rows["BATCH_SIZE"] == ("42", "env")
    assert rows["FLUSH_INTERVAL"] == ("90s", "env")
    assert rows["BATCH_MAX_BYTES"] == ("64MiB", "default")
    assert rows["API_KEYS"] == ("web:***,app:***", "env")
    assert rows["OPENSEARCH_PASSWORD"] == ("***", "env")
    assert rows["OPENSEARCH_URL"] == ("https://***@os.example:9200", "env")
    assert rows["LOG_FORMAT"] == ("auto", "default")


def test_config_show_json() -> None:
    import orjson

    proc = run_cli("config", "show", "--json", BATCH_SIZE="42", **SECRETS)
    assert proc.returncode == 0, proc.stderr
    assert "s3cr3t" not in proc.stdout and "hunter2" not in proc.stdout and "url-pw" not in proc.stdout
    cfg = orjson.loads(proc.stdout)
    assert cfg["BATCH_SIZE"] == {"value": "42", "source": "env"}
    assert cfg["DLQ_DIR"] == {"value": "/tmp/dlq", "source": "default"}
    assert cfg["API_KEYS"] == {"value": "web:***,app:***", "source": "env"}


def test_validate_ok(tmp_path: Path) -> None:
    proc = run_cli("validate", DLQ_DIR=str(tmp_path / "dlq"), FILE_SINK_DIR=str(tmp_path / "data"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert proc.stdout.startswith("ok: ") and str(tmp_path / "dlq") in proc.stdout
    assert not [p.name for p in (tmp_path / "dlq").iterdir()], "the probe file is deleted"


def test_validate_reports_every_problem(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    proc = run_cli("validate", DLQ_DIR=str(tmp_path / "file" / "dlq"), FILE_SINK_DIR=str(tmp_path / "file"),
                   BATCH_SIZE="0", API_KEYS="k", BATCHSIZE="1")
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert lines == [
        "estat-ingest: configuration error: API_KEYS='***' is invalid: expected name:key pairs separated by commas",
        "estat-ingest: configuration error: BATCH_SIZE='0' is out of range: expected 1 to 10000000 events",
        f"estat-ingest: cannot start: DLQ_DIR={str(tmp_path / 'file' / 'dlq')!r} is not usable: "
        f"{tmp_path / 'file'} is a file, not a directory",
        f"estat-ingest: cannot start: FILE_SINK_DIR={str(tmp_path / 'file')!r} is not usable: "
        f"{tmp_path / 'file'} is a file, not a directory",
        "estat-ingest: warning: BATCHSIZE is not a variable estat-ingest reads: did you mean BATCH_SIZE?",
    ]


def test_validate_directory_problem_alone_exits_1(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    proc = run_cli("validate", DLQ_DIR=str(tmp_path / "file"), SINKS="file", FILE_SINK_DIR=str(tmp_path / "d"))
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        f"estat-ingest: cannot start: DLQ_DIR={str(tmp_path / 'file')!r} is not usable: "
        f"{tmp_path / 'file'} is a file, not a directory"]


def test_metrics_addr_is_optional_and_not_the_public_port() -> None:
    unset = Settings.from_env({})
    assert unset.metrics_host == "" and unset.describe()["METRICS_ADDR"] == ""
    s = Settings.from_env({"METRICS_ADDR": ":9090"})
    assert (s.metrics_host, s.metrics_port) == ("0.0.0.0", 9090) and s.describe()["METRICS_ADDR"] == "0.0.0.0:9090"
    assert Settings.from_env({"METRICS_ADDR": "127.0.0.1:8080", "HTTP_ADDR": "10.0.0.5:8080"}).metrics_port == 8080
    for http_addr, metrics_addr in ((":8080", "127.0.0.1:8080"), ("127.0.0.1:9000", "127.0.0.1:9000"),
                                    ("127.0.0.1:9000", ":9000")):
        with pytest.raises(ConfigError) as info:
            Settings.from_env({"HTTP_ADDR": http_addr, "METRICS_ADDR": metrics_addr})
        assert str(info.value).startswith("METRICS_ADDR=") and "another port than HTTP_ADDR's" in str(info.value)

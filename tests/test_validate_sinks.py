"""`estat-ingest validate --check-sinks`: each sink tried with the real credentials. One line per
problem and exit 1, an `ok: sink …` line per sink and exit 0 otherwise, never a secret.

S3 against moto over HTTP (a missing bucket; bad credentials against a moto server that enforces
authentication), and tests/fake_s3.py for a refused permission; OpenSearch against
tests/fake_opensearch.py (basic auth, a write block, data stream templates); the file sink on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from estat_ingest.cli import main
from tests.fake_opensearch import FakeOpenSearch
from tests.fake_s3 import FakeS3, Step
from tests.helpers import free_port, s3_client, terminate

SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"  # the shape of a real AWS secret (40 characters)
PASSWORD = "correct-horse-battery-staple"


def validate(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path,
             **env: str) -> tuple[int, list[str], list[str]]:
    for name in ("RAW_BUCKET", "SINKS", "OPENSEARCH_URL", "S3_ENDPOINT_URL", "FILE_SINK_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DLQ_DIR", str(tmp_path / "dlq"))
    monkeypatch.setenv("INSTANCE_ID", "probe-test")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code = main(["validate", "--check-sinks"])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err.splitlines()


# ------------------------------------------------------------------------------------ S3


def test_s3_good_setup_writes_and_deletes_a_test_object_and_exits_0(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path, moto: Any,
        bucket: str, s3: Any) -> None:
    code, out, err = validate(monkeypatch, capsys, tmp_path, RAW_BUCKET=bucket, AWS_REGION="us-east-1",
                              S3_ENDPOINT_URL=moto.endpoint, S3_STORAGE_CLASS="STANDARD_IA")
    assert (code, err) == (0, [])
    [line] = [o for o in out if o.startswith("ok: sink s3: ")]
    assert line.startswith(f"ok: sink s3: wrote and deleted s3://{bucket}/raw/_estat_validate/probe-test-")
    assert f" and s3://{bucket}/raw_dlq/_estat_validate/probe-test-" in line
    assert line.endswith(".jsonl.gz (STANDARD_IA)")
    assert out[-1].startswith("ok: configuration valid, sinks s3")
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0  # nothing left behind


def test_s3_missing_bucket_is_one_line_and_exit_1(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path, moto: Any) -> None:
    code, out, err = validate(monkeypatch, capsys, tmp_path, RAW_BUCKET="no-such-bucket-anywhere",
                              AWS_REGION="us-east-1", S3_ENDPOINT_URL=moto.endpoint)
    assert code == 1 and out == []
    assert err == ["estat-ingest: sink s3: RAW_BUCKET='no-such-bucket-anywhere' does not exist (at this endpoint "
                   "or region): NoSuchBucket: The specified bucket does not exist"]


def test_s3_without_any_credentials_says_where_they_are_looked_for(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path, moto: Any) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    code, out, err = validate(monkeypatch, capsys, tmp_path, RAW_BUCKET="bkt-1", AWS_REGION="us-east-1",
                              S3_ENDPOINT_URL=moto.endpoint, AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
                              AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_EC2_METADATA_DISABLED="true")
    assert code == 1 and out == []
    assert err == ["estat-ingest: sink s3: no AWS credentials found (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                   "AWS_PROFILE, web identity, the ECS task role or instance metadata): NoCredentialsError: Unable "
                   "to locate credentials"]


def test_each_sink_has_its_say(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                               tmp_path: Path, moto: Any) -> None:
    code, out, err = validate(monkeypatch, capsys, tmp_path, SINKS="file,s3", FILE_SINK_DIR=str(tmp_path / "data"),
                              RAW_BUCKET="no-such-bucket-anywhere", AWS_REGION="us-east-1",
                              S3_ENDPOINT_URL=moto.endpoint)
    assert code == 1
    assert out == [f"ok: sink file: wrote, fsynced and deleted a file in {tmp_path / 'data' / 'raw'}"]
    assert [e.split(":")[1] for e in err] == [" sink s3"]


@pytest.fixture
def moto_with_auth() -> Iterator[str]:
    """A moto server (its own process) that checks every request's credentials, as S3 does:
    INITIAL_NO_AUTH_ACTION_COUNT=0 switches moto's IAM authentication on from the first request."""
    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("moto server with authentication did not start")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        terminate(proc)


def test_s3_bad_credentials_are_one_line_exit_1_and_the_secret_is_never_printed(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path,
        moto_with_auth: str) -> None:
    code, out, err = validate(monkeypatch, capsys, tmp_path, RAW_BUCKET="bkt-1", AWS_REGION="us-east-1",
                              S3_ENDPOINT_URL=moto_with_auth, AWS_ACCESS_KEY_ID="AKIAIOSFODNN7EXAMPLE",
                              AWS_SECRET_ACCESS_KEY=SECRET)
    assert code == 1 and out == []
    assert err == ["estat-ingest: sink s3: the AWS credentials are refused: InvalidAccessKeyId: The AWS Access "
                   "Key Id you provided does not exist in our records."]
    assert SECRET not in "\n".join(out + err)


@contextlib.contextmanager
def fake_s3_in_a_thread(fake: FakeS3) -> Iterator[FakeS3]:
    """tests/fake_s3.py served by a loop of its own, while the command under test runs its own."""
    loop = asyncio.new_event_loop()
    loop.run_until_complete(fake.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.run_until_complete(fake.stop())
        loop.close()


def test_s3_refused_permission_names_the_prefix(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with fake_s3_in_a_thread(FakeS3(default=Step(403, "AccessDenied"))) as fake:
        code, out, err = validate(monkeypatch, capsys, tmp_path, RAW_BUCKET="bkt-1", AWS_REGION="us-east-1",
                                  S3_ENDPOINT_URL=fake.endpoint, RAW_PREFIX="events")
    assert code == 1 and out == []
    [key] = fake.puts
    assert key.startswith("events/_estat_validate/probe-test-")
    assert err == [f"estat-ingest: sink s3: cannot write s3://bkt-1/{key}: the credentials lack s3:PutObject on "
                   "RAW_PREFIX/*: AccessDenied: AccessDenied"]


# ------------------------------------------------------------------------------------ OpenSearch


@pytest.fixture
def opensearch() -> Iterator[FakeOpenSearch]:
    fake = FakeOpenSearch()
    fake.basic_auth = ("ingest", PASSWORD)
    with fake:
        yield fake


def test_opensearch_good_credentials_exit_0(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                            tmp_path: Path, opensearch: FakeOpenSearch) -> None:
    code, out, err = validate(monkeypatch, capsys, tmp_path, SINKS="opensearch", OPENSEARCH_URL=opensearch.url,
                              OPENSEARCH_USERNAME="ingest", OPENSEARCH_PASSWORD=PASSWORD,
                              OPENSEARCH_INDEX="events-%Y.%m.%d")
    assert (code, err) == (0, [])
    [line] = [o for o in out if o.startswith("ok: sink opensearch: ")]
    assert line.startswith(f"ok: sink opensearch: GET / answered by {opensearch.url}; index events-20")
    assert line.endswith("does not exist yet: the first batch creates it")
    assert not opensearch.bulk_requests()  # the probe writes nothing


def test_opensearch_wrong_password_is_one_line_exit_1_without_the_password(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path,
        opensearch: FakeOpenSearch) -> None:
    wrong = "not-the-password-at-all"
    code, out, err = validate(monkeypatch, capsys, tmp_path, SINKS="opensearch", OPENSEARCH_URL=opensearch.url,
                              OPENSEARCH_USERNAME="ingest", OPENSEARCH_PASSWORD=wrong)
    assert code == 1 and out == []
    assert err == [f"estat-ingest: sink opensearch: {opensearch.url}: refused OPENSEARCH_USERNAME/"
                   'OPENSEARCH_PASSWORD: HTTP 401: {"error": "Unauthorized"}']
    assert wrong not in "\n".join(out + err) and PASSWORD not in "\n".join(out + err)


def test_opensearch_user_info_in_the_url_is_masked(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                   opensearch: FakeOpenSearch) -> None:
    url = opensearch.url.replace("http://", f"http://ingest:{PASSWORD}@")
    code, out, err = validate(monkeypatch, capsys, tmp_path, SINKS="opensearch", OPENSEARCH_URL=url)
    assert (code, err) == (0, [])  # aiohttp sends the URL's user-info as basic auth
    [line] = [o for o in out if o.startswith("ok: sink opensearch: ")]
    assert line.startswith(f"ok: sink opensearch: GET / answered by {opensearch.url.replace('http://', 'http://***@')};")
    assert PASSWORD not in "\n".join(out + err)
    opensearch.basic_auth = ("ingest", "another")
    code, out, err = validate(monkeypatch, capsys, tmp_path, SINKS="opensearch", OPENSEARCH_URL=url)
    assert code == 1 and out == []
    assert err == [f"estat-ingest: sink opensearch: {opensearch.url.replace('http://', 'http://***@')}: refused "
                   'an anonymous request (no OPENSEARCH_USERNAME): HTTP 401: {"error": "Unauthorized"}']
    assert PASSWORD not in "\n".join(out + err)


def test_opensearch_index_that_blocks_writes_is_a_problem(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path,
        opensearch: FakeOpenSearch) -> None:
    opensearch.index_settings["events"] = {"blocks": {"read_only_allow_delete": "true"}}
    code, out, err = validate(monkeypatch, capsys, tmp_path, SINKS="opensearch", OPENSEARCH_URL=opensearch.url,
                              OPENSEARCH_USERNAME="ingest", OPENSEARCH_PASSWORD=PASSWORD, OPENSEARCH_INDEX="events")
    assert code == 1 and out == []
    assert err == ["estat-ingest: sink opensearch: index events: events refuses writes: "
                   "index.blocks.read_only_allow_delete=true"]
    opensearch.index_settings["events"] = {"number_of_shards": "1"}
    code, out, err = validate(monkeypatch, capsys, tmp_path, SINKS="opensearch", OPENSEARCH_URL=opensearch.url,
                              OPENSEARCH_USERNAME="ingest", OPENSEARCH_PASSWORD=PASSWORD, OPENSEARCH_INDEX="events")
    assert code == 0 and any(o.endswith("index events exists and takes writes") for o in out)


def test_opensearch_data_stream_needs_a_matching_template(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path,
        opensearch: FakeOpenSearch) -> None:
    env = {"SINKS": "opensearch", "OPENSEARCH_URL": opensearch.url, "OPENSEARCH_USERNAME": "ingest",
           "OPENSEARCH_PASSWORD": PASSWORD, "OPENSEARCH_INDEX": "web-events", "OPENSEARCH_DATA_STREAM": "true"}
    opensearch.index_templates = [{"name": "web", "index_template": {"index_patterns": ["web-*"], "priority": 1}}]
    code, _, err = validate(monkeypatch, capsys, tmp_path, **env)
    assert code == 1
    assert err == ["estat-ingest: sink opensearch: data stream web-events does not exist and index template 'web' "
                   'has no data_stream: the first batch would be refused (create an index template with '
                   '"data_stream": {} for it)']
    opensearch.index_templates.append({"name": "web-ds", "index_template": {
        "index_patterns": ["web-events*"], "priority": 100, "data_stream": {}}})
    code, out, err = validate(monkeypatch, capsys, tmp_path, **env)
    assert (code, err) == (0, [])
    assert any(o.endswith("data stream web-events does not exist yet: index template 'web-ds' creates it")
               for o in out)


def test_opensearch_serverless_has_no_get_root_and_that_is_no_problem(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path,
        opensearch: FakeOpenSearch) -> None:
    opensearch.root_status = 404
    code, out, err = validate(monkeypatch, capsys, tmp_path, SINKS="opensearch", OPENSEARCH_URL=opensearch.url,
                              OPENSEARCH_USERNAME="ingest", OPENSEARCH_PASSWORD=PASSWORD)
    assert (code, err) == (0, [])
    assert any(o.startswith(f"ok: sink opensearch: GET / answered by {opensearch.url}") for o in out)


def test_opensearch_unreachable_node(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                     tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    code, out, err = validate(monkeypatch, capsys, tmp_path, SINKS="opensearch", OPENSEARCH_URL=url)
    assert code == 1 and out == []
    [line] = err
    assert line.startswith(f"estat-ingest: sink opensearch: {url}: unreachable: ClientConnectorError")


# ------------------------------------------------------------------------------------ file


def test_file_sink_directory(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                             tmp_path: Path) -> None:
    root = tmp_path / "data"
    code, out, err = validate(monkeypatch, capsys, tmp_path, FILE_SINK_DIR=str(root))
    assert (code, err) == (0, [])
    assert f"ok: sink file: wrote, fsynced and deleted a file in {root / 'raw'}" in out
    assert list((root / "raw").iterdir()) == []
    # FILE_SINK_DIR itself is writable (the start-up probe passes), the prefix below it is not
    (root / "raw").rmdir()
    (root / "raw").write_text("not a directory")
    code, out, err = validate(monkeypatch, capsys, tmp_path, FILE_SINK_DIR=str(root))
    assert code == 1 and out == []
    assert err == [f"estat-ingest: sink file: FILE_SINK_DIR={str(root)!r} is not usable: {root / 'raw'} is a file, "
                   "not a directory"]


def test_a_bad_file_sink_dir_is_one_line_not_two(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    code, out, err = validate(monkeypatch, capsys, tmp_path, FILE_SINK_DIR=str(tmp_path / "f" / "data"))
    assert code == 1 and out == []
    assert err == [f"estat-ingest: cannot start: FILE_SINK_DIR={str(tmp_path / 'f' / 'data')!r} is not usable: "
                   f"{tmp_path / 'f'} is a file, not a directory"]


def test_configuration_errors_skip_the_sinks(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                             tmp_path: Path) -> None:
    code, out, err = validate(monkeypatch, capsys, tmp_path, S3_STORAGE_CLASS="COLD", RAW_BUCKET="bkt-1")
    assert code == 2 and out == []
    assert err[0].startswith("estat-ingest: configuration error: S3_STORAGE_CLASS='COLD' is invalid")
    assert err[-1] == "estat-ingest: note: sinks not checked: fix the configuration first"


def test_validate_without_the_flag_contacts_no_sink(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    for name in ("RAW_BUCKET", "SINKS", "OPENSEARCH_URL", "S3_ENDPOINT_URL", "FILE_SINK_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DLQ_DIR", str(tmp_path / "dlq"))
    monkeypatch.setenv("RAW_BUCKET", "bkt-1")
    monkeypatch.setenv("S3_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing there
    assert main(["validate"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [o for o in out if o.startswith("ok: sink")] == []


def test_end_to_end_in_a_subprocess(tmp_path: Path, moto: Any, bucket: str) -> None:
    """What an operator runs: the command's own process, its exit code and its two streams."""
    env = {**os.environ, "RAW_BUCKET": bucket, "AWS_REGION": "us-east-1", "S3_ENDPOINT_URL": moto.endpoint,
           "DLQ_DIR": str(tmp_path / "dlq"), "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_ACCESS_KEY_ID": "testing"}
    env.pop("SINKS", None)
    done = subprocess.run([sys.executable, "-m", "estat_ingest", "validate", "--check-sinks"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout.startswith(f"ok: sink s3: wrote and deleted s3://{bucket}/raw/_estat_validate/")
    assert SECRET not in done.stdout
    assert s3_client(moto.endpoint).list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0

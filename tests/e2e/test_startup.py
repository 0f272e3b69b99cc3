"""An operator's first hour, with real processes: a server that cannot start says why in one line
per problem and exits non-zero before it starts anything (port in use, a directory it cannot
write), and no secret of the configuration is printed, whatever a sink's warnings contain."""

from __future__ import annotations

import contextlib
import os
import pty
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ServerProcess, free_port, http

pytestmark = pytest.mark.slow


def base_env(tmp: Path, **extra: str) -> dict[str, str]:
    """A small environment: none of this process's variables (which could look misspelt)."""
    keep = ("PATH", "HOME", "LANG", "PYTHONPATH", "VIRTUAL_ENV", "HTTP_FRONT")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.update({"DLQ_DIR": str(tmp / "dlq"), "FILE_SINK_DIR": str(tmp / "data"), "INSTANCE_ID": "test"})
    env.update(extra)
    return env


def serve(env: dict[str, str], *args: str, preexec_fn: Callable[[], None] | None = None,
          prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """`serve` that is expected to refuse to start (a server that does start is a failure: it is
    stopped after 60 s by the timeout)."""
    return subprocess.run([*prefix, sys.executable, "-m", "estat_ingest", "serve", *args], env=env,
                          capture_output=True, text=True, timeout=60, preexec_fn=preexec_fn)


def refused(proc: subprocess.CompletedProcess[str], *needles: str) -> list[str]:
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout == "", "nothing may start (no log line) before the checks pass"
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    for line in lines:
        assert line.startswith("estat-ingest: cannot start: "), lines
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr)
    return lines


# ------------------------------------------------------------------------------------ the port


@contextlib.contextmanager
def held_port(listening: bool) -> Iterator[int]:
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", 0))
        if listening:
            s.listen()
        yield s.getsockname()[1]
    finally:
        s.close()


@pytest.mark.parametrize("listening", [True, False], ids=["listening", "bound"])
@pytest.mark.parametrize("workers", [None, "2"], ids=["one-process", "workers"])
def test_port_in_use_is_one_line_and_nothing_starts(tmp_path: Path, listening: bool, workers: str | None) -> None:
    with held_port(listening) as port:
        args = ("--workers", workers) if workers else ()
        proc = serve(base_env(tmp_path, HTTP_ADDR=f"127.0.0.1:{port}"), *args)
    [line] = refused(proc, f"HTTP_ADDR='127.0.0.1:{port}'", "already in use")
    assert line == (f"estat-ingest: cannot start: HTTP_ADDR='127.0.0.1:{port}' is not usable: "
                    f"127.0.0.1:{port} is already in use by another program")
    assert "shutdown complete" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("workers", [None, "2"], ids=["one-process", "workers"])
def test_metrics_addr_in_use_is_one_line_and_nothing_starts(tmp_path: Path, workers: str | None) -> None:
    with held_port(True) as port:
        args = ("--workers", workers) if workers else ()
        proc = serve(base_env(tmp_path, HTTP_ADDR="127.0.0.1:0", METRICS_ADDR=f"127.0.0.1:{port}"), *args)
    [line] = refused(proc)
    assert line == (f"estat-ingest: cannot start: METRICS_ADDR='127.0.0.1:{port}' is not usable: "
                    f"127.0.0.1:{port} is already in use by another program")


# ------------------------------------------------------------------------------------ directories


def test_dlq_dir_whose_parent_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    proc = serve(base_env(tmp_path, DLQ_DIR=str(tmp_path / "afile" / "dlq"), HTTP_ADDR="127.0.0.1:0"))
    [line] = refused(proc)
    assert line == (f"estat-ingest: cannot start: DLQ_DIR={str(tmp_path / 'afile' / 'dlq')!r} is not usable: "
                    f"{tmp_path / 'afile'} is a file, not a directory")


def test_every_start_up_problem_at_once(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    with held_port(True) as port:
        proc = serve(base_env(tmp_path, DLQ_DIR=str(tmp_path / "afile"), FILE_SINK_DIR=str(tmp_path / "afile/x"),
                              HTTP_ADDR=f"127.0.0.1:{port}"))
    lines = refused(proc)
    assert [line.split("=", 1)[0].rsplit(" ", 1)[1] for line in lines] == ["DLQ_DIR", "FILE_SINK_DIR", "HTTP_ADDR"]


def test_file_sink_dir_is_checked_only_with_the_file_sink(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    env = base_env(tmp_path, FILE_SINK_DIR=str(tmp_path / "afile"), HTTP_ADDR="127.0.0.1:0")
    refused(serve(env), "FILE_SINK_DIR=")
    proc = subprocess.run([sys.executable, "-m", "estat_ingest", "validate"], capture_output=True, text=True,
                          env={**env, "SINKS": "opensearch", "OPENSEARCH_URL": "http://127.0.0.1:9"}, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_spool_dir_is_checked_with_durable_acknowledgements(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    env = base_env(tmp_path, SPOOL_DIR=str(tmp_path / "afile" / "spool"), HTTP_ADDR="127.0.0.1:0")
    [line] = refused(serve({**env, "ACK_MODE": "durable"}))
    assert line == (f"estat-ingest: cannot start: SPOOL_DIR={str(tmp_path / 'afile' / 'spool')!r} is not usable: "
                    f"{tmp_path / 'afile'} is a file, not a directory")
    proc = subprocess.run([sys.executable, "-m", "estat_ingest", "validate"], capture_output=True, text=True,
                          env={**env, "ACK_MODE": "memory"}, timeout=60)
    assert proc.returncode == 0, proc.stderr  # the memory mode has no spool


def _ro_mount_works() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o ro tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


def test_dlq_dir_on_a_read_only_file_system(tmp_path: Path) -> None:
    if not _ro_mount_works():
        pytest.skip("needs root and unshare -m to mount a read-only tmpfs")
    ro = tmp_path / "ro"
    ro.mkdir()
    env = base_env(tmp_path, DLQ_DIR=str(ro / "dlq"), HTTP_ADDR="127.0.0.1:0")
    script = f'mount -t tmpfs -o ro tmpfs "{ro}" && exec "$@"'
    proc = serve(env, prefix=("unshare", "-m", "sh", "-c", script, "sh"))
    [line] = refused(proc)
    assert line == (f"estat-ingest: cannot start: DLQ_DIR={str(ro / 'dlq')!r} is not usable: "
                    f"cannot create {ro / 'dlq'}: Read-only file system")


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A directory any user can reach (pytest's tmp_path is private to root)."""
    d = Path(tempfile.mkdtemp(prefix="estat-startup-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        for p in d.rglob("*"):
            with contextlib.suppress(OSError):
                p.chmod(0o755)
        shutil.rmtree(d, ignore_errors=True)


def _read_only_dir(root: Path) -> Path:
    ro = root / "readonly"
    ro.mkdir()
    ro.chmod(0o555)
    return ro


@pytest.mark.skipif(os.geteuid() == 0 and shutil.which("setpriv") is None, reason="needs setpriv to drop root's "
                    "capabilities (root writes any directory)")
def test_dlq_dir_under_a_read_only_directory(shared_tmp: Path) -> None:
    """Without root's privileges (as this user, or as root with every capability dropped)."""
    ro = _read_only_dir(shared_tmp)
    prefix = ("setpriv", "--inh-caps=-all", "--bounding-set=-all", "--") if os.geteuid() == 0 else ()
    env = base_env(shared_tmp, DLQ_DIR=str(ro / "dlq"), HTTP_ADDR="127.0.0.1:0")
    [line] = refused(serve(env, prefix=prefix))
    assert line.startswith(f"estat-ingest: cannot start: DLQ_DIR={str(ro / 'dlq')!r} is not usable: "
                           f"cannot create {ro / 'dlq'}: Permission denied (running as ")


NOBODY = 65534


def _nobody_can_run_python() -> bool:
    if os.geteuid() != 0:
        return False
    try:
        probe = subprocess.run([sys.executable, "-c", "import estat_ingest.cli"], capture_output=True,
                               preexec_fn=_as_nobody, timeout=60)
    except OSError:  # the interpreter lies in a directory only root may enter
        return False
    return probe.returncode == 0


def _as_nobody() -> None:
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


def test_dlq_dir_not_writable_by_the_nobody_user(shared_tmp: Path) -> None:
    if not _nobody_can_run_python():
        pytest.skip("needs root, and an interpreter and a checkout the nobody user can run")
    ro = _read_only_dir(shared_tmp)
    (shared_tmp / "data").mkdir(mode=0o777)
    env = base_env(shared_tmp, DLQ_DIR=str(ro / "dlq"), HTTP_ADDR="127.0.0.1:0")
    [line] = refused(serve(env, preexec_fn=_as_nobody))
    assert "Permission denied (running as user nobody (uid 65534))" in line


# ------------------------------------------------------------------------------------ secrets


SECRET_PARTS = ("url-pw-0a1b", "pw-2c3d", "key-4e5f", "s3pw-6a7b", "aws-" + "8c9d" * 10)


def test_no_secret_is_printed_by_a_serving_process(tmp_path: Path) -> None:
    closed = free_port()  # nothing listens there: the sinks fail and warn, with their URLs
    env = {
        "SINKS": "opensearch,s3", "LOG_LEVEL": "debug", "LOG_FORMAT": "json",
        "OPENSEARCH_URL": f"http://estat:url-pw-0a1b@127.0.0.1:{closed}",
        "OPENSEARCH_USERNAME": "estat", "OPENSEARCH_PASSWORD": "pw-2c3d",
        "API_KEYS": "web:key-4e5f",
        "RAW_BUCKET": "b", "AWS_REGION": "us-east-1", "S3_ENDPOINT_URL": f"http://ak:s3pw-6a7b@127.0.0.1:{closed}",
        "AWS_SECRET_ACCESS_KEY": SECRET_PARTS[4], "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE",
        "S3_TIMEOUT": "200ms", "S3_APP_RETRIES": "0", "OPENSEARCH_TIMEOUT": "200ms", "OPENSEARCH_RETRIES": "0",
        "BULK_FLUSH_INTERVAL_MS": "10", "FLUSH_INTERVAL": "10ms", "SHUTDOWN_TIMEOUT": "3s",
    }
    srv = ServerProcess({**base_env(tmp_path), **env}, tmp_path)
    try:
        srv.start()
        auth = {"Authorization": "Bearer key-4e5f"}
        assert srv.post(b'{"e":1}', auth)[0] == 200
        assert http("GET", srv.url + "/collect?e=2&api_key=key-4e5f")[0] == 200
        assert srv.post(b'{"e":3}', {"Authorization": "Bearer wrong"})[0] == 401
        deadline = time.monotonic() + 60  # until both sinks have failed a delivery and said so
        while time.monotonic() < deadline and srv.log().count("batch written to dlq") < 2:
            time.sleep(0.1)
        assert srv.stop() == 0
    finally:
        srv.kill()
    out = srv.log()
    assert "listening" in out and "shutdown complete" in out
    assert "batch written to dlq" in out, out[-3000:]
    for secret in SECRET_PARTS:
        assert secret not in out, f"{secret!r} printed:\n{out[-3000:]}"
    assert f"http://***@127.0.0.1:{closed}" in out, "the sink's lines name its node, masked"
    assert "Found credentials" not in out, "botocore's info lines are kept out"


# ------------------------------------------------------------------------------------ log format


def read_until(fd: int, needle: bytes, deadline: float) -> bytes:
    buf = b""
    while needle not in buf and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the other side closed (EIO on Linux)
                break
            if not chunk:
                break
            buf += chunk
    return buf


def test_logs_are_text_on_a_terminal_and_json_otherwise(tmp_path: Path) -> None:
    env = base_env(tmp_path, HTTP_ADDR=f"127.0.0.1:{free_port()}")
    env.pop("LOG_FORMAT", None)
    master, slave = pty.openpty()
    proc: subprocess.Popen[Any] = subprocess.Popen([sys.executable, "-m", "estat_ingest", "serve"], env=env,
                                                   stdout=slave, stderr=slave, stdin=subprocess.DEVNULL)
    os.close(slave)
    try:
        out = read_until(master, b"listening", time.monotonic() + 60)
        proc.send_signal(signal.SIGTERM)
        out += read_until(master, b"shutdown complete", time.monotonic() + 60)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    lines = [line for line in out.decode().splitlines() if line.strip()]
    assert any(" info    listening " in line for line in lines), lines
    assert not any(line.lstrip().startswith("{") for line in lines), lines

    srv = ServerProcess(base_env(tmp_path), tmp_path)  # stdout is a file
    del srv.env["LOG_FORMAT"]
    try:
        srv.start()
        assert srv.stop() == 0
    finally:
        srv.kill()
    assert [r["message"] for r in srv.log_records()][-1] == "shutdown complete"
    assert all(line.startswith("{") for line in srv.log().splitlines())

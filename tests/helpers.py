"""Shared test helpers: free ports, a real `estat-ingest serve` subprocess, reading S3/files back."""

from __future__ import annotations

import contextlib
import gzip
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import orjson
import zstandard

from estat_ingest.config import Settings

REPO = Path(__file__).resolve().parent.parent
DEFAULT_FRONT = Settings().http_front  # what `estat-ingest serve` runs without HTTP_FRONT


HELD_REST = b'"a":"b"} '  # completes a body started by `hold_posts`: the event '{"a":"b"} '


def hold_posts(port: int, n: int, timeout: float) -> list[socket.socket]:
    """`n` connections each inside `POST /collect`: headers and 1 of 10 body bytes sent, the rest
    (`HELD_REST`) left to the test, so each request stays in flight as long as the test wants."""
    held: list[socket.socket] = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        s.sendall(b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n{")
        held.append(s)
    return held


def terminate(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM a helper process (moto, haproxy), SIGKILL it if it is still there after 10 s."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def decode_object(name: str, data: bytes) -> list[dict[str, Any]]:
    """Decompress one object/file (by its extension) and parse every JSONL line."""
    if name.endswith(".zst"):
        raw = zstandard.ZstdDecompressor().decompressobj().decompress(data)
    else:
        raw = gzip.decompress(data)
    assert raw.endswith(b"\n"), name
    return [orjson.loads(line) for line in raw.split(b"\n")[:-1]]


def http(method: str, url: str, body: bytes | None = None, headers: Mapping[str, str] | None = None,
         timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


class ServerProcess:
    """`python -m estat_ingest serve` on 127.0.0.1:<free port> with the given environment.

    The environment is this process's (so `HTTP_FRONT`, set by the `front` fixture in
    tests/conftest.py or by the caller, picks the HTTP front), then the test's `env`.
    """

    def __init__(self, env: Mapping[str, str], cwd: Path, args: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.cwd = cwd
        self.env = {
            **os.environ,
            "HTTP_ADDR": f"127.0.0.1:{self.port}",
            "LOG_FORMAT": "json",
            "INSTANCE_ID": "test",
            **env,
        }
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = cwd / f"server-{self.port}.log"

    @property
    def front(self) -> str:
        """The HTTP front this server runs: "aiohttp" or "fast"."""
        return self.env.get("HTTP_FRONT", DEFAULT_FRONT)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait_ready: bool = True, timeout: float = 30.0) -> ServerProcess:
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "estat_ingest", "serve", *self.args],
            cwd=self.cwd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
        )
        if wait_ready:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited early: {self.log()}")
                with contextlib.suppress(OSError):
                    if http("GET", self.url + "/ready", timeout=1)[0] == 200:
                        return self
                time.sleep(0.05)
            raise RuntimeError(f"server not ready: {self.log()}")
        return self

    def signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def stop(self, timeout: float = 60.0) -> int:
        self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_records(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log().splitlines():
            with contextlib.suppress(orjson.JSONDecodeError):
                out.append(orjson.loads(line))
        return out

    def post(self, body: bytes, headers: Mapping[str, str] | None = None, path: str = "/collect"
             ) -> tuple[int, dict[str, str], bytes]:
        return http("POST", self.url + path, body, headers)


@contextlib.contextmanager
def running(env: Mapping[str, str], cwd: Path) -> Iterator[ServerProcess]:
    """A started server for a `with` block (a module fixture's lifetime); stopped with SIGTERM at the
    end, killed if it does not stop, and its exit status must be 0."""
    srv = ServerProcess(env, cwd)
    code: int | None = None
    try:
        srv.start()
        yield srv
    finally:
        if srv.proc is not None and srv.proc.poll() is None:
            code = srv.stop()
        srv.kill()
    assert code == 0, srv.log()[-3000:]


class SinkReader:
    """The events a server's file sink stored, in receive order (record ids sort by it).

    `sync()` is a barrier: it POSTs a sentinel event on a new connection, reads the server's own
    count of accepted events (`ingest_events_accepted_total`), and waits (bounded) until the
    sentinel is stored and the files hold at least that many events. The sentinel alone is not
    enough, although with `SERVER_ENV` (one event per batch, one uploader) the server writes the
    batches in order (checked: 1,759 and 1,750 batches of a `make fuzz` run, delivered in sequence):
    a directory listing taken while files are renamed into the directory may return a later file
    and miss an earlier one (readdir walks ext4's hash order), so `make fuzz` saw an event "lost"
    and then "stored" by the next example. A test must let the server finish with its own
    connection (read the answers, or wait for the close) before it calls `sync()`.
    """

    SERVER_ENV = {"BATCH_SIZE": "1", "UPLOAD_CONCURRENCY": "1", "FLUSH_INTERVAL": "20ms"}
    SENTINEL = "sync-sentinel-"

    def __init__(self, srv: ServerProcess, root: Path, dlq: Path | None = None) -> None:
        self.srv = srv
        self.root = root
        self.dlq = dlq
        self._seen: set[Path] = set()
        self._records: list[dict[str, Any]] = []

    def _read_new(self) -> None:
        if not self.root.exists():
            return
        fresh = []
        for p in self.root.rglob("*"):
            if p in self._seen or not p.is_file() or p.name.startswith(".") or p.name.endswith(".meta.json"):
                continue
            self._seen.add(p)
            fresh += decode_object(p.name, p.read_bytes())
        if fresh:
            self._records = sorted(self._records + fresh, key=lambda r: r["id"])

    def sync(self, timeout: float = 20.0) -> list[dict[str, Any]]:
        """Every record stored so far (sentinels left out), after a barrier."""
        marker = self.SENTINEL + uuid.uuid4().hex
        status = self.srv.post(orjson.dumps({"s": marker}), {"Content-Type": "application/json"})[0]
        assert status == 200, f"sentinel refused: {status}"
        accepted = self.accepted()
        deadline = time.monotonic() + timeout
        while True:
            self._read_new()
            if any(marker in r["body"] for r in self._records) and len(self._records) >= accepted:
                break
            assert time.monotonic() < deadline, (
                f"sentinel event not stored in time ({len(self._records)} stored of {accepted} accepted)")
            time.sleep(0.005)
        if self.dlq is not None and self.dlq.exists():
            assert not [p for p in self.dlq.rglob("*") if p.is_file()], "a batch went to the DLQ"
        return [r for r in self._records if self.SENTINEL not in r["body"]]

    def accepted(self) -> int:
        """The server's own count of accepted events (sentinels included), scraped from /metrics."""
        text = http("GET", self.srv.url + "/metrics")[2].decode()
        return round(sum(float(v) for v in re.findall(r"^ingest_events_accepted_total(?:{[^}]*})? (\S+)$", text, re.M)))

    def bodies(self) -> list[str]:
        """The bodies of every stored event (after a barrier)."""
        return [r["body"] for r in self.sync()]


def s3_client(endpoint: str) -> Any:
    import botocore.session

    return botocore.session.get_session().create_client(
        "s3", endpoint_url=endpoint, region_name="us-east-1",
        aws_access_key_id="testing", aws_secret_access_key="testing",
    )


def s3_objects(client: Any, bucket: str, prefix: str = "") -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    token: dict[str, str] = {}
    while True:
        page = client.list_objects_v2(Bucket=bucket, Prefix=prefix, **token)
        for item in page.get("Contents", []):
            out[item["Key"]] = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
        if not page.get("IsTruncated"):
            return out
        token = {"ContinuationToken": page["NextContinuationToken"]}


def file_objects(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.startswith(".") and not p.name.endswith(".meta.json")}


def records_of(objects: Mapping[str, bytes]) -> Iterator[tuple[str, dict[str, Any]]]:
    for key, data in objects.items():
        for rec in decode_object(key, data):
            yield key, rec

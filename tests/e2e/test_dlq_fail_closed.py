"""The DLQ fails closed, end to end (DESIGN.md §2.8), with a real `estat-ingest serve`,
moto over HTTP, and real file systems: a 2 MiB tmpfs, a DLQ remounted read-only under the running
server, a bucket that does not exist yet, a wall clock 25 h ahead (libfaketime). In each: every
event answered 2xx ends in S3 exactly once (every object decompressed, bodies and ids compared),
nothing is dropped, and a DLQ that cannot take a batch turns into 503s, never into lost 2xx events.

Mounts need root (the test skips with a message otherwise); every mount and process a test makes
is undone by it.
"""

from __future__ import annotations

import contextlib
import glob
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Moto
from tests.dlq.util import data_files
from tests.helpers import REPO, ServerProcess, http, records_of, s3_client, s3_objects

BODY_PAD = 240  # random bytes per event (hex: 480 characters), so batches barely compress


def metric(srv: ServerProcess, name: str, **labels: str) -> float:
    """The sum of a metric's samples that carry `labels`."""
    text = http("GET", srv.url + "/metrics")[2].decode()
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += float(s.value)
    return total


def wait(pred: Any, timeout: float, what: str, srv: ServerProcess) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{srv.log()[-4000:]}")
        time.sleep(0.1)


def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)


@contextlib.contextmanager
def mounted(target: Path, *commands: list[str]) -> Iterator[None]:
    """Run the mount commands on `target`; unmount it at the end (skip when not root or they fail)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs or a read-only bind mount")
    mounts = 0
    try:
        for cmd in commands:
            r = run(cmd)
            if r.returncode != 0:
                pytest.skip(f"{' '.join(cmd)} failed: {r.stderr.strip()}")
            mounts += cmd[:2] == ["mount", "-t"] or "--bind" in cmd
        yield
    finally:
        for _ in range(mounts):
            if run(["umount", str(target)]).returncode != 0:
                run(["umount", "-l", str(target)])


def events(tag: str, start: int, n: int) -> list[bytes]:
    return [orjson.dumps({"tag": tag, "n": i, "pad": os.urandom(BODY_PAD).hex()}) for i in range(start, start + n)]


def post(srv: ServerProcess, bodies: list[bytes]) -> tuple[int, dict[str, str], bytes]:
    return srv.post(b"\n".join(bodies) + b"\n", {"Content-Type": "application/x-ndjson"})


def fill_until_refused(srv: ServerProcess, tag: str, refusals: int = 5, timeout: float = 60) -> list[str]:
    """NDJSON requests until /collect has answered `refusals` 503s with reason dlq_unavailable;
    returns the bodies answered 200."""
    accepted: list[str] = []
    seen, k = 0, 0
    deadline = time.monotonic() + timeout
    while seen < refusals:
        assert time.monotonic() < deadline, f"no dlq_unavailable 503s after {len(accepted)} events\n{srv.log()[-4000:]}"
        bodies = events(tag, k * 100, 100)
        k += 1
        status, headers, text = post(srv, bodies)
        if status == 200:
            accepted += [b.decode() for b in bodies]
            continue
        assert status == 503 and "Retry-After" in headers, (status, text)
        if b"DLQ" in text:
            seen += 1
        time.sleep(0.05)  # queue_full while batches are still in flight, or refused: a moment
    return accepted


def in_s3(s3: Any, bucket: str, prefix: str = "raw/") -> list[dict[str, Any]]:
    names = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
    return [r for _, r in records_of(s3_objects(s3, bucket, prefix))] if bucket in names else []


def assert_exactly_once(s3: Any, bucket: str, accepted: list[str]) -> None:
    got = in_s3(s3, bucket)
    assert sorted(r["body"] for r in got) == sorted(accepted)  # every 2xx event, and nothing else
    assert len({r["id"] for r in got}) == len(got)  # each once
    assert in_s3(s3, bucket, "raw_dlq/") == []  # nothing was set aside as rejected


def batches(d: Path) -> set[str]:
    """The DLQ entries of a directory by batch name, claimed (being replayed) or not."""
    return {name.split(".claim-")[0] for name in data_files(d)}


def drained(srv: ServerProcess) -> dict[str, Any]:
    [done] = [r for r in srv.log_records() if r.get("message") == "shutdown complete"]
    return done


def serve(tmp_path: Path, moto: Moto, bucket: str, dlq: Path, **env: str) -> ServerProcess:
    return ServerProcess({
        "RAW_BUCKET": bucket, "S3_ENDPOINT_URL": moto.endpoint, "AWS_REGION": "us-east-1",
        "DLQ_DIR": str(dlq), "BATCH_SIZE": "200", "FLUSH_INTERVAL": "100ms", "S3_TIMEOUT": "1s",
        "S3_APP_RETRIES": "0", "MAX_BODY_SIZE": "128KiB", "BUFFER_MAX_BYTES": "1MiB", "DLQ_CLAIM_TIMEOUT": "5s",
        "SHUTDOWN_TIMEOUT": "10s", **env}, tmp_path)


def recover_and_check(srv: ServerProcess, moto: Moto, bucket: str, accepted: list[str]) -> None:
    """S3 comes back: the held batches and the DLQ empty by themselves, /collect accepts again, and
    every accepted event is in S3 exactly once."""
    if not moto.running:
        moto.start()
    s3 = s3_client(moto.endpoint)
    s3.create_bucket(Bucket=bucket)
    wait(lambda: metric(srv, "ingest_held_events") == 0 and metric(srv, "dlq_files_current") == 0, 60,
         "the held batches and the DLQ to empty", srv)
    wait(lambda: metric(srv, "dlq_unavailable") == 0, 10, "dlq_unavailable to clear", srv)
    bodies = events("after", 0, 50)
    assert post(srv, bodies)[0] == 200
    accepted += [b.decode() for b in bodies]
    wait(lambda: len(in_s3(s3, bucket)) >= len(accepted), 30, "every accepted event in S3", srv)
    assert metric(srv, "dlq_events_dropped_total") == 0
    assert metric(srv, "dlq_files_lost_total") == 0
    assert_exactly_once(s3, bucket, accepted)


def test_small_tmpfs_dlq_with_s3_down_refuses_then_delivers_every_event_once(tmp_path: Path) -> None:
    dlq = tmp_path / "dlq"
    dlq.mkdir()
    moto = Moto()  # its port is chosen, nothing listens there yet: S3 is down
    bucket = "small-tmpfs"
    with mounted(dlq, ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(dlq)]):
        srv = serve(tmp_path, moto, bucket, dlq).start()  # the DLQ defaults: DLQ_MIN_FREE_BYTES, DLQ_WHEN_FULL
        try:
            [cap] = [r for r in srv.log_records() if r.get("message") == "dlq capacity"]
            assert cap["when_full"] == "reject" and 0 < cap["min_free_bytes"] < cap["volume_bytes"] // 10
            accepted = fill_until_refused(srv, "down")
            assert metric(srv, "dlq_unavailable", sink="s3") == 1
            assert metric(srv, "http_requests_rejected_total", reason="dlq_unavailable") >= 5
            assert metric(srv, "dlq_events_enqueued_total") > 0  # the DLQ took what fits, then refused
            assert metric(srv, "dlq_events_dropped_total") == 0
            assert http("GET", srv.url + "/ready")[0] == 200  # an outage never empties the load balancer
            recover_and_check(srv, moto, bucket, accepted)
        finally:
            code = srv.stop()
            moto.stop()
    assert code == 0, srv.log()[-3000:]
    assert drained(srv)["lost_events"] == 0 and drained(srv)["lifetime_lost_events"] == 0
    print(f"tmpfs 2 MiB: {len(accepted)} events accepted, {cap['may_hold_bytes']} bytes the DLQ could hold")


def test_read_only_dlq_with_s3_down_refuses_then_delivers_every_event_once(tmp_path: Path) -> None:
    dlq = tmp_path / "dlq"
    (dlq / "s3").mkdir(parents=True)
    moto = Moto()
    bucket = "read-only-dlq"
    with mounted(dlq, ["mount", "--bind", str(dlq), str(dlq)]):
        srv = serve(tmp_path, moto, bucket, dlq).start()  # (serve refuses to start on a read-only DLQ_DIR)
        try:
            r = run(["mount", "-o", "remount,ro,bind", str(dlq)])  # read-only under the running server
            if r.returncode != 0:
                pytest.skip(f"remount read-only failed: {r.stderr.strip()}")
            assert run(["touch", str(dlq / "s3" / "probe")]).returncode != 0, "the bind mount is not read-only"
            accepted = fill_until_refused(srv, "ro")
            assert metric(srv, "dlq_unavailable", sink="s3") == 1
            assert metric(srv, "dlq_write_errors_total") > 0 and metric(srv, "dlq_events_enqueued_total") == 0
            assert metric(srv, "dlq_events_dropped_total") == 0
            assert any(r.get("reason") == "read_only" for r in srv.log_records()
                       if r.get("message", "").startswith("dlq refused a batch"))
            recover_and_check(srv, moto, bucket, accepted)  # S3 back, the DLQ still read-only
        finally:
            code = srv.stop()
            moto.stop()
    assert code == 0, srv.log()[-3000:]
    assert drained(srv)["lost_events"] == 0


def test_missing_bucket_keeps_every_file_and_delivers_once_it_exists(tmp_path: Path, moto: Moto) -> None:
    bucket = f"later-{int(time.time() * 1000) % 10**9}"  # not created yet
    dlq = tmp_path / "dlq"
    srv = serve(tmp_path, moto, bucket, dlq, BUFFER_MAX_BYTES="96MiB").start()
    s3 = s3_client(moto.endpoint)
    try:
        accepted: list[str] = []
        for k in range(6):
            bodies = events("nobucket", k * 100, 100)
            assert post(srv, bodies)[0] == 200  # the DLQ takes them: no reason to refuse
            accepted += [b.decode() for b in bodies]
        wait(lambda: metric(srv, "dlq_events_enqueued_total") >= len(accepted), 30, "every event in the DLQ", srv)
        assert metric(srv, "upload_attempts_total", reason="no_bucket") > 0
        files_before = batches(dlq / "s3")
        # an operator's replay meanwhile: it stops at the outage, moves nothing, exits non-zero
        env = {**os.environ, "RAW_BUCKET": bucket, "S3_ENDPOINT_URL": moto.endpoint, "AWS_REGION": "us-east-1",
               "S3_APP_RETRIES": "0", "DLQ_DIR": str(dlq)}
        r = subprocess.run([sys.executable, "-m", "estat_ingest", "dlq", "replay", str(dlq), "--no-progress"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False)
        assert r.returncode == 1 and "OUTAGE    s3: no_bucket" in r.stdout, (r.stdout, r.stderr)
        probes = metric(srv, "upload_attempts_total", reason="no_bucket")
        wait(lambda: metric(srv, "upload_attempts_total", reason="no_bucket") >= probes + 2, 30,
             "the replayer's probes against the missing bucket", srv)
        assert batches(dlq / "s3") == files_before
        assert not (dlq / "s3" / "rejected").exists()
        assert metric(srv, "dlq_files_current") == len(files_before) and metric(srv, "dlq_events_rejected_total") == 0
        s3.create_bucket(Bucket=bucket)  # the bucket appears: everything goes by itself
        wait(lambda: metric(srv, "dlq_files_current") == 0, 60, "the DLQ to empty", srv)
        wait(lambda: len(in_s3(s3, bucket)) >= len(accepted), 30, "every event in S3", srv)
    finally:
        code = srv.stop()
    assert code == 0, srv.log()[-3000:]
    assert_exactly_once(s3, bucket, accepted)
    assert not (dlq / "s3" / "rejected").exists() and data_files(dlq / "s3") == []
    assert metric_from_log(srv) == 0


def metric_from_log(srv: ServerProcess) -> int:
    """Events the server deleted or lost, by its own shutdown line."""
    d = drained(srv)
    return int(d["lifetime_dropped_events"]) + int(d["lifetime_lost_events"])


def libfaketime() -> str:
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1") + glob.glob("/usr/lib/faketime/libfaketime.so.1"))
    if not found:
        pytest.skip("libfaketime not installed (Debian package faketime; `make test` installs it when root)")
    return found[0]


def test_a_clock_25h_ahead_at_restart_expires_nothing_with_s3_healthy(tmp_path: Path) -> None:
    preload = libfaketime()
    dlq = tmp_path / "dlq"
    moto = Moto()  # down for the first run: its events go to the DLQ
    bucket = "clock-jump"
    srv = serve(tmp_path, moto, bucket, dlq, BUFFER_MAX_BYTES="96MiB").start()
    accepted: list[str] = []
    try:
        for k in range(5):
            bodies = events("before", k * 100, 100)
            assert post(srv, bodies)[0] == 200
            accepted += [b.decode() for b in bodies]
        wait(lambda: metric(srv, "dlq_events_enqueued_total") >= len(accepted), 30, "every event in the DLQ", srv)
    finally:
        code = srv.stop()
    assert code == 0, srv.log()[-3000:]
    assert len(data_files(dlq / "s3")) >= 3
    moto.start()
    try:
        s3 = s3_client(moto.endpoint)
        s3.create_bucket(Bucket=bucket)
        # the next start sees a wall clock 25 h ahead (DLQ_MAX_AGE is 24h); timers keep real time
        later = serve(tmp_path, moto, bucket, dlq, BUFFER_MAX_BYTES="96MiB", LD_PRELOAD=preload,
                      FAKETIME="+25h", FAKETIME_DONT_FAKE_MONOTONIC="1")
        later.start()
        try:
            wait(lambda: metric(later, "dlq_files_current") == 0, 60, "the DLQ to be replayed", later)
            wait(lambda: len(in_s3(s3, bucket)) >= len(accepted), 30, "every event in S3", later)
            assert metric(later, "dlq_events_dropped_total") == 0
            assert any("clock may have jumped" in r.get("message", "") for r in later.log_records())
        finally:
            code = later.stop()
        assert code == 0, later.log()[-3000:]
        assert_exactly_once(s3, bucket, accepted)
    finally:
        moto.stop()

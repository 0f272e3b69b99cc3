"""ACK_MODE=durable against real processes, signals and moto (DESIGN.md §10, invariant 7).

A crash at any instant loses only events never answered 2xx: kill -9 under traffic (three times,
restarting on the same directories), kill -9 while S3 is down, a peer killed for good and its
spool adopted by the survivor, a spool volume that fills up. Every test counts what was
acknowledged and proves each of those events is stored exactly once (decompress every object,
compare markers and ids). The power-cut test (LazyFS) is in test_durable_powercut.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.durable_util import Load, assert_exactly_once, stored_markers
from tests.helpers import ServerProcess, free_port, http, s3_client, s3_objects

FRONTS = ("aiohttp", "fast")  # every test here runs against both HTTP fronts (tests/conftest.py)


def durable_env(bucket: str, endpoint: str, dlq: Path, **extra: str) -> dict[str, str]:
    return {"RAW_BUCKET": bucket, "AWS_REGION": "us-east-1", "S3_ENDPOINT_URL": endpoint, "DLQ_DIR": str(dlq),
            "ACK_MODE": "durable", "BATCH_SIZE": "300", "FLUSH_INTERVAL": "1s", "LOG_LEVEL": "warning",
            **extra}


def wait_until(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def await_stored(s3: Any, bucket: str, acked: set[str], timeout: float) -> None:
    """Until every acknowledged event is in the bucket, at most `timeout` (then the exactly-once
    check that follows says how many are missing)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen, _ = stored_markers(s3_objects(s3, bucket))
        if all(seen[m] for m in acked):
            return
        time.sleep(0.2)


def test_kill9_under_traffic_three_times_every_acknowledged_event_stored_once(
        tmp_path: Path, moto: Any, bucket: str, s3: Any) -> None:
    env = durable_env(bucket, moto.endpoint, tmp_path / "dlq")
    acked: set[str] = set()
    sent: set[str] = set()
    for r in range(3):
        srv = ServerProcess(env, tmp_path).start()
        load = Load(srv.port, clients=8, tag=f"r{r}").start()
        try:
            wait_until(lambda load=load: len(load) >= 400, 60, "400 acknowledged events")  # type: ignore[misc]
        finally:
            srv.signal(signal.SIGKILL)
            srv.wait(10)
            load.stop()
        acked |= load.acked
        sent |= load.sent
        assert load.statuses[200] >= 400 and not set(load.statuses) - {200}, load.statuses
    srv = ServerProcess(env, tmp_path).start()  # recovers the last crash's spool, replays every DLQ file
    try:
        await_stored(s3, bucket, acked, 90)
    finally:
        assert srv.stop() == 0, srv.log()[-3000:]
    print(assert_exactly_once(acked, sent, s3_objects(s3, bucket), "three kill -9"))


@pytest.fixture
def own_moto() -> Iterator[Any]:
    """A moto server of this test's own, so it can be stopped (S3 down) and started again on the
    same port with its buckets (moto keeps them in this process)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    servers = [ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)]
    servers[0].start()

    class Handle:
        endpoint = f"http://127.0.0.1:{port}"

        def down(self) -> None:
            servers[-1].stop()

        def up(self) -> None:
            servers.append(ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False))
            servers[-1].start()

    yield Handle()
    servers[-1].stop()


def test_kill9_while_s3_is_down_then_s3_back_and_a_restart(tmp_path: Path, own_moto: Any) -> None:
    s3 = s3_client(own_moto.endpoint)
    bucket = "down-" + os.urandom(4).hex()
    s3.create_bucket(Bucket=bucket)
    env = durable_env(bucket, own_moto.endpoint, tmp_path / "dlq", S3_APP_RETRIES="0", S3_TIMEOUT="1s")
    srv = ServerProcess(env, tmp_path).start()
    load = Load(srv.port, clients=6).start()
    try:
        wait_until(lambda: len(load) >= 300, 60, "300 acknowledged events with S3 up")
        own_moto.down()
        n = len(load)
        wait_until(lambda: len(load) >= n + 600, 60, "600 more acknowledged events with S3 down")
    finally:
        srv.signal(signal.SIGKILL)
        srv.wait(10)
        load.stop()
    own_moto.up()
    srv = ServerProcess(env, tmp_path).start()
    try:
        await_stored(s3, bucket, load.acked, 90)
    finally:
        assert srv.stop() == 0, srv.log()[-3000:]
    print(assert_exactly_once(load.acked, load.sent, s3_objects(s3, bucket), "kill -9 with S3 down"))


def test_a_survivor_delivers_a_killed_peers_acknowledged_events(tmp_path: Path, moto: Any, bucket: str,
                                                                 s3: Any) -> None:
    """Two instances share DLQ_DIR; one is killed and never restarted; the other adopts its spool."""
    env = durable_env(bucket, moto.endpoint, tmp_path / "dlq", SPOOL_ADOPT_AFTER="2s", BATCH_SIZE="5000",
                      FLUSH_INTERVAL="120s")  # the victim's events are all in open batches when it dies
    victim = ServerProcess({**env, "INSTANCE_ID": "victim"}, tmp_path).start()
    survivor = ServerProcess({**env, "INSTANCE_ID": "survivor"}, tmp_path).start()
    a = Load(victim.port, clients=4, tag="a").start()
    b = Load(survivor.port, clients=4, tag="b").start()
    try:
        wait_until(lambda: len(a) >= 500 and len(b) >= 100, 60, "events acknowledged by both")
        victim.signal(signal.SIGKILL)
        victim.wait(10)
        a.stop()
        await_stored(s3, bucket, a.acked, 60)
        assert (tmp_path / "dlq" / "spool").exists()
        assert not [p for p in (tmp_path / "dlq" / "spool").iterdir() if p.name.startswith("victim")]
    finally:
        b.stop()
        survivor_code = survivor.stop()
        victim.kill()
    assert survivor_code == 0, survivor.log()[-3000:]
    stats = assert_exactly_once(a.acked | b.acked, a.sent | b.sent, s3_objects(s3, bucket), "adoption")
    assert stats["acked"] >= 600
    recovered = [r for r in survivor.log_records() if r.get("message") == "spool of a dead process moved into the dlq"]
    assert recovered and recovered[0]["how"] == "adoption" and recovered[0]["events"] >= len(a.acked)


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_a_full_spool_volume_answers_503_and_loses_no_acknowledged_event(tmp_path: Path, moto: Any, bucket: str,
                                                                        s3: Any) -> None:
    spool = tmp_path / "spool"
    if not _mount_tmpfs(spool, "160k"):
        pytest.skip("needs root and tmpfs to make a small spool volume")
    try:
        # batches stay open until FLUSH_INTERVAL: the spool fills, 503s, then a flush frees the space
        env = durable_env(bucket, moto.endpoint, tmp_path / "dlq", SPOOL_DIR=str(spool), BATCH_SIZE="100000",
                          FLUSH_INTERVAL="2s")
        srv = ServerProcess(env, tmp_path).start()
        load = Load(srv.port, clients=6).start()
        try:
            wait_until(lambda: load.statuses[503] >= 50 and len(load) >= 500, 60,
                       "503s from the full spool and acknowledgements before and after")
            seen_ready = http("GET", srv.url + "/metrics")[2]
        finally:
            load.stop()
            code = srv.stop()
        assert code == 0, srv.log()[-3000:]
        assert b"spool_write_errors_total" in seen_ready
        assert set(load.statuses) <= {200, 503}, load.statuses
        print(assert_exactly_once(load.acked, load.sent, s3_objects(s3, bucket), "full spool"))
    finally:
        subprocess.run(["umount", "-l", str(spool)], capture_output=True)

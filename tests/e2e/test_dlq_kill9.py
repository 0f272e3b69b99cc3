"""kill -9 in the middle of DLQ writes (real subprocesses, 3 rounds) and once while the replayer holds a
claim, then a restart with S3 back: no corrupt object is ever stored under RAW_PREFIX, the stale claim
is recovered, and every completed DLQ file is delivered, byte for byte, under its own key (v1 §9 c)."""

from __future__ import annotations

import gzip
import random
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import orjson

from estat_ingest.formats.keys import partition
from tests.dlq.util import TZ, data_files, write_entry
from tests.helpers import ServerProcess, decode_object, free_port, s3_objects

FRONTS = ("aiohttp", "fast")  # every test here runs against both HTTP fronts (tests/conftest.py)

ROUNDS = 3


def completed_files(d: Path) -> dict[str, bytes]:
    """Data files that a replay may send: complete pairs, claimed files (name before the claim suffix)."""
    out: dict[str, bytes] = {}
    if not d.exists():
        return out
    for p in d.iterdir():
        if not p.is_file() or p.name.startswith(".") or p.name.endswith(".meta.json"):
            continue
        name = p.name.split(".claim-")[0]
        try:
            out[name] = p.read_bytes()
        except FileNotFoundError:  # claimed or released by the running server between list and read
            continue
    return out


def hammer(srv: ServerProcess, stop: threading.Event, tag: str) -> None:
    i = 0
    while not stop.is_set():
        body = b"\n".join(orjson.dumps({"tag": tag, "n": i + k, "pad": "x" * 200}) for k in range(50)) + b"\n"
        try:
            srv.post(body, {"Content-Type": "application/x-ndjson"})
        except OSError:
            return  # the server was killed under us
        i += 50


def test_kill9_during_dlq_writes_then_restart_delivers_every_completed_file(tmp_path: Path, moto: Any,
                                                                           bucket: str, s3: Any) -> None:
    dlq = tmp_path / "dlq"
    refused = f"http://127.0.0.1:{free_port()}"  # nothing listens: every upload fails at once
    hole = socket.socket()  # listens, never answers: every upload (and replay) hangs until S3_TIMEOUT,
    hole.bind(("127.0.0.1", 0))  # so kills also land while a replayer holds a claim
    hole.listen(1024)
    blackhole = f"http://127.0.0.1:{hole.getsockname()[1]}"
    env = {"RAW_BUCKET": bucket, "AWS_REGION": "us-east-1", "DLQ_DIR": str(dlq), "BATCH_SIZE": "50",
           "FLUSH_INTERVAL": "50ms", "S3_APP_RETRIES": "0", "S3_TIMEOUT": "1s", "DLQ_CLAIM_TIMEOUT": "1s",
           "UPLOAD_CONCURRENCY": "4", "LOG_LEVEL": "warning"}
    # a torn file as v1 could leave it (no rename): must never reach RAW_PREFIX
    torn, _ = write_entry(dlq, int(time.time()) - 60, 1, 20, v1=True, instance="v1host")
    whole = (dlq / torn).read_bytes()
    (dlq / torn).write_bytes(whole[: len(whole) // 2])
    rng = random.Random(3)
    seen: dict[str, bytes] = {}
    for r in range(ROUNDS):
        srv = ServerProcess({**env, "S3_ENDPOINT_URL": refused}, tmp_path).start()
        stop = threading.Event()
        t = threading.Thread(target=hammer, args=(srv, stop, f"r{r}"), daemon=True)
        t.start()
        deadline = time.monotonic() + 20
        want = len(completed_files(dlq / "s3")) + 5
        while len(completed_files(dlq / "s3")) < want and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.3))  # somewhere in the middle of writes
        srv.signal(signal.SIGKILL)
        srv.wait(10)
        stop.set()
        t.join(10)
        now = completed_files(dlq / "s3")
        temps = [p.name for p in (dlq / "s3").iterdir() if p.name.startswith(".")]
        claims = [n for n in now if any((dlq / "s3").glob(n + ".claim-*"))]
        print(f"round {r}: {len(now)} completed files, {len(claims)} claimed, {len(temps)} temp files at kill")
        assert len(now) >= want - 5, srv.log()[-2000:]
        seen.update(now)
    # one more: no traffic, the replayer probes the backlog against an endpoint that never answers;
    # kill -9 while it holds a claim — the restart must recover the claim and deliver the file
    srv = ServerProcess({**env, "S3_ENDPOINT_URL": blackhole, "S3_TIMEOUT": "5s"}, tmp_path).start()
    deadline = time.monotonic() + 20
    while not list((dlq / "s3").glob("*.claim-*")) and time.monotonic() < deadline:
        time.sleep(0.01)
    srv.signal(signal.SIGKILL)
    srv.wait(10)
    hole.close()
    claimed = [p.name for p in (dlq / "s3").glob("*.claim-*")]
    assert claimed, "the replayer never claimed a file: " + srv.log()[-2000:]
    seen.update(completed_files(dlq / "s3"))
    assert len(seen) >= ROUNDS * 5
    srv = ServerProcess({**env, "S3_ENDPOINT_URL": moto.endpoint, "LOG_LEVEL": "info"}, tmp_path).start()
    try:
        deadline = time.monotonic() + 60
        while completed_files(dlq / "s3") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert completed_files(dlq / "s3") == {}, srv.log()[-3000:]
        while (dlq / torn).exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        assert srv.stop() == 0, srv.log()[-3000:]
    objs = s3_objects(s3, bucket)
    for key, data in objs.items():  # every object is a whole, valid gzip JSONL stream
        assert key.startswith("raw/"), key
        gzip.decompress(data)
        assert decode_object(key, data)
    for name, data in seen.items():  # every completed file delivered, byte-identical, under its own key
        key = f"raw/{partition(int(name[:10]), TZ)}/{name}"
        assert objs.get(key) == data, name
    ids = [r["id"] for k, d in objs.items() for r in decode_object(k, d)]
    assert len(ids) == len(set(ids))
    assert not any(torn in k for k in objs)
    assert data_files(dlq / "corrupt") == [torn]

"""`serve --workers 2`: SIGTERM under load loses nothing, names are unique per worker, a killed
worker is restarted and serving goes on. Real subprocesses, real signals, real sockets."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from tests.helpers import ServerProcess, decode_object, file_objects, http, records_of

FRONTS = ("aiohttp", "fast")  # every test here runs against both HTTP fronts (tests/conftest.py)


def workers(pid: int) -> set[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return set()
    out = set()
    for p in text.split():  # workers only, not multiprocessing's resource tracker
        try:
            if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes():
                out.add(int(p))
        except OSError:
            pass
    return out


def wait_for(cond: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


class Load:
    """Client threads POSTing unique events (a new connection each) until the server refuses."""

    def __init__(self, url: str, threads: int = 6) -> None:
        self.url = url
        self.accepted: list[str] = []
        self.other: list[int] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(t,), daemon=True) for t in range(threads)]

    def _run(self, t: int) -> None:
        n = 0
        while not self._stop.is_set():
            body = orjson.dumps({"t": t, "n": n, "pad": "x" * 200}).decode()
            n += 1
            try:
                status = http("POST", self.url + "/collect", body.encode(), timeout=10)[0]
            except OSError:
                return  # listener closed: the server is draining
            with self._lock:
                (self.accepted.append(body) if status == 200 else self.other.append(status))

    def start(self) -> Load:
        for th in self._threads:
            th.start()
        return self

    def count(self) -> int:
        with self._lock:
            return len(self.accepted)

    def stop(self) -> None:
        self._stop.set()
        for th in self._threads:
            th.join(30)
            assert not th.is_alive()


def dlq_objects(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.startswith(".") and not p.name.endswith(".meta.json")}


def instances(names: list[str]) -> set[str]:
    # <unix>_<instance>_<counter>.jsonl.gz, split from both ends (instance may contain "_")
    return {os.path.basename(n).split("_", 1)[1].rsplit("_", 1)[0] for n in names}


def test_sigterm_under_load_delivers_every_accepted_event_once(tmp_path: Path) -> None:
    data, dlq = tmp_path / "data", tmp_path / "dlq"
    srv = ServerProcess({"FILE_SINK_DIR": str(data), "DLQ_DIR": str(dlq), "BATCH_SIZE": "300",
                         "SHUTDOWN_TIMEOUT": "20s"}, tmp_path, args=("--workers", "2")).start()
    load = Load(srv.url)
    try:
        assert srv.proc is not None
        wait_for(lambda: len(workers(srv.proc.pid)) == 2, what="two workers")
        load.start()
        wait_for(lambda: load.count() >= 1500, what="1500 accepted events")
        srv.signal(signal.SIGTERM)  # while the clients are still sending
        code = srv.wait(60)
    finally:
        load.stop()
        srv.kill()
    assert code == 0, srv.log()
    objects = {**file_objects(data), **{f"dlq/{k}": v for k, v in dlq_objects(dlq).items()}}
    bodies = [r["body"] for _, r in records_of(objects)]
    assert len(load.accepted) >= 1500
    assert sorted(bodies) == sorted(load.accepted)  # every 2xx event exactly once, nothing else
    assert set(load.other) <= {503}
    names = [k for k in objects]
    assert len({os.path.basename(n) for n in names}) == len(names)
    inst = instances(names)
    assert {i.split("-")[1] for i in inst} == {"w0", "w1"}, inst  # both workers served and wrote
    assert all(i.startswith("test-w") for i in inst)
    logs = srv.log_records()
    stopped = [r for r in logs if r.get("message") == "worker stopped"]
    assert sorted(r["worker"] for r in stopped) == [0, 1]
    assert all(r["exit_code"] == 0 for r in stopped)


def test_sink_down_every_accepted_event_lands_in_the_worker_dlq(tmp_path: Path, moto: Any, s3: Any) -> None:
    dlq = tmp_path / "dlq"
    srv = ServerProcess({"RAW_BUCKET": "no-such-bucket-here", "S3_ENDPOINT_URL": moto.endpoint,
                         "AWS_REGION": "us-east-1", "DLQ_DIR": str(dlq), "BATCH_SIZE": "200",
                         "S3_APP_RETRIES": "0", "SHUTDOWN_TIMEOUT": "20s"},
                        tmp_path, args=("--workers", "2")).start()
    load = Load(srv.url, threads=4)
    try:
        assert srv.proc is not None
        wait_for(lambda: len(workers(srv.proc.pid)) == 2, what="two workers")
        load.start()
        wait_for(lambda: load.count() >= 800, what="800 accepted events")
        srv.signal(signal.SIGTERM)
        code = srv.wait(60)
    finally:
        load.stop()
        srv.kill()
    assert code == 0, srv.log()
    files = dlq_objects(dlq)
    bodies = [r["body"] for _, r in records_of(files)]
    assert sorted(bodies) == sorted(load.accepted)
    subdirs = {k.split("/")[0] for k in files}
    assert subdirs == {"w0", "w1"}, subdirs  # each worker has its own DLQ subdirectory
    for key, data in files.items():
        meta = orjson.loads((dlq / (key + ".meta.json")).read_bytes())
        assert meta["num_events"] == len(decode_object(key, data))
    assert s3.list_buckets()["Buckets"] is not None  # moto answered; nothing was stored anywhere
    assert not any(b["Name"] == "no-such-bucket-here" for b in s3.list_buckets()["Buckets"])


def test_a_killed_worker_is_restarted_and_serving_continues(tmp_path: Path) -> None:
    data, dlq = tmp_path / "data", tmp_path / "dlq"
    srv = ServerProcess({"FILE_SINK_DIR": str(data), "DLQ_DIR": str(dlq), "BATCH_SIZE": "50"},
                        tmp_path, args=("--workers", "2")).start()
    try:
        assert srv.proc is not None
        parent = srv.proc.pid
        wait_for(lambda: _listening(srv) == [0, 1], what="two workers listening")
        victim = min(workers(parent))
        index = next(r["worker"] for r in srv.log_records()
                     if r.get("message") == "worker started" and r.get("pid") == victim)
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: _listening(srv).count(index) == 2, what="the restarted worker listening")
        assert victim not in workers(parent) and len(workers(parent)) == 2
        sent = []
        for i in range(300):  # a new connection each: the kernel spreads them over both workers
            body = orjson.dumps({"after_restart": i}).decode()
            assert srv.post(body.encode())[0] == 200
            sent.append(body)
        assert http("GET", srv.url + "/health")[0] == 200
    finally:
        code = srv.stop() if srv.proc is not None and srv.proc.poll() is None else -1
        srv.kill()
    assert code == 0, srv.log()
    logs = srv.log_records()
    died = [r for r in logs if r.get("message") == "worker died unexpectedly: restarting"]
    assert len(died) == 1 and died[0]["exit_code"] == -signal.SIGKILL
    started = [r for r in logs if r.get("message") == "worker started"]
    assert len(started) == 3 and started[-1]["worker"] == died[0]["worker"]
    objects = file_objects(data)
    bodies = sorted(r["body"] for _, r in records_of(objects))
    assert bodies == sorted(sent)
    inst = instances(list(objects))
    assert len(inst) >= 2 and all(i.startswith("test-w") for i in inst)
    assert os.path.isdir(dlq / f"w{died[0]['worker']}")  # the new worker reuses its slot's DLQ dir


def _listening(srv: ServerProcess) -> list[int]:
    """Worker index of every "listening" line so far, sorted."""
    return sorted(r["worker"] for r in srv.log_records() if r.get("message") == "listening")


def test_sigterm_while_workers_start_still_drains_and_exits_0(tmp_path: Path) -> None:
    srv = ServerProcess({"FILE_SINK_DIR": str(tmp_path / "data"), "DLQ_DIR": str(tmp_path / "dlq")},
                        tmp_path, args=("--workers", "2")).start(wait_ready=False)
    try:
        # the parent logs "worker started" right after spawning: the workers are still importing
        wait_for(lambda: sum(r.get("message") == "worker started" for r in srv.log_records()) == 2,
                 what="two workers spawned")
        srv.signal(signal.SIGTERM)
        code = srv.wait(60)
    finally:
        srv.kill()
    assert code == 0, srv.log()
    stopped = [r for r in srv.log_records() if r.get("message") == "worker stopped"]
    assert sorted((r["worker"], r["exit_code"]) for r in stopped) == [(0, 0), (1, 0)]

"""Metrics that tell the truth with `serve --workers 2` (real subprocesses, both HTTP fronts):
/metrics on the shared port reports the whole group on every scrape, whichever worker answers it;
each worker really served traffic (read from its own registry through the group's socket); promtool
accepts the merged text; METRICS_ADDR moves /metrics, /health and /ready to a port of their own,
with and without workers, and the public port then answers /metrics 404."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
from pathlib import Path

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from estat_ingest.groupmetrics import GroupLink, decode
from tests.e2e.test_workers import _listening, wait_for
from tests.helpers import ServerProcess, free_port, http

FRONTS = ("aiohttp", "fast")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def value(got: Samples, name: str, **labels: str) -> float | None:
    return got.get((name, frozenset(labels.items())))


def scrape(url: str) -> Samples:
    status, headers, body = http("GET", url + "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4"), (status, body)
    return samples(body.decode())


def traffic(url: str, threads: int = 6, per_thread: int = 60) -> tuple[int, int]:
    """POSTs on a new connection each, from several threads, 1 in 6 of them invalid JSON (400):
    (answered 2xx, answered 400)."""
    counts = {"ok": 0, "bad": 0}
    lock = threading.Lock()

    def run(t: int) -> None:
        for n in range(per_thread):
            bad = n % 6 == 5
            body = b"{not json" if bad else orjson.dumps({"t": t, "n": n})
            status = http("POST", url + "/collect", body)[0]
            with lock:
                if 200 <= status < 300:
                    counts["ok"] += 1
                elif status == 400:
                    counts["bad"] += 1

    workers = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for th in workers:
        th.start()
    for th in workers:
        th.join(120)
        assert not th.is_alive()
    assert counts["ok"] + counts["bad"] == threads * per_thread  # nothing else (no 503 at this rate)
    return counts["ok"], counts["bad"]


def run_dir(srv: ServerProcess) -> str:
    [line] = [r for r in srv.log_records() if r.get("message") == "starting workers"]
    return str(line["run_dir"])


def worker_registry(link: GroupLink, index: int) -> Samples:
    """One worker's own registry, read as the parent reads it (its socket in the run directory)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(link.worker_socket(index))
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    snap = decode(b"".join(chunks))
    assert snap.worker == index
    return {(n, frozenset(lab)): v for f in snap.families for (n, lab), v in f.samples.items()}


def start_workers(tmp_path: Path, env: dict[str, str] | None = None) -> ServerProcess:
    srv = ServerProcess({"FILE_SINK_DIR": str(tmp_path / "data"), "DLQ_DIR": str(tmp_path / "dlq"),
                         **(env or {})}, tmp_path, args=("--workers", "2"))
    srv.start()
    wait_for(lambda: _listening(srv) == [0, 1], what="two workers listening")
    return srv


def test_every_scrape_of_the_shared_port_reports_the_whole_group(tmp_path: Path) -> None:
    srv = start_workers(tmp_path)
    try:
        ok, bad = traffic(srv.url)
        link = GroupLink(run_dir(srv), 2)
        per_worker = [value(worker_registry(link, i), "http_requests_accepted_total") or 0 for i in range(2)]
        assert all(n > 0 for n in per_worker), per_worker  # the kernel gave both workers connections
        assert sum(per_worker) == ok
        texts = []
        for _ in range(10):  # new connections: the scrapes land on both workers
            status, _, body = http("GET", srv.url + "/metrics")
            assert status == 200
            texts.append(body.decode())
            got = samples(texts[-1])
            assert value(got, "http_requests_accepted_total") == ok
            assert value(got, "http_requests_total") == ok  # every request that reached the enqueue step
            assert value(got, "http_requests_rejected_total", reason="invalid_json") == bad
            assert value(got, "ingest_events_accepted_total") == ok
            assert value(got, "estat_ingest_workers") == 2 and value(got, "estat_ingest_workers_scraped") == 2
            assert value(got, "ingest_ready") == 1
            assert value(got, "ingest_queue_capacity_events") == 2 * 4000
            assert value(got, "dlq_files_current", sink="file") == 0
            for worker in ("0", "1", "supervisor"):
                assert (value(got, "process_resident_memory_bytes", worker=worker) or 0) > 0
        promtool = shutil.which("promtool")
        if promtool is None:
            pytest.skip("promtool not installed (Debian package `prometheus`; `make test` installs it); "
                        "the merged /metrics lint skipped")
        out = subprocess.run([promtool, "check", "metrics"], input=texts[-1], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
    finally:
        code = srv.stop()
        srv.kill()
    assert code == 0, srv.log()


def test_metrics_addr_serves_the_group_and_the_public_port_hides_metrics(tmp_path: Path) -> None:
    mport = free_port()
    srv = start_workers(tmp_path, {"METRICS_ADDR": f"127.0.0.1:{mport}"})
    murl = f"http://127.0.0.1:{mport}"
    try:
        ok, bad = traffic(srv.url, threads=4, per_thread=30)
        assert http("GET", srv.url + "/metrics")[0] == 404  # not on the public port
        assert http("GET", srv.url + "/ready")[0] == 200  # the load balancer's probes stay there
        for _ in range(3):
            got = scrape(murl)
            assert value(got, "http_requests_accepted_total") == ok
            assert value(got, "http_requests_rejected_total", reason="invalid_json") == bad
            assert value(got, "estat_ingest_workers_scraped") == 2
        assert http("GET", murl + "/health")[:3:2] == (200, b"ok")
        assert http("GET", murl + "/ready")[0] == 200
        assert http("GET", murl + "/collect")[0] == 404  # only the three routes
        starting = [r for r in srv.log_records() if r.get("message") == "starting workers"]
        assert starting[0]["metrics_addr"] == f"127.0.0.1:{mport}"
    finally:
        code = srv.stop()
        srv.kill()
    assert code == 0, srv.log()


def test_metrics_addr_without_workers(tmp_path: Path) -> None:
    mport = free_port()
    srv = ServerProcess({"FILE_SINK_DIR": str(tmp_path / "data"), "DLQ_DIR": str(tmp_path / "dlq"),
                         "METRICS_ADDR": f"127.0.0.1:{mport}"}, tmp_path)
    murl = f"http://127.0.0.1:{mport}"
    try:
        srv.start()
        ok, bad = traffic(srv.url, threads=2, per_thread=30)
        assert http("GET", srv.url + "/metrics")[0] == 404
        assert http("GET", srv.url + "/health")[0] == 200
        got = scrape(murl)
        assert value(got, "http_requests_accepted_total") == ok
        assert value(got, "http_requests_rejected_total", reason="invalid_json") == bad
        assert value(got, "estat_ingest_workers") == 1 and value(got, "estat_ingest_workers_scraped") == 1
        assert value(got, "process_cpu_seconds_total") is not None  # one process: no worker label
        assert http("GET", murl + "/health")[:3:2] == (200, b"ok")
        assert http("GET", murl + "/ready")[:3:2] == (200, b"ready")
        [listening] = [r for r in srv.log_records() if r.get("message") == "listening"]
        assert listening["metrics_addr"] == f"127.0.0.1:{mport}"
    finally:
        code = srv.stop()
        srv.kill()
    assert code == 0, srv.log()

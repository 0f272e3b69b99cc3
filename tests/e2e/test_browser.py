"""A real browser (headless Debian Chromium) against real servers: cross-origin fetch with JSON,
credentialed fetch, and navigator.sendBeacon (v1 defect §9 m — v1 sent no CORS headers, so
the allowed-origin fetch below fails on v1's behaviour).

Set-up: a page served by this test on one localhost port calls two `estat-ingest serve` processes
on two other ports: one allows the page's origin, one allows only another origin. The page posts
what it saw to its own server (/report); the events are read back from each file sink.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.helpers import file_objects, records_of

FRONTS = ("aiohttp", "fast")  # every test here runs against both HTTP fronts (tests/conftest.py)

CHROMIUM = "/usr/bin/chromium"

PAGE = """<!doctype html><meta charset="utf-8"><title>estat browser test</title>
<script>
const q = new URLSearchParams(location.search);
const run = q.get("run");
async function main() {
  const out = {};
  for (const name of ["ok", "bad"]) {
    const url = `http://127.0.0.1:${q.get(name)}/collect`;
    try {
      const r = await fetch(url, {method: "POST", headers: {"Content-Type": "application/json"},
                                  body: JSON.stringify({via: "fetch", server: name, run})});
      out[name + "_fetch"] = r.status;
    } catch (e) { out[name + "_fetch"] = "error:" + e.name; }
    try {
      const r = await fetch(url, {method: "POST", credentials: "include",
                                  headers: {"Content-Type": "application/json"},
                                  body: JSON.stringify({via: "fetch-credentials", server: name, run})});
      out[name + "_fetch_credentials"] = r.status;
    } catch (e) { out[name + "_fetch_credentials"] = "error:" + e.name; }
    out[name + "_beacon"] = navigator.sendBeacon(url, JSON.stringify({via: "beacon", server: name, run}));
  }
  await fetch("/report", {method: "POST", body: JSON.stringify(out)});
}
main().catch(e => fetch("/report", {method: "POST", body: JSON.stringify({page_error: String(e)})}));
</script>
"""


class PageServer:
    def __init__(self) -> None:
        self.report: dict[str, Any] | None = None
        self.got = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = PAGE.encode() if self.path.startswith("/?") else b""
                self.send_response(200 if body else 404)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                data = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.path == "/report":
                    outer.report = orjson.loads(data)
                    outer.got.set()
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> PageServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


@pytest.fixture
def chromium() -> Iterator[str]:
    if not os.path.exists(CHROMIUM) or shutil.which(CHROMIUM) is None:
        pytest.skip(f"{CHROMIUM} not installed (Debian: apt-get install -y chromium); browser test skipped")
    yield CHROMIUM


def run_chromium(binary: str, url: str, profile: Path, page: PageServer, timeout: float = 60) -> None:
    proc = subprocess.Popen(
        [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", f"--user-data-dir={profile}", url],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        page.got.wait(timeout)
        # beacons are queued by the browser: give them a moment to leave before closing it
        time.sleep(0.5)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # the group this test started, nothing else
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(15)


def events(root: Path, run: str) -> list[dict[str, Any]]:
    out = []
    for _, rec in records_of(file_objects(root)) if root.exists() else []:
        body = orjson.loads(rec["body"])
        if body.get("run") == run:
            out.append(body)
    return out


def test_fetch_and_send_beacon_from_a_real_browser(chromium: str, tmp_path: Path, spawn: Any) -> None:
    run = uuid.uuid4().hex
    with PageServer() as page:
        origin = f"http://127.0.0.1:{page.port}"
        ok = spawn({"FILE_SINK_DIR": str(tmp_path / "ok"), "DLQ_DIR": str(tmp_path / "dlq-ok"),
                    "FLUSH_INTERVAL": "200ms", "CORS_ALLOW_ORIGINS": origin}, tmp_path)
        bad = spawn({"FILE_SINK_DIR": str(tmp_path / "bad"), "DLQ_DIR": str(tmp_path / "dlq-bad"),
                     "FLUSH_INTERVAL": "200ms", "CORS_ALLOW_ORIGINS": "https://other.example"}, tmp_path)
        try:
            url = f"{origin}/?ok={ok.port}&bad={bad.port}&run={run}"
            run_chromium(chromium, url, tmp_path / "profile", page)
            assert page.report is not None, "the page never reported (chromium did not run the script)"
            # beacons are fire-and-forget: wait (bounded) until both arrived
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not (
                any(e["via"] == "beacon" for e in events(tmp_path / "ok", run))
                and any(e["via"] == "beacon" for e in events(tmp_path / "bad", run))
            ):
                time.sleep(0.2)
        finally:
            assert ok.stop() == 0 and bad.stop() == 0
    report = page.report
    print(f"\nbrowser report: {report}")
    assert report["ok_fetch"] == 200  # the status is readable only if the CORS check passed
    assert report["ok_fetch_credentials"] == 200
    assert report["ok_beacon"] is True and report["bad_beacon"] is True
    # the origin is not allowed: the preflight fails, so fetch rejects as a browser does
    assert str(report["bad_fetch"]).startswith("error:TypeError")
    assert str(report["bad_fetch_credentials"]).startswith("error:TypeError")
    ok_events = sorted(e["via"] for e in events(tmp_path / "ok", run))
    bad_events = sorted(e["via"] for e in events(tmp_path / "bad", run))
    assert ok_events == ["beacon", "fetch", "fetch-credentials"]
    assert bad_events == ["beacon"]  # sendBeacon's text/plain needs no preflight; fetch never got sent

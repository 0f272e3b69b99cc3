"""Load for crash tests: clients that remember which of their events were answered 2xx.

Each request carries one event whose body is a unique marker (`{"m": "<client>-<n>", ...}`), so a
stored record can be traced back to the request that sent it. `acked` holds the markers of every
2xx answer; `sent` every marker attempted (answered or not: a killed server answers nothing).
"""

from __future__ import annotations

import http.client
import threading
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import orjson

from tests.helpers import decode_object


class Load:
    def __init__(self, port: int, clients: int = 8, tag: str = "", ndjson: int = 0) -> None:
        self.port = port
        self.clients = clients
        self.tag = tag
        self.ndjson = ndjson  # >0: NDJSON requests of this many events (markers "<m>.<k>")
        self.acked: set[str] = set()
        self.sent: set[str] = set()
        self.statuses: Counter[int] = Counter()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def start(self) -> Load:
        for c in range(self.clients):
            t = threading.Thread(target=self._client, args=(c,), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def __len__(self) -> int:
        return len(self.acked)

    def _markers(self, m: str) -> list[str]:
        return [f"{m}.{k}" for k in range(self.ndjson)] if self.ndjson else [m]

    def _client(self, c: int) -> None:
        n = 0
        conn: http.client.HTTPConnection | None = None
        while not self._stop.is_set():
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            m = f"{self.tag}c{c}-{n}"
            n += 1
            markers = self._markers(m)
            if self.ndjson:
                body = b"".join(orjson.dumps({"m": x, "pad": "p" * 100}) + b"\n" for x in markers)
                headers = {"Content-Type": "application/x-ndjson"}
            else:
                body = orjson.dumps({"m": m, "pad": "p" * 100})
                headers = {"Content-Type": "application/json"}
            with self._lock:
                self.sent.update(markers)
            try:
                conn.request("POST", "/collect", body, headers)
                resp = conn.getresponse()
                resp.read()
                status = resp.status
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = None
                if self._stop.wait(0.05):
                    break
                continue
            with self._lock:
                self.statuses[status] += 1
                if 200 <= status < 300:
                    self.acked.update(markers)
            if resp.getheader("Connection", "").lower() == "close":
                conn.close()
                conn = None
        if conn is not None:
            conn.close()


def stored_markers(objects: Mapping[str, bytes]) -> tuple[Counter[str], list[str]]:
    """How many times each marker is stored, and every stored record's id."""
    seen: Counter[str] = Counter()
    ids: list[str] = []
    for key, data in objects.items():
        for rec in decode_object(key, data):
            ids.append(rec["id"])
            seen[orjson.loads(rec["body"])["m"]] += 1
    return seen, ids


def assert_exactly_once(acked: Iterable[str], sent: Iterable[str], objects: Mapping[str, bytes],
                        what: str = "") -> dict[str, Any]:
    """Every acknowledged event stored exactly once; nothing stored that was never sent; no id twice."""
    seen, ids = stored_markers(objects)
    acked, sent = set(acked), set(sent)
    missing = sorted(m for m in acked if seen[m] == 0)
    twice = sorted(m for m, k in seen.items() if k > 1)
    assert not missing, f"{what}: {len(missing)} of {len(acked)} acknowledged events lost, e.g. {missing[:5]}"
    assert not twice, f"{what}: {len(twice)} events stored more than once, e.g. {twice[:5]}"
    assert set(seen) <= sent, f"{what}: stored events nobody sent: {sorted(set(seen) - sent)[:5]}"
    assert len(ids) == len(set(ids)), f"{what}: a record id stored twice"
    return {"acked": len(acked), "stored": len(seen), "unacked_stored": len(set(seen) - acked)}

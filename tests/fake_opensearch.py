"""A local OpenSearch stand-in that speaks `_bulk` as OpenSearch documents it, and can be scripted.

It runs an aiohttp server on 127.0.0.1 in its own thread (like moto's ThreadedMotoServer), so it
serves both in-process sink tests and `estat-ingest serve` subprocesses.

`POST /_bulk` (and `/<index>/_bulk`): NDJSON action/document pairs; `create` with `_id` indexes
the document or answers 409 version_conflict_engine_exception when the `_id` exists in that
index; the response is {"took", "errors", "items": [{"create": {"_index", "_id", "status", ...}}]}.
`GET /` answers the cluster info. Request bodies are kept raw (auto-decompression off) so a
test can check a SigV4 signature over exactly the bytes sent.

Scripting (set attributes, thread-safe enough for tests: the server thread only reads them):
- `status_script`: a list of whole-request statuses answered before normal service (e.g. 503s);
  `down`: every request answers `down_status` (503 by default) until cleared;
- `throttle_every`: on the FIRST time an `_id` is seen, every N-th item of a request gets an
  item-level 429 es_rejected_execution_exception (the share is 1/N);
- documents whose `event` has `"reject": true` get an item-level 400 mapper_parsing_exception;
- `delay_s` / `delay_script` (per request): answer slowly; `drop_script`: a list of booleans —
  True closes the connection without an answer (after indexing when `drop_after_index`, the ambiguous case);
- `basic_auth=(user, password)`: other credentials get 401.

`GET /<index>` answers the index's settings (`index_settings[name]`, e.g. `{"blocks": {"write":
"true"}}`) when it has documents or settings, else 404 `index_not_found_exception`;
`GET /_index_template` answers `index_templates` (as OpenSearch lists them).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import ssl
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from tests.helpers import free_port


@dataclass
class SeenRequest:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    raw: bytes  # exactly as received (compressed when Content-Encoding: gzip)
    ids: list[str] = field(default_factory=list)
    status: int = 0


class FakeOpenSearch:
    def __init__(self, port: int | None = None, ssl_context: ssl.SSLContext | None = None) -> None:
        self.port = port or free_port()
        self.ssl_context = ssl_context
        self.docs: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)  # index → _id → source
        self.create_calls: Counter[str] = Counter()  # _id → create actions received
        self.indexed: Counter[str] = Counter()  # _id → times actually indexed (must be ≤ 1)
        self.requests: list[SeenRequest] = []
        self.item_statuses: Counter[int] = Counter()
        # script
        self.status_script: list[int] = []
        self.down = False
        self.down_status = 503
        self.throttle_every = 0
        self.delay_s = 0.0
        self.delay_script: list[float] = []
        self.drop_script: list[bool] = []
        self.drop_after_index = True
        self.basic_auth: tuple[str, str] | None = None
        self.index_settings: dict[str, dict[str, Any]] = {}  # index → its `settings.index`
        self.index_templates: list[dict[str, Any]] = []  # [{"name": …, "index_template": {…}}]
        self.root_status = 200  # 404: no `GET /`, as OpenSearch Serverless
        # machinery
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._started = threading.Event()
        self._stop: asyncio.Event | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://127.0.0.1:{self.port}"

    # ------------------------------------------------------------------ views for assertions

    def all_docs(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {i: d for idx in self.docs.values() for i, d in idx.items()}

    def index_of(self) -> dict[str, str]:
        with self._lock:
            return {i: name for name, idx in self.docs.items() for i in idx}

    def bulk_requests(self) -> list[SeenRequest]:
        with self._lock:
            return [r for r in self.requests if r.path.endswith("_bulk")]

    # ------------------------------------------------------------------ server

    def _app(self) -> web.Application:
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_get("/", self._root)
        app.router.add_route("*", "/_bulk", self._bulk)
        app.router.add_route("*", "/{index}/_bulk", self._bulk)
        app.router.add_get("/_index_template", self._templates)
        app.router.add_get("/{index}", self._index)
        return app

    async def _templates(self, request: web.Request) -> web.StreamResponse:
        self._record(request, b"")
        if not self._auth_ok(request):
            return web.json_response({"error": "Unauthorized"}, status=401)
        return web.json_response({"index_templates": self.index_templates})

    async def _index(self, request: web.Request) -> web.StreamResponse:
        self._record(request, b"")
        if not self._auth_ok(request):
            return web.json_response({"error": "Unauthorized"}, status=401)
        name = request.match_info["index"]
        with self._lock:
            known = name in self.docs or name in self.index_settings
            settings = dict(self.index_settings.get(name, {}))
        if not known:
            return web.json_response({"error": {"type": "index_not_found_exception",
                                                "reason": f"no such index [{name}]", "index": name},
                                      "status": 404}, status=404)
        return web.json_response({name: {"settings": {"index": settings}}} if settings else {})

    def _auth_ok(self, request: web.Request) -> bool:
        if self.basic_auth is None:
            return True
        want = "Basic " + base64.b64encode(f"{self.basic_auth[0]}:{self.basic_auth[1]}".encode()).decode()
        return request.headers.get("Authorization") == want

    async def _root(self, request: web.Request) -> web.StreamResponse:
        self._record(request, await request.read())
        if self.down:
            return web.Response(status=self.down_status)
        if not self._auth_ok(request):
            return web.json_response({"error": "Unauthorized"}, status=401)
        if self.root_status != 200:
            return web.Response(status=self.root_status)
        return web.json_response({"name": "fake", "cluster_name": "fake",
                                  "version": {"distribution": "opensearch", "number": "2.17.0"}})

    def _record(self, request: web.Request, raw: bytes) -> SeenRequest:
        seen = SeenRequest(request.method, request.path, request.query_string, dict(request.headers), raw)
        with self._lock:
            self.requests.append(seen)
        return seen

    async def _bulk(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        seen = self._record(request, raw)
        delay = self.delay_script.pop(0) if self.delay_script else self.delay_s
        if delay:
            await asyncio.sleep(delay)
        if self.down:
            seen.status = self.down_status
            return web.json_response({"error": "unavailable", "status": self.down_status},
                                     status=self.down_status)
        if self.status_script:
            status = self.status_script.pop(0)
            if status != 200:
                seen.status = status
                seen.ids = self._ids_of(raw, request.headers.get("Content-Encoding"))
                return web.json_response({"error": {"type": "scripted", "reason": "scripted"}, "status": status},
                                         status=status)
        if not self._auth_ok(request):
            seen.status = 401
            return web.json_response({"error": "Unauthorized"}, status=401)
        body = gzip.decompress(raw) if request.headers.get("Content-Encoding") == "gzip" else raw
        drop = self.drop_script.pop(0) if self.drop_script else False
        if drop and not self.drop_after_index:
            assert request.transport is not None
            request.transport.close()
            return web.Response(status=500)  # never reaches the client
        default_index = request.match_info.get("index")
        items = self._apply(body, default_index, seen)
        if drop:
            assert request.transport is not None
            request.transport.close()
            return web.Response(status=500)
        seen.status = 200
        errors = any(next(iter(i.values()))["status"] >= 300 for i in items)
        return web.Response(body=orjson.dumps({"took": 3, "errors": errors, "items": items}),
                            content_type="application/json")

    @staticmethod
    def _ids_of(raw: bytes, encoding: str | None) -> list[str]:
        body = gzip.decompress(raw) if encoding == "gzip" else raw
        lines = [ln for ln in body.split(b"\n") if ln.strip()]
        return [next(iter(orjson.loads(a).values()))["_id"] for a in lines[0::2]]

    def _apply(self, body: bytes, default_index: str | None, seen: SeenRequest) -> list[dict[str, Any]]:
        lines = [ln for ln in body.split(b"\n") if ln.strip()]
        assert body.endswith(b"\n"), "a _bulk body must end with a newline"
        items: list[dict[str, Any]] = []
        k = 0
        with self._lock:
            while k < len(lines):
                action = orjson.loads(lines[k])
                (op, meta), = action.items()
                assert op == "create", f"only create is expected, got {op}"
                source = orjson.loads(lines[k + 1])
                k += 2
                index = meta.get("_index") or default_index
                _id = meta["_id"]
                seen.ids.append(_id)
                first_time = self.create_calls[_id] == 0
                self.create_calls[_id] += 1
                position = len(items)
                if first_time and self.throttle_every and position % self.throttle_every == 0:
                    item = {"_index": index, "_id": _id, "status": 429, "error": {
                        "type": "es_rejected_execution_exception",
                        "reason": "rejected execution of coordinating operation"}}
                elif isinstance(source.get("event"), dict) and source["event"].get("reject") is True:
                    item = {"_index": index, "_id": _id, "status": 400, "error": {
                        "type": "mapper_parsing_exception",
                        "reason": "failed to parse field [event.reject] of type [long] in document with id "
                                  f"'{_id}'"}}
                elif _id in self.docs[index]:
                    item = {"_index": index, "_id": _id, "status": 409, "error": {
                        "type": "version_conflict_engine_exception",
                        "reason": f"[{_id}]: version conflict, document already exists (current version [1])",
                        "index": index, "shard": "0", "index_uuid": "fake-uuid"}}
                else:
                    self.docs[index][_id] = source
                    self.indexed[_id] += 1
                    item = {"_index": index, "_id": _id, "_version": 1, "result": "created",
                            "_shards": {"total": 2, "successful": 1, "failed": 0},
                            "_seq_no": len(self.docs[index]), "_primary_term": 1, "status": 201}
                self.item_statuses[item["status"]] += 1
                items.append({"create": item})
        return items

    # ------------------------------------------------------------------ lifecycle (own thread)

    def start(self) -> FakeOpenSearch:
        self._thread = threading.Thread(target=self._run, name=f"fake-opensearch-{self.port}", daemon=True)
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("fake opensearch did not start")
        return self

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._runner = web.AppRunner(self._app(), auto_decompress=False, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True, ssl_context=self.ssl_context)
        await site.start()
        self._started.set()
        await self._stop.wait()
        await self._runner.cleanup()

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(10)
            self._thread = None
            self._started.clear()

    def __enter__(self) -> FakeOpenSearch:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def self_signed(directory: Any) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 (cert.pem, key.pem) written to `directory`."""
    import datetime
    import ipaddress
    from pathlib import Path

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake-opensearch")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    d = Path(directory)
    cert_path, key_path = d / "cert.pem", d / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def server_tls(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


def wait_until(cond: Any, timeout: float = 30.0, what: str = "condition") -> None:
    """Poll a cheap condition (e.g. a counter in the fake) until it holds; fail with `what` otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if cond():
                return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")

"""Differential fuzzing of both HTTP fronts against h11 (issue 15; the oracle and the policy:
tests/http/oracle.py).

Hypothesis builds a connection's worth of requests — valid ones, pipelined sequences, and mutations
(duplicated headers, whitespace, case, obs-fold, Content-Length/Transfer-Encoding conflicts, chunk
sizes and extensions, HTTP/1.0 and 1.1, Expect, Upgrade, bare LF, CRLF between requests) — and
split points across TCP writes. Every request carries a unique marker in its event. Each example
is one fresh connection to one long-running server per front (module fixture):

1. the bytes are sent in their parts; the answers the oracle says are owed are read (bounded);
   where the connection must end, the close is waited for (bounded); where it stays open and the
   last answer did not say `Connection: close`, a probe `GET /health` must be answered;
2. the client half-closes and reads the rest; then `SinkReader.sync()` (a sentinel event on a new
   connection, stored after every earlier event: tests/helpers.py) gives what this connection stored;
3. `oracle.violations` compares: the stored events are exactly the oracle's, in order, up to a cut
   the policy allows; no 5xx; every close announced; refusals are 4xx and end the connection;
   no 100 Continue to HTTP/1.0 or before a refusal; HTTP/1.0 kept only with `Connection: keep-alive`.

Each kind of violation raises its own exception type, so hypothesis shrinks and reports every kind
separately. `FRAMING_FUZZ_EXAMPLES` (default 40 per front) bounds the run; `make fuzz` runs
thousands with shrinking (`FRAMING_FUZZ_SHRINK=1`); the default run does not shrink, to stay cheap.
Hypothesis stops generating 10 s after its first failure, so while a front has an easy bug the
others hide behind it: `make fuzz FUZZ_ONLY=<kind>` (oracle.PRIORITY lists the kinds) hunts one.
"""

from __future__ import annotations

import gzip
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import orjson
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.helpers import ServerProcess, SinkReader, running
from tests.http.oracle import PRIORITY, Oracle, Seen, frame, violations
from tests.http.rawhttp import Conn, finals

FRONTS = ("aiohttp", "fast")
MAX = 300  # MAX_BODY_SIZE of the fuzzed servers: small, so bodies over it are generated too
EXAMPLES = int(os.environ.get("FRAMING_FUZZ_EXAMPLES", "40"))
SHRINK = os.environ.get("FRAMING_FUZZ_SHRINK", "") not in ("", "0")
# triage only (`make fuzz FUZZ_ONLY=lost`): raise for these kinds alone, so hypothesis spends its
# run on one bug instead of the first and easiest; unset (always, in `make test`) = every kind
ONLY = frozenset(k for k in os.environ.get("FRAMING_FUZZ_ONLY", "").split(",") if k)
assert not ONLY - set(PRIORITY), f"FRAMING_FUZZ_ONLY: unknown kinds {sorted(ONLY - set(PRIORITY))}"
PROBE = b"GET /health HTTP/1.1\r\nHost: probe\r\n\r\n"
WAIT_S = 1.5  # per read phase: the longest a misbehaving example costs


class FramingViolation(AssertionError):
    """One kind of difference between a front and the oracle (subclassed per kind below)."""


_KINDS: dict[str, type[FramingViolation]] = {}


def violation_type(kind: str) -> type[FramingViolation]:
    """A distinct exception type per kind: hypothesis tells bugs apart by type and raise site."""
    if kind not in _KINDS:
        _KINDS[kind] = type(f"Framing_{kind}", (FramingViolation,), {})
    return _KINDS[kind]


# ---------------------------------------------------------------- the generated requests

HEADER_TARGETS = ("host", "content-length", "transfer-encoding", "content-type", "content-encoding",
                  "user-agent", "connection", "expect")


@dataclass(frozen=True)
class Mutation:
    op: str
    name: str = ""
    arg: str = ""


@dataclass(frozen=True)
class Spec:
    method: str
    path: str
    version: str
    framing: str  # "cl" | "chunked" | "none"
    pad: int
    encoding: str | None
    content_type: str | None
    connection: str | None
    upgrade: str | None
    expect: bool
    chunks: tuple[int, ...]
    size_style: str
    chunk_ext: bytes
    trailer: bool
    crlf_after: bool
    mutations: tuple[Mutation, ...] = field(default=())


mutations = st.one_of(
    st.builds(Mutation, st.just("dup"), st.sampled_from(HEADER_TARGETS), st.sampled_from(["same", "other"])),
    st.builds(Mutation, st.just("case"), st.sampled_from(HEADER_TARGETS)),
    st.builds(Mutation, st.just("ows"), st.sampled_from(HEADER_TARGETS), st.sampled_from([" ", "\t", "  ", " \t"])),
    st.builds(Mutation, st.just("space_before_colon"), st.sampled_from(HEADER_TARGETS)),
    st.builds(Mutation, st.just("fold"), st.sampled_from(HEADER_TARGETS)),
    st.builds(Mutation, st.just("cl_delta"), st.just(""), st.sampled_from(["-2", "-1", "1", "2", "+0"])),
    st.builds(Mutation, st.just("add_te"), st.just(""),
              st.sampled_from(["chunked", "x, chunked", "chunked, x", "Chunked", "identity", "x", " chunked"])),
    st.builds(Mutation, st.just("add_cl"), st.just(""), st.sampled_from(["len", "0", "5"])),
    st.builds(Mutation, st.just("cl_list")),
    st.builds(Mutation, st.just("bare_lf")),
    st.builds(Mutation, st.just("drop_host")),
    st.builds(Mutation, st.just("cl_leading_zero")),
)

T = TypeVar("T")


def weighted(common: T, *rare: T, weight: int = 3) -> st.SearchStrategy[T]:
    """`common` `weight` times as likely as each rare choice (and what shrinking goes to): most
    requests are plain, so a mutation is seen on an otherwise valid request, not behind another bug."""
    return st.sampled_from([common] * weight + list(rare))


specs = st.builds(
    Spec,
    method=weighted("POST", "GET", "GET", "OPTIONS", "PUT", "CONNECT", weight=4),
    path=weighted("/collect", "/health", "/collect.gif", "http://x/collect", "/nope", weight=4),
    version=weighted("1.1", "1.0"),
    framing=weighted("cl", "chunked", "chunked", "none"),
    pad=st.integers(0, 400),
    encoding=weighted(None, "gzip", "identity", "br"),
    content_type=weighted("application/json", None, "text/plain;charset=UTF-8"),
    connection=weighted(None, "keep-alive", "close", "Upgrade", "Upgrade, HTTP2-Settings", "keep-alive, Upgrade",
                        weight=5),
    upgrade=weighted(None, "h2c", "foo", "websocket", weight=5),
    expect=weighted(False, True),
    chunks=st.lists(st.integers(1, 40), max_size=3).map(tuple),
    size_style=st.sampled_from(["lower", "upper", "zeros", "space"]),
    chunk_ext=st.sampled_from([b"", b";a=b", b';q="x;y"', b";e", b";" + b"k" * 60 + b"=v"]),
    trailer=st.booleans(),
    crlf_after=st.booleans(),
    mutations=st.lists(mutations, max_size=3).map(tuple),
)


@dataclass(frozen=True)
class Plan:
    requests: tuple[Spec, ...]
    splits: tuple[int, ...]


plans = st.builds(Plan, st.lists(specs, min_size=1, max_size=4).map(tuple),
                  st.lists(st.integers(0, 100_000), max_size=3).map(tuple))


def _size(n: int, style: str) -> bytes:
    return {"lower": b"%x" % n, "upper": b"%X" % n, "zeros": b"00%x" % n, "space": b"%x " % n}[style]


def _chunked(body: bytes, spec: Spec) -> bytes:
    out = b""
    pos = 0
    for i, n in enumerate((*spec.chunks, len(body))):
        piece = body[pos:pos + n]
        if not piece:
            break
        pos += len(piece)
        ext = spec.chunk_ext if i == 0 else b""
        style = spec.size_style if (ext == b"" or spec.size_style != "space") else "lower"
        out += _size(len(piece), style) + ext + b"\r\n" + piece + b"\r\n"
    return out + b"0\r\n" + (b"X-Trailer: t\r\n" if spec.trailer else b"") + b"\r\n"


# a header absent from a request, added twice by a "dup" mutation with a value that does not change
# its meaning (Transfer-Encoding and Content-Length would: they are only duplicated when present)
NEUTRAL = {"host": "x", "content-type": "application/json", "content-encoding": "identity",
           "user-agent": "dup", "connection": "keep-alive"}


def _mutate(headers: list[list[str]], m: Mutation, body_len: int) -> tuple[list[list[str]], bool]:
    """Apply one mutation to [name, separator, value] triples; True when the head uses bare LF."""
    found = [h for h in headers if h[0].lower() == m.name] if m.name else []
    if m.op == "dup" and not found and m.name in NEUTRAL:
        headers += [[m.name.title(), ": ", NEUTRAL[m.name]], [m.name.title(), ": ", NEUTRAL[m.name]]]
    elif m.op == "dup" and found:
        value = found[0][2] if m.arg == "same" else {"host": "y", "content-length": str(body_len + 1),
                                                    "transfer-encoding": "chunked",
                                                    "content-type": "application/x-ndjson",
                                                    "content-encoding": "gzip"}.get(m.name, "dup")
        headers.insert(headers.index(found[0]) + 1, [found[0][0], ": ", value])
    elif m.op == "case" and found:
        found[0][0] = "".join(c.upper() if i % 2 else c.lower() for i, c in enumerate(found[0][0]))
    elif m.op == "ows" and found:
        found[0][1] = ":" + m.arg
        found[0][2] = found[0][2] + m.arg
    elif m.op == "space_before_colon" and found:
        found[0][1] = " : "
    elif m.op == "fold" and found:
        found[0][1] = ":\r\n "
    elif m.op == "cl_delta":
        for h in headers:
            if h[0].lower() == "content-length" and h[2].strip().isdigit():
                h[2] = "+" + h[2] if m.arg == "+0" else str(max(0, int(h[2]) + int(m.arg)))  # +0: a sign
    elif m.op == "add_te":
        headers.append(["Transfer-Encoding", ": ", m.arg])
    elif m.op == "add_cl":
        headers.append(["Content-Length", ": ", str(body_len) if m.arg == "len" else m.arg])
    elif m.op == "cl_list":
        for h in headers:
            if h[0].lower() == "content-length":
                h[2] = f"{h[2]}, {h[2]}"
    elif m.op == "drop_host":
        headers[:] = [h for h in headers if h[0].lower() != "host"]
    elif m.op == "cl_leading_zero":
        for h in headers:
            if h[0].lower() == "content-length":
                h[2] = "0" + h[2]
    return headers, m.op == "bare_lf"


def render(spec: Spec, marker: str) -> bytes:
    """The bytes of one request; `marker` (fixed width) is in its event."""
    if spec.method == "CONNECT":
        target = "127.0.0.1:443"
    elif spec.method == "GET" and spec.path in ("/collect", "/collect.gif", "http://x/collect"):
        target = f"{spec.path}?m={marker}&p={'q' * (spec.pad % 40)}"
    else:
        target = spec.path
    event = orjson.dumps({"m": marker, "p": "x" * spec.pad})
    wire = gzip.compress(event, mtime=0) if spec.encoding == "gzip" else event
    headers: list[list[str]] = []
    if spec.version == "1.1" or spec.pad % 2:
        headers.append(["Host", ": ", "x"])
    headers.append(["User-Agent", ": ", "fuzz/1"])
    if spec.content_type:
        headers.append(["Content-Type", ": ", spec.content_type])
    if spec.encoding:
        headers.append(["Content-Encoding", ": ", spec.encoding])
    if spec.connection:
        headers.append(["Connection", ": ", spec.connection])
    if spec.upgrade:
        headers.append(["Upgrade", ": ", spec.upgrade])
        if spec.upgrade == "h2c":
            headers.append(["HTTP2-Settings", ": ", "AAMAAABkAAQCAAAAAAIAAAAA"])
    if spec.expect:
        headers.append(["Expect", ": ", "100-continue"])
    if spec.framing == "cl":
        headers.append(["Content-Length", ": ", str(len(wire))])
        body = wire
    elif spec.framing == "chunked":
        headers.append(["Transfer-Encoding", ": ", "chunked"])
        body = _chunked(wire, spec)
    else:
        body = b""
    bare_lf = False
    for m in spec.mutations:
        headers, lf = _mutate(headers, m, len(wire))
        bare_lf = bare_lf or lf
    eol = "\n" if bare_lf else "\r\n"
    head = f"{spec.method} {target} HTTP/{spec.version}{eol}" + "".join(
        f"{n}{sep}{v}{eol}" for n, sep, v in headers) + eol
    return head.encode("latin-1") + body + (b"\r\n" if spec.crlf_after else b"")


# ---------------------------------------------------------------- one server per front

@dataclass
class Fuzzed:
    srv: ServerProcess
    store: SinkReader
    seen: int = 0  # stored records already attributed to earlier examples


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory, front: str) -> Iterator[Fuzzed]:
    tmp = tmp_path_factory.mktemp(f"framing-fuzz-{front}")
    env = {**SinkReader.SERVER_ENV, "FILE_SINK_DIR": str(tmp / "data"), "DLQ_DIR": str(tmp / "dlq"),
           "MAX_BODY_SIZE": str(MAX), "REQUEST_READ_TIMEOUT": "1s", "HEADER_READ_TIMEOUT": "2s",
           "LOG_LEVEL": "error"}
    with running(env, tmp) as srv:
        yield Fuzzed(srv, SinkReader(srv, tmp / "data", tmp / "dlq"))


def run_example(f: Fuzzed, stream: bytes, parts: list[bytes], o: Oracle) -> Seen:
    with Conn(f.srv.port, timeout=WAIT_S) as c:
        c.send_parts(parts)
        c.answers(o.answers_owed)
        c.take_all()  # answers beyond the owed ones that came with them count too
        if o.end in ("closed", "refused", "error"):
            c.wait_closed()
        before_probe = len(c.received)
        closed_early = c.closed
        last = finals(c.received)[-1:] or None
        probe = "not_sent"
        if (o.end == "open" and not c.closed and len(finals(c.received)) >= o.answers_owed
                and not (last and last[0].announces_close)):
            c.send(PROBE)
            probe = "answered" if finals(c.answers(1)) else "unanswered"
        answers = tuple(c.received[:before_probe])
        c.finish()
    records = f.store.sync()
    fresh = records[f.seen:]
    f.seen = len(records)
    return Seen(answers, closed_early, probe, tuple(r["body"] for r in fresh))


def describe(stream: bytes, parts: list[bytes], o: Oracle, seen: Seen) -> str:
    return "\n".join([
        f"stream ({len(stream)} bytes, {len(parts)} writes): {stream!r}",
        "writes: " + " | ".join(repr(p) for p in parts) if len(parts) > 1 else "writes: one",
        "oracle (h11 + policy):", o.summary(),
        "answers: " + ("; ".join(str(a) for a in seen.answers) or "none")
        + f"; closed_early={seen.closed_early} probe={seen.probe}",
        f"stored: {list(seen.stored)!r}",
    ])


FUZZ = settings(
    # `make test`: the same examples every run, no example database; `make fuzz`: random, and the
    # database (.hypothesis/) replays the last failures first
    max_examples=EXAMPLES, deadline=None, derandomize=not SHRINK, **({} if SHRINK else {"database": None}),
    phases=(Phase.explicit, Phase.reuse, Phase.generate, *((Phase.shrink,) if SHRINK else ())),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@FUZZ
@given(plan=plans)
def test_front_frames_like_h11(fuzzed: Fuzzed, plan: Plan) -> None:
    nonce = uuid.uuid4().hex[:10]
    stream = b"".join(render(spec, f"{nonce}{i:02d}") for i, spec in enumerate(plan.requests))
    cuts = sorted({s % len(stream) for s in plan.splits} - {0})
    parts = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    o = frame(stream, MAX)
    seen = run_example(fuzzed, stream, parts, o)
    found = [(k, m) for k, m in violations(o, seen) if not ONLY or k in ONLY]
    if found:
        kind, message = found[0]
        others = "".join(f"\n  also {k}: {m}" for k, m in found[1:])
        raise violation_type(kind)(f"{kind}: {message}{others}\n{describe(stream, parts, o, seen)}")


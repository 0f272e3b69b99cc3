"""Records: one JSONL line per accepted event, encoded once, at accept time.

Field order is v1's (`ts, ip, user_agent, cookie, body`) plus `id`. orjson keeps dict insertion
order, and `body` is the client's payload as a JSON string, exactly as sent (DESIGN.md §3).
"""

from __future__ import annotations

import io
import os
from itertools import repeat
from operator import itemgetter

import orjson

try:  # the records in C (estat_ingest/_speedups.c); `encode_line_py` and `encode_records_py` where it is not built
    from estat_ingest._speedups import record as _c_record
    from estat_ingest._speedups import records as _c_records
except ImportError:  # pragma: no cover - an install without a C compiler
    _c_record = None  # type: ignore[assignment]
    _c_records = None  # type: ignore[assignment]


class IdGen:
    """Event ids: unique across instances and restarts, lexicographic order = receive order.

    `<12 hex: ms since epoch><12 hex: random per process><6 hex: counter>` — 30 characters.
    The time prefix orders ids across instances; the random middle makes two processes (or one
    restarted) distinct; the counter orders and separates ids within a millisecond.
    """

    __slots__ = ("_counter", "_last_ms", "_middle", "_prefix", "_prefix_b")

    def __init__(self) -> None:
        self._middle = os.urandom(6).hex()
        self._counter = 0
        self._last_ms = 0
        self._prefix = f"{0:012x}{self._middle}"
        self._prefix_b = self._prefix.encode()

    def next(self, now: float) -> str:
        # Hot path (once per event): the time+random prefix is formatted only when the
        # millisecond changes (measured 0.74 µs → 0.37 µs per id). A clock that steps back keeps
        # the last prefix, so ids stay sorted within this process.
        ms = int(now * 1000)
        if ms > self._last_ms:
            self._advance(ms)
        c = self._counter = (self._counter + 1) & 0xFFFFFF
        return f"{self._prefix}{c:06x}"

    def _advance(self, ms: int) -> None:
        """A new millisecond: its prefix (once per ms, not per event)."""
        self._last_ms = ms
        self._prefix = f"{ms:012x}{self._middle}"
        self._prefix_b = self._prefix.encode()

    def reserve(self, now: float, n: int) -> tuple[str, int]:
        """The ids `n` calls of `next(now)` would return, as (prefix, first counter): the i-th
        (from 0) is `f"{prefix}{(first + i) & 0xFFFFFF:06x}"`. One call per request, not per event."""
        ms = int(now * 1000)
        if ms > self._last_ms:
            self._advance(ms)
        first = (self._counter + 1) & 0xFFFFFF  # (the counter after 0xFFFFFF is 0, as in `next`)
        self._counter = (self._counter + n) & 0xFFFFFF
        return self._prefix, first


def encode_record(ts: float, ip: str, user_agent: str, cookie: str, body: str, event_id: str) -> bytes:
    """One JSONL line (with its newline)."""
    return orjson.dumps(
        {"ts": int(ts), "ip": ip, "user_agent": user_agent, "cookie": cookie, "body": body, "id": event_id},
        option=orjson.OPT_APPEND_NEWLINE,
    )


def record_head(ts: float, ip: str, user_agent: str, cookie: str) -> bytes:
    """What every record of one request starts with: `{"ts":…,"ip":…,"user_agent":…,"cookie":…,"body":`.

    Encoded by orjson (so escaped exactly as in `encode_record`); raises TypeError where
    encode_record would (header text holding surrogates).
    """
    head = orjson.dumps({"ts": int(ts), "ip": ip, "user_agent": user_agent, "cookie": cookie, "body": ""})
    return head[:-3]  # without `""}`


# one record in one bytes format: the fields' JSON from orjson, the id's counter as 6 hex digits
_LINE = b'{"ts":%d,"ip":%b,"user_agent":%b,"cookie":%b,"body":%b,"id":"%b%06x"%b}\n'


def encode_line(ts: float, ip: str, user_agent: str, cookie: str, body: bytes, ids: IdGen, extra: bytes = b"") -> bytes:
    """The record of a request's one event (`body`: valid UTF-8): byte-identical to
    `encode_records(...)[0][0][1]` for one body (and to `encode_record` with `ids.next(ts)`), the
    single-event /collect path. One C call (`_speedups.record`: the five fields escaped as orjson
    escapes them, into one allocation), or `encode_line_py` where the module is not built. Raises
    TypeError (header text holding surrogates) before the id is taken. Measured for a 318-byte
    event with a browser User-Agent and Cookie: 1.3 µs for `encode_line_py`, 0.7 µs like this."""
    if _c_record is None:  # pragma: no cover - an install without a C compiler
        return encode_line_py(ts, ip, user_agent, cookie, body, ids, extra)
    # `ids.next(ts)` inline, as the prefix's bytes and the counter (once per single-event request)
    ms = int(ts * 1000)
    if ms > ids._last_ms:
        ids._advance(ms)
    counter = (ids._counter + 1) & 0xFFFFFF
    line = _c_record(ts, ip, user_agent, cookie, body, ids._prefix_b, counter, extra)  # may raise TypeError
    ids._counter = counter
    return line


def encode_line_py(ts: float, ip: str, user_agent: str, cookie: str, body: bytes, ids: IdGen,
                   extra: bytes = b"") -> bytes:
    """`encode_line` in Python (the fallback, and the definition tests hold the C call to): one
    orjson call per field and one bytes format."""
    dumps = orjson.dumps
    ip_j, ua_j, cookie_j, body_j = dumps(ip), dumps(user_agent), dumps(cookie), dumps(body.decode())
    ms = int(ts * 1000)
    if ms > ids._last_ms:
        ids._advance(ms)
    counter = ids._counter = (ids._counter + 1) & 0xFFFFFF
    return _LINE % (int(ts), ip_j, ua_j, cookie_j, body_j, ids._prefix_b, counter, extra)


_INDENTED = orjson.OPT_INDENT_2
_QUOTED = itemgetter(slice(2, -2))  # an element line of an indented list, `  "…",\n` → `"…"`


def json_strings(texts: list[str]) -> list[bytes]:
    """`[orjson.dumps(t) for t in texts]`, byte for byte, from ONE orjson call: the list dumped
    indented puts each string on a line of its own (`  "…",`), and orjson escapes every line feed
    inside a string, so the lines are the strings. A `""` after the last text gives every text's
    line the same shape.

    Measured on 100 NDJSON events of 318 B: 144 µs for an orjson call per text, 53 µs like this.
    A separate call's result costs ≈ 1 µs when the results are kept (as a request's are) against
    ≈ 0.2 µs when each is dropped at once, for an 8-byte string as for a 300-byte one: the cost is
    the allocation, not the escaping. The lines here are small exact-size bytes, found by a
    BytesIO's `readlines` (memchr)."""
    out = orjson.dumps([*texts, ""], option=_INDENTED)  # `[\n  "t1",\n  …  ""\n]`
    return list(map(_QUOTED, io.BytesIO(out).readlines()[1:-2]))


# the last three hex digits of an id's counter, for every value (4096 small bytes, ≈ 180 KB)
_LOW_DIGITS = [b"%03x" % i for i in range(0x1000)]


def encode_records(ts: float, ip: str, user_agent: str, cookie: str, bodies: list[bytes], ids: IdGen,
                   extra: bytes = b"") -> tuple[list[tuple[float, bytes]], int]:
    """Queue items `(ts, line)` for the events of one request, ids taken from `ids` in order, and the
    lines' total length (what the queue charges). `bodies`: each event's payload, valid UTF-8.

    Byte-identical to `(ts, encode_record(ts, ip, user_agent, cookie, body.decode(), ids.next(ts)))`
    per body (plus `extra` after `id`). The fields before `body` are encoded once per request (by
    orjson), the ids reserved once; the rest is one C call (`_speedups.records`: per event one
    allocation, the body's JSON string escaped as orjson escapes it, the id's hex digits), or, where
    the module is not built, `encode_records_py`. Measured per 100 NDJSON events of 318 B, the
    results kept as a request's are: 57 µs for `encode_records_py`, 35 µs like this with the
    8-byte escape loop, about a third less with the SSSE3 one (19 to 27 µs, a noisy host).
    """
    if _c_records is None:  # pragma: no cover - an install without a C compiler
        return encode_records_py(ts, ip, user_agent, cookie, bodies, ids, extra)
    head = record_head(ts, ip, user_agent, cookie)  # may raise TypeError: before any id is taken
    prefix, first = ids.reserve(ts, len(bodies))
    return _c_records(ts, head, bodies, b',"id":"' + prefix.encode(), first, b'"' + extra + b"}\n")


def encode_records_py(ts: float, ip: str, user_agent: str, cookie: str, bodies: list[bytes], ids: IdGen,
                      extra: bytes = b"") -> tuple[list[tuple[float, bytes]], int]:
    """`encode_records` in Python (the fallback, and the definition tests/pipeline/test_speedups.py
    holds the C call to): the bodies' JSON strings made by one orjson call (`json_strings`), the
    ids' last three hex digits from a table (one bytes format for the request when its counters
    cross a multiple of 0x1000), and each event one `bytes.join` of five parts (a `%` format per
    event cost 0.35 µs, the join 0.27 µs)."""
    head = record_head(ts, ip, user_agent, cookie)  # may raise TypeError: before any id is taken
    strings = json_strings(list(map(bytes.decode, bodies)))
    n = len(bodies)
    prefix, first = ids.reserve(ts, n)
    low = first & 0xFFF
    if low + n <= 0x1000:  # (so no wrap at 0x1000000 either)
        # the counters share their first three hex digits (most requests): those go in `mid`, and
        # the last three are a slice of a table instead of a format per event (13 µs → 0.5 µs
        # per 100 events)
        hexes = _LOW_DIGITS[low:low + n]
        mid = b',"id":"' + prefix.encode() + b"%03x" % (first >> 12)
    else:
        counters = range(first, first + n) if first + n <= 0x1000000 else [(first + i) & 0xFFFFFF for i in range(n)]
        hexes = ((b"%06x\n" * n) % tuple(counters)).split(b"\n")  # n ids' digits (and an empty tail)
        mid = b',"id":"' + prefix.encode()
    tail = b'"' + extra + b"}\n"
    # a C-level loop: per event one 5-tuple and one join, no Python step
    lines = list(map(b"".join, zip(repeat(head), strings, repeat(mid), hexes, repeat(tail))))
    return list(zip(repeat(ts), lines)), sum(map(len, lines))  # (repeat is endless)

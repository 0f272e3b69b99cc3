"""A request's payload → the events it holds, or the refusal: the one place where a /collect body
is decoded, split and validated (`BodyReader`), with the pure functions it is built from.

`BodyReader.post(body, Content-Type, Content-Encoding, room)` decodes the Content-Encoding, splits
an NDJSON body into its lines, validates each event (UTF-8 JSON, nesting depth) and returns the
events, in order, as bytes of valid UTF-8 (what pipeline/record.py encodes), or the `Refusal`
(status, reason, message) that answers the request. `BodyReader.query(raw)` does the same for a
GET's query string (one event). An NDJSON body
is all-or-nothing: one bad line refuses the whole request, naming the first bad line's number.

Decompression is bounded by `limit` (MAX_BODY_SIZE) WHILE it runs: a gzip bomb costs at most
`limit + 1` bytes of output before it is refused, never its full size. zstd frames also declare a
window size the decoder must allocate; `ZSTD_MAX_WINDOW` refuses frames that ask for more, so a
16-byte header cannot make the server allocate gigabytes. Small bodies make running this on the
event loop cheap (at most MAX_BODY_SIZE of output per request).

The functions below the reader are pure functions of bytes, so they can be fuzzed and
property-tested without a server.
"""

from __future__ import annotations

import io
import zlib
from collections import deque
from collections.abc import Iterator
from operator import itemgetter
from typing import Any

import orjson
import simdjson
import zstandard

from estat_ingest.config import Settings
from estat_ingest.http.policy import QUEUE_FULL, Refusal

try:  # ndjson_lines and max_openers in one C pass (estat_ingest/_speedups.c); the definitions below otherwise
    from estat_ingest._speedups import split_lines as _c_split_lines
except ImportError:  # pragma: no cover - an install without a C compiler
    _c_split_lines = None  # type: ignore[assignment]

ZSTD_MAX_WINDOW = 1 << 23  # 8 MiB: zstd's default levels use at most this

# Content-Encoding values we decode (lower-case, stripped); anything else is 415.
ENCODINGS = frozenset({"gzip", "x-gzip", "deflate", "zstd"})
NDJSON_TYPES = ("application/x-ndjson", "application/ndjson", "application/jsonl", "application/x-jsonlines")
EMPTY_NDJSON = Refusal(400, "empty", "empty NDJSON body")
_BOM = b"\xef\xbb\xbf"


def has_bom(payload: bytes) -> bool:
    """True when `payload` holds a UTF-8 BOM anywhere. A search for its first byte alone is a
    memchr (≈ 0.6 µs per 32 KB body), the three-byte search a byte loop (≈ 24 µs): the second runs
    only when the first finds a 0xEF.

    `bytes.find`, not `in`, here and on every per-request path: CPython 3.11's `bytes.__contains__`
    first tries its argument as an int and raises and clears a TypeError (a formatted message)
    when it is bytes, ≈ 110 ns more per test (216 against 104 ns for a 318-byte body)."""
    return payload.find(b"\xef") >= 0 and payload.find(_BOM) >= 0


class BodyReader:
    """Payload → events or refusal, under one Collector's settings (MAX_BODY_SIZE, VALIDATE_JSON,
    MAX_JSON_DEPTH). Used only on the event loop (its simdjson parser is reused per line)."""

    def __init__(self, settings: Settings) -> None:
        self.max_bytes = settings.max_body_bytes
        self.validate_json = settings.validate_json
        self.max_depth = settings.max_json_depth
        self._json_parser = simdjson.Parser()
        self._is_ndjson: dict[str, bool] = {}  # Content-Type → NDJSON? (a few values in practice; bounded)

    def post(self, payload: bytes, content_type: str, content_encoding: str | None, room: int) -> list[bytes] | Refusal:
        """A POST body's events, or its refusal. `room`: how many events the caller can take; an
        NDJSON body with more lines is `QUEUE_FULL` before any line is validated (nothing is spent
        on events that would be refused)."""
        if content_encoding:
            try:
                payload = decode(content_encoding, payload, self.max_bytes)
            except BodyError as bad:
                return Refusal(bad.status, bad.reason, str(bad))
        nd = self._is_ndjson.get(content_type)
        if nd is None:
            nd = bool(content_type) and content_type.split(";", 1)[0].strip().lower() in NDJSON_TYPES
            if len(self._is_ndjson) < 64:
                self._is_ndjson[content_type] = nd
        if not nd:
            # one event: a simdjson parse (≈ 3x cheaper than orjson.loads) accepts the common case;
            # anything it refuses, a BOM, or more openers than MAX_JSON_DEPTH goes to `validate`
            # (orjson), which alone decides every refusal — as for NDJSON lines below
            if self.validate_json and (payload.find(b"\xef") < 0 or payload.find(_BOM) < 0):  # has_bom, inline
                try:
                    self._json_parser.parse(payload)  # dropped at once: the parser is reused
                except (ValueError, RuntimeError):
                    pass
                else:
                    if (payload.count(b"{") + (payload.count(b"[") if payload.find(b"[") >= 0 else 0) <= self.max_depth
                            and (payload.isascii() or valid_utf8(payload))):  # (simdjson checked it; again, strictly)
                        return [payload]
            event, err = self.validate(payload, True)
            if event is None:
                return Refusal(400, err, err.replace("_", " "))
            return [event]
        if _c_split_lines is not None and payload.find(b"\r") < 0:  # a memchr; CRLF bodies take ndjson_lines
            lines, most = _c_split_lines(payload)  # the lines and the bracket screen, one C pass
        else:
            lines, most = ndjson_lines(payload), -1
        if not lines:
            return EMPTY_NDJSON
        if len(lines) > room:
            return QUEUE_FULL
        if not self.validate_json:  # as `validate` without VALIDATE_JSON: invalid UTF-8 replaced by U+FFFD
            if payload.isascii():
                return lines
            return [raw.decode("utf-8", "replace").encode() for raw in lines]
        # The common case costs one simdjson parse per line (a validating parser that builds no
        # Python objects: ≈ 0.3 µs per 300-byte line against ≈ 0.9 µs for `orjson.loads`) and one
        # bracket count for the whole body. Any failure (or a line with more openers than
        # MAX_JSON_DEPTH) re-checks line by line with `validate` (orjson), which alone decides what is
        # refused and why: simdjson only ever sends a body to that exact check, it never accepts on
        # its own anything orjson refuses (its one known extra, a leading UTF-8 BOM, takes the
        # orjson loop). Inline, not a helper: this is every NDJSON request's path.
        try:
            if has_bom(payload):  # simdjson skips a leading BOM that orjson (and so VALIDATE_JSON) refuses
                loads = orjson.loads
                for raw in lines:
                    loads(raw)
            else:
                # each result is dropped at once (a deque of length 0 keeps nothing): the parser is
                # reused for the next line; the loop runs in C
                deque(map(self._json_parser.parse, lines), maxlen=0)
        except (ValueError, RuntimeError):  # also simdjson's BIGINT_ERROR that orjson accepts: re-checked
            return self.first_bad_line(payload)
        if (max_openers(payload) if most < 0 else most) > self.max_depth:
            return self.first_bad_line(payload)
        # simdjson checked the UTF-8 of every line; a strict decode of a body that is not all ASCII
        # (a word-at-a-time test) checks it again before the bytes go into records unchanged
        if not (payload.isascii() or valid_utf8(payload)):  # pragma: no cover - simdjson refuses invalid UTF-8
            return self.first_bad_line(payload)
        return lines

    def query(self, payload: bytes) -> list[bytes] | Refusal:
        """A GET's event: the query string (bytes as received), as valid UTF-8."""
        event, err = self.validate(payload, False)
        if event is None:
            return Refusal(400, err, err.replace("_", " "))
        return [event]

    def first_bad_line(self, payload: bytes) -> list[bytes] | Refusal:
        """The 400 naming the first line `validate` refuses; the events, if every line passes."""
        events = []
        for n, raw in split_ndjson(payload):
            event, err = self.validate(raw, True)
            if event is None:
                return Refusal(400, err, f"line {n}: {err.replace('_', ' ')}")
            events.append(event)
        return events

    def validate(self, raw: bytes, is_json: bool) -> tuple[bytes | None, str]:
        """One event: (its bytes, valid UTF-8, "") or (None, the refusal reason). `is_json`: a POST
        body (JSON when VALIDATE_JSON); a query string is only checked to be UTF-8 (without
        VALIDATE_JSON, invalid UTF-8 is replaced by U+FFFD)."""
        if is_json and self.validate_json:
            if not raw.strip():
                return None, "empty"
            try:
                value = orjson.loads(raw)
            except orjson.JSONDecodeError:
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError:
                    return None, "invalid_utf8"
                return None, "invalid_json"
            # more openers than the cap is the only way to be too deep: most events skip the walk
            if raw.count(b"[") + raw.count(b"{") > self.max_depth and too_deep(raw, value, self.max_depth):
                return None, "too_deep"
        try:
            raw.decode("utf-8")
            return raw, ""
        except UnicodeDecodeError:
            if self.validate_json:
                return None, "invalid_utf8"
            return raw.decode("utf-8", "replace").encode(), ""


def valid_utf8(data: bytes) -> bool:
    """True when `data` decodes as strict UTF-8 (the check before bytes go into records unchanged)."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class BodyError(Exception):
    """Why a body cannot be used: `status` (400/413/415) and a bounded `reason` label."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


def decode(encoding: str, data: bytes, limit: int) -> bytes:
    """The decoded body for a Content-Encoding header value, at most `limit` bytes.

    Raises BodyError: 415 unknown or stacked encoding, 413 decoded size over `limit`,
    400 broken or truncated stream.
    """
    enc = encoding.strip().lower()
    if enc in ("", "identity"):
        return data
    if enc not in ENCODINGS:
        raise BodyError(415, "unsupported_encoding",
                        "Content-Encoding must be gzip, deflate, zstd or identity")
    if not data:
        raise BodyError(400, "bad_encoding", f"empty {enc} stream")
    if enc == "zstd":
        return _zstd(data, limit)
    if enc == "deflate":
        # RFC 9110 "deflate" is the zlib format; some clients send raw deflate. A zlib stream's
        # first two bytes form a multiple of 31 with compression method 8.
        zlib_wrapped = len(data) >= 2 and (data[0] & 0x0F) == 8 and (data[0] << 8 | data[1]) % 31 == 0
        return _zlib(data, limit, 15 if zlib_wrapped else -15, enc)
    return _zlib(data, limit, 31, enc)


def _zlib(data: bytes, limit: int, wbits: int, enc: str) -> bytes:
    out: list[bytes] = []
    size = 0
    rest = data
    while True:  # one pass per gzip member (concatenated members are legal gzip)
        d = zlib.decompressobj(wbits)
        chunk_in = rest
        try:
            while chunk_in:
                piece = d.decompress(chunk_in, limit + 1 - size)
                size += len(piece)
                if size > limit:
                    raise BodyError(413, "too_large", f"decoded body larger than MAX_BODY_SIZE={limit} bytes")
                out.append(piece)
                if d.eof:
                    break
                chunk_in = d.unconsumed_tail
                if not piece and not chunk_in:
                    break
            if not d.eof:
                # input exhausted: flush what is buffered, then insist on a complete stream
                piece = d.flush()
                size += len(piece)
                if size > limit:
                    raise BodyError(413, "too_large", f"decoded body larger than MAX_BODY_SIZE={limit} bytes")
        except zlib.error:
            raise BodyError(400, "bad_encoding", f"broken {enc} stream") from None
        if not d.eof:
            raise BodyError(400, "bad_encoding", f"truncated {enc} stream")
        rest = d.unused_data
        if not rest:
            return b"".join(out)
        if wbits != 31 or rest[:2] != b"\x1f\x8b":
            raise BodyError(400, "bad_encoding", f"trailing bytes after the {enc} stream")


def _zstd(data: bytes, limit: int) -> bytes:
    dctx = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
    too_large = BodyError(413, "too_large", f"decoded body larger than MAX_BODY_SIZE={limit} bytes")
    try:
        # pass 1, bounded output: stream_reader.read(n) never produces more than n bytes
        with dctx.stream_reader(io.BytesIO(data), read_across_frames=True) as reader:
            if len(reader.read(limit + 1)) > limit:
                raise too_large
        # pass 2, now known to produce at most `limit` bytes: check every frame is complete
        # (stream_reader stops quietly at a truncated frame)
        out: list[bytes] = []
        rest = data
        while rest:
            obj = dctx.decompressobj()
            out.append(obj.decompress(rest))
            if not obj.eof:
                raise BodyError(400, "bad_encoding", "truncated zstd stream")
            rest = obj.unused_data
    except zstandard.ZstdError:
        raise BodyError(400, "bad_encoding", "broken zstd stream") from None
    body = b"".join(out)
    if len(body) > limit:  # pragma: no cover - pass 1 bounds it
        raise too_large
    return body


def split_ndjson(payload: bytes) -> Iterator[tuple[int, bytes]]:
    """(line number, line) for every non-blank line; a trailing `\\r` is removed (CRLF files)."""
    for n, raw in enumerate(payload.split(b"\n"), 1):
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if raw.strip():
            yield n, raw


_CHOP = itemgetter(slice(None, -1))  # a line without its line feed


def ndjson_lines(payload: bytes) -> list[bytes]:
    """The lines `split_ndjson` yields, without their numbers: C-level passes instead of a
    generator step per line (find a line's number with `split_ndjson` when needed).

    A BytesIO's `readlines` finds the line feeds with memchr: 5 µs for 100 lines of 318 B against
    30 µs for `split(b"\n")`, a loop over every byte; cutting each line feed off costs 6 µs more."""
    if payload.find(b"\r") >= 0:  # CRLF (rare): the split, and a trailing `\r` off each line
        lines = list(filter(None, [p[:-1] if p.endswith(b"\r") else p for p in payload.split(b"\n")]))
    else:
        parts = io.BytesIO(payload).readlines()
        if parts and not parts[-1].endswith(b"\n"):
            parts[-1] += b"\n"  # the last line, when the body does not end with a line feed
        lines = list(filter(None, map(_CHOP, parts)))
    if True in map(bytes.isspace, lines):  # lines of whitespace only (rare): skipped, as `strip()` finds them
        lines = [p for p in lines if not p.isspace()]
    return lines


# every byte but `[`, `{` and the line feed: what `bytes.translate` deletes to count openers per line
_NOT_OPENERS = bytes(b for b in range(256) if b not in b"[{\n")


def max_openers(payload: bytes) -> int:
    """The largest number of `[` plus `{` on one line of `payload` (the bound `too_deep` screens with).

    One C-level pass over the whole body instead of two `count` calls per line: a body whose lines
    all have at most MAX_JSON_DEPTH openers cannot hold a line nested deeper than that.
    """
    return max(map(len, payload.translate(None, _NOT_OPENERS).split(b"\n")))


def too_deep(raw: bytes, value: Any, max_depth: int) -> bool:
    """True when the parsed `value` nests arrays/objects deeper than `max_depth`.

    A body with at most `max_depth` opening brackets cannot be deeper, so the common small event
    costs two C-level counts; only bracket-heavy bodies pay for the walk.
    """
    if raw.count(b"[") + raw.count(b"{") <= max_depth:
        return False
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            if depth > max_depth:
                return True
            stack.extend((v, depth + 1) for v in node.values() if isinstance(v, dict | list))
        elif isinstance(node, list):
            if depth > max_depth:
                return True
            stack.extend((v, depth + 1) for v in node if isinstance(v, dict | list))
    return False

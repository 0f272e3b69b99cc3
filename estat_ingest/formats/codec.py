"""Batch encoding and verification (pure, blocking functions: the engine runs them in its pool).

JSONL lines were encoded once at accept time, so a batch is its lines joined and compressed, in a
thread: zlib and zstandard release the GIL, so the loop loses only the CPU the compression takes.
`encode_lines` joins and compresses ~1 MiB at a time and can release the lines as it goes, so an
in-flight batch never exists twice in memory (lines + one joined copy) — with 64 MiB batches that
copy was the largest single item of peak RSS. `verify` reads a whole stream back (gzip CRC32 and ISIZE, zstd frame
checksum and content size) and checks that every line is JSON.

gzip levels 1-3 (the default is 1) compress with ISA-L (python-isal: Intel's deflate, the same
gzip format every reader takes): on this project's machine 3.3 GB/s at level 1 against zlib's
0.49 GB/s on a batch of records, with a similar ratio (17.4 vs 16.8). Levels 4-9 use zlib.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, cast

import orjson
import zstandard
from isal import isal_zlib


def compress(data: bytes, compression: str, level: int) -> bytes:
    if compression == "zstd":
        cctx = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)
        return cctx.compress(data)
    co = gzip_compressobj(level)
    return co.compress(data) + co.flush()


class Compressor(Protocol):
    def compress(self, data: bytes, /) -> bytes: ...
    def flush(self) -> bytes: ...


def gzip_compressobj(level: int) -> Compressor:
    """One gzip member, no name/mtime (as v1): wbits 31 = gzip container. ISA-L for levels 1-3."""
    if level <= isal_zlib.ISAL_BEST_COMPRESSION:
        return cast(Compressor, isal_zlib.compressobj(level, isal_zlib.DEFLATED, 31))
    return zlib.compressobj(level, zlib.DEFLATED, 31)


CHUNK_BYTES = 1 << 20


def encode_lines(lines: list[bytes], nbytes: int, compression: str, level: int, release: bool = False) -> bytes:
    """Compress JSONL `lines` (`nbytes` in all) as one gzip member / zstd frame, ~1 MiB at a time.

    With `release`, the list is emptied as it is consumed, so each chunk's lines can be freed as
    soon as it is compressed. Python work per call is one loop step per chunk, not per line.
    """
    step: Callable[[bytes], bytes]
    finish: Callable[[], bytes]
    if compression == "zstd":
        zc = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)
        zco = zc.compressobj(size=nbytes)
        step, finish = zco.compress, zco.flush
    else:
        co = gzip_compressobj(level)
        step, finish = co.compress, co.flush
    n = len(lines)
    per_chunk = max(1, (CHUNK_BYTES * n) // nbytes) if nbytes > 0 else max(1, n)
    out: list[bytes] = []
    if release:
        while lines:
            chunk = lines[:per_chunk]
            del lines[:per_chunk]
            out.append(step(b"".join(chunk)))
            del chunk
    else:
        for start in range(0, n, per_chunk):
            out.append(step(b"".join(lines[start:start + per_chunk])))
    out.append(finish())
    return b"".join(out)


class CorruptPayload(ValueError):
    pass


def decompress(data: bytes, compression: str, max_size: int = 1 << 34) -> bytes:
    """Full decompression with integrity checks; raises CorruptPayload on any damage."""
    if not data:
        raise CorruptPayload("empty file")
    try:
        if compression == "zstd":
            out = b""
            rest = data
            while rest:  # concatenated frames are valid zstd
                dobj = zstandard.ZstdDecompressor().decompressobj()
                out += dobj.decompress(rest)
                if not dobj.eof:
                    raise CorruptPayload("truncated zstd frame")
                if len(out) > max_size:
                    raise CorruptPayload("decompressed size over the limit")
                rest = dobj.unused_data
            return out
        d = zlib.decompressobj(31)
        out = d.decompress(data, max_size)
        if not d.eof or d.unconsumed_tail:
            raise CorruptPayload("truncated gzip stream")
        while d.unused_data:  # concatenated members are valid gzip
            rest = d.unused_data
            d = zlib.decompressobj(31)
            out += d.decompress(rest, max_size)
            if not d.eof:
                raise CorruptPayload("truncated gzip member")
        return out
    except (zlib.error, zstandard.ZstdError) as err:
        raise CorruptPayload(str(err)) from None


def stream_lines(data: bytes, compression: str, want_checksum: str | None = None) -> list[bytes]:
    """The JSONL lines of a whole stream, verified: checksum (when known), complete decompression
    (gzip CRC32 and length, zstd frame checksum), a newline at the end. Blocking and mostly GIL-free:
    call it in a thread. Raises CorruptPayload."""
    if want_checksum and checksum(data) != want_checksum:
        raise CorruptPayload("checksum in meta does not match the data")
    text = decompress(data, compression)
    if not text:
        return []
    if not text.endswith(b"\n"):
        raise CorruptPayload("last line has no newline")
    return text.split(b"\n")[:-1]


def check_json(lines: list[bytes], start: int = 0, stop: int | None = None) -> None:
    """Every line of `lines[start:stop]` is JSON; raises CorruptPayload naming the first that is not."""
    loads, bad = orjson.loads, orjson.JSONDecodeError
    for i in range(start, len(lines) if stop is None else min(stop, len(lines))):
        try:
            loads(lines[i])
        except bad:
            raise CorruptPayload(f"line {i + 1} is not JSON") from None


def check_count(n: int, want: int | None) -> int:
    """`n` events, as the meta says (when it says), and at least one."""
    if want is not None and want != n:
        raise CorruptPayload(f"meta says {want} events, the file has {n}")
    if n == 0:
        raise CorruptPayload("no events")
    return n


def verify(data: bytes, compression: str, want_checksum: str | None = None, want_events: int | None = None) -> int:
    """Full verification in one blocking call: stream, checksum, every line JSON, the count."""
    lines = stream_lines(data, compression, want_checksum)
    check_json(lines)
    return check_count(len(lines), want_events)


def checksum(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def compression_of(name: str) -> str:
    return "zstd" if name.endswith(".zst") else "gzip"


@dataclass(frozen=True, slots=True)
class Members:
    """What a walk over a multi-member stream (a spool file) found."""

    good: int  # bytes of complete, verified members from the start
    events: int  # records in them
    torn: int  # bytes after them (a torn tail: never acknowledged)


def walk_members(data: bytes, compression: str) -> Members:
    """Verify members from the start; stop at the first that is incomplete or damaged."""
    good = events = 0
    rest = data
    while rest:
        try:
            if compression == "zstd":
                d = zstandard.ZstdDecompressor().decompressobj()
                text = d.decompress(rest)
                done, unused = d.eof, d.unused_data
            else:
                z = zlib.decompressobj(31)
                text = z.decompress(rest)
                done, unused = z.eof, z.unused_data
        except (zlib.error, zstandard.ZstdError):
            break
        if not done or not text or not text.endswith(b"\n"):
            break
        good += len(rest) - len(unused)
        events += text.count(b"\n")
        rest = unused
    return Members(good, events, len(data) - good)


@dataclass(frozen=True, slots=True)
class Prefix:
    """The longest valid start of a damaged stream (`dlq cat --partial`)."""

    text: bytes  # complete JSON lines decoded from the start, each with its newline
    lines: int  # how many
    good: int  # compressed bytes decoded before the damage (all of them when `why` is "")
    cut_text: int  # decoded bytes after the last line shown (a partial or non-JSON line onwards)
    why: str  # what stopped the decoding ("" = the stream decodes to its end)


def decodable_prefix(data: bytes, compression: str, step: int = 4096) -> Prefix:
    """Decode `data` as far as it goes, member after member (frame after frame), and keep the
    complete lines from the start up to the first one that is not JSON. Blocking, pure."""
    out = bytearray()
    pos, why = 0, ""
    while pos < len(data) and not why:
        if compression == "zstd":
            z = zstandard.ZstdDecompressor().decompressobj()
            try:
                while pos < len(data) and not z.eof:
                    piece = data[pos:pos + step]
                    out += z.decompress(piece)
                    pos += len(piece) - (len(z.unused_data) if z.eof else 0)
            except zstandard.ZstdError as err:
                why = f"zstd: {err}"
            if not why and not z.eof:
                why = "truncated zstd frame"
            continue
        d = zlib.decompressobj(31)
        try:
            while pos < len(data) and not d.eof:
                piece = data[pos:pos + step]
                saved = d.copy()
                try:
                    out += d.decompress(piece)
                except zlib.error:
                    # again byte by byte from before this piece, to keep all that precedes the damage
                    d = saved
                    for k in range(len(piece)):
                        out += d.decompress(piece[k:k + 1])
                        pos += 1
                    raise AssertionError("unreachable: the same bytes decoded twice") from None
                pos += len(piece) - (len(d.unused_data) if d.eof else 0)
        except zlib.error as err:
            why = f"gzip: {err}"
        if not why and not d.eof:
            why = "truncated gzip stream"
    good = min(pos, len(data)) if why else len(data)
    end = out.rfind(b"\n") + 1
    text = bytes(out[:end])
    lines = text.split(b"\n")[:-1] if text else []
    loads, bad = orjson.loads, orjson.JSONDecodeError
    for i, line in enumerate(lines):
        try:
            loads(line)
        except bad:
            why = why or f"line {i + 1} is not JSON"
            lines = lines[:i]
            break
    text = b"".join(line + b"\n" for line in lines)
    if not why:
        why = "empty file" if not data else "" if out.endswith(b"\n") or not out else "last line has no newline"
    return Prefix(text, len(lines), good, len(out) - len(text), why)

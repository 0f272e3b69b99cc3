"""estat_ingest._speedups (C) gives what its pure-Python definitions give, byte for byte, and refuses
what it cannot take with an exception, never a crash.

`split_lines` against http/bodies.py `ndjson_lines` + `max_openers`; `records` against
pipeline/record.py `encode_records_py` (tests/pipeline/test_record_fast_path.py runs every record
test with both). This module fails at import when the extension was not built: CI tests it built."""

from __future__ import annotations

import copy

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from estat_ingest import _speedups
from estat_ingest.http import bodies
from estat_ingest.http.bodies import max_openers, ndjson_lines
from estat_ingest.pipeline import record
from estat_ingest.pipeline.record import (
    IdGen,
    encode_line,
    encode_line_py,
    encode_record,
    encode_records,
    encode_records_py,
)

NOW = 1764821594.4567


def test_the_server_paths_use_the_c_functions() -> None:
    assert bodies._c_split_lines is _speedups.split_lines
    assert record._c_records is _speedups.records
    assert record._c_record is _speedups.record


def reference_split(body: bytes) -> tuple[list[bytes], int]:
    return ndjson_lines(body), max_openers(body)


@pytest.mark.parametrize("body", [
    b"", b"\n", b"\n\n\n", b"{}", b"{}\n", b"\n{}", b"{}\n[]\n", b" \t\x0b\x0c \n{}\n  \n",
    b"[[[{{{\n[\n{\"a\":[1,{}]}", b"x" * 70_000 + b"\n" + b"[" * 300, b"\x00\n\xff\xfe\n\x85\xa0",
    b'{"s":"[[[[{{{{"}\n{}\n', b"  {} \n\t[1]\t",
])
def test_split_lines_examples(body: bytes) -> None:
    assert _speedups.split_lines(body) == reference_split(body)


# bytes that matter to the split: line feeds, every ASCII whitespace, openers, non-ASCII, NUL
pieces = st.sampled_from([b"\n", b" ", b"\t", b"\x0b", b"\x0c", b"[", b"{", b"]", b"}", b"a", b'"', b"\x00",
                          b"\xff", b"\xc3\xa9", b"\x85", b"\xa0", b"\x1c"])


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(pieces, max_size=80).map(b"".join))
def test_property_split_lines_is_ndjson_lines_and_max_openers(body: bytes) -> None:
    assert _speedups.split_lines(body) == reference_split(body)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_property_split_lines_of_any_bytes(body: bytes) -> None:
    lines, most = _speedups.split_lines(body)
    assert most == max_openers(body)  # (the server takes a body with `\r` through ndjson_lines)
    if b"\r" not in body:
        assert lines == ndjson_lines(body)


texts = st.text(max_size=40).filter(lambda t: not any(0xD800 <= ord(ch) <= 0xDFFF for ch in t))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(texts, max_size=8), st.integers(0, 0xFFFFFF), st.binary(max_size=8))
def test_property_records_are_encode_records_py(events: list[str], counter: int, key: bytes) -> None:
    """Any text (controls, quotes, backslashes, every plane), as its UTF-8; any counter, so the ids
    wrap at 0x1000 and 0x1000000; any bytes after `id`."""
    g = IdGen()
    g._counter = counter
    twin = copy.copy(g)
    raw = [t.encode() for t in events]
    extra = b',"k":' + orjson.dumps(key.hex())
    got = encode_records(NOW, "ip", "ua", "c", raw, g, extra)
    assert got == encode_records_py(NOW, "ip", "ua", "c", raw, twin, extra)
    assert [orjson.loads(line)["body"] for _, line in got[0]] == events


def cpu_has_ssse3() -> bool:
    with open("/proc/cpuinfo") as f:
        return any(line.startswith("flags") and " ssse3" in line for line in f)


# strings long enough for the 16-byte blocks (>= 24 bytes left) with every kind of block: plain, only
# quotes and backslashes (the shuffles), a control among them (the word loop), multi-byte UTF-8
escapables = st.lists(st.sampled_from(['"', "\\", "a", "abcdefgh", "0123456789abcdef", "\n", "\x01", "\x1f",
                                       " ", "\x7f", "\u00e9", "\u20ac", "\U0001f600", '\\"']),
                      max_size=90).map("".join)


@pytest.mark.parametrize("shuffles", [True, False], ids=["shuffles", "words"])
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(escapables, max_size=6), st.integers(0, 0xFFFFFF))
def test_property_both_escape_paths_are_encode_records_py(shuffles: bool, events: list[str], counter: int) -> None:
    """The SSSE3 shuffles (where the CPU has them) and the word loop each give the Python bytes,
    in records (the body) and in record (the three header fields too)."""
    assert _speedups.use_shuffles(shuffles) == (shuffles and cpu_has_ssse3())
    try:
        g = IdGen()
        g._counter = counter
        twin = copy.copy(g)
        raw = [t.encode() for t in events]
        head = events[0] if events else "ua"
        got = encode_records(NOW, "ip", head, "c", raw, g)
        assert got == encode_records_py(NOW, "ip", head, "c", raw, twin)
        assert [orjson.loads(line)["body"] for _, line in got[0]] == events
        for text in events:
            assert encode_line(NOW, text, text, text, text.encode(), g) == encode_line_py(NOW, text, text, text,
                                                                                         text.encode(), twin)
    finally:
        _speedups.use_shuffles(True)


def test_records_escape_every_byte_below_0x80_as_orjson_does() -> None:
    text = "".join(map(chr, range(0x80))) + "é€😀\u2028"
    g = IdGen()
    twin = copy.copy(g)
    (item,), nbytes = encode_records(NOW, "1.2.3.4", "u", "", [text.encode()], g)
    assert item == (NOW, encode_record(NOW, "1.2.3.4", "u", "", text, twin.next(NOW)))
    assert nbytes == len(item[1])


def test_records_keep_the_ts_object_and_count_the_bytes() -> None:
    items, nbytes = _speedups.records(NOW, b"H", [b"a", b"", b'"'], b"M", 0xFFFFFE, b"T\n")
    assert items == [(NOW, b'H"a"MfffffeT\n'), (NOW, b'H""MffffffT\n'), (NOW, b'H"\\""M000000T\n')]
    assert all(ts is items[0][0] for ts, _ in items)
    assert nbytes == sum(len(line) for _, line in items)
    assert _speedups.records(NOW, b"H", [b"x"], b"M", 2**70 + 5, b"")[0] == [(NOW, b'H"x"M000005')]  # masked
    assert _speedups.records(NOW, b"", [], b"", 0, b"") == ([], 0)


@pytest.mark.parametrize("args", [
    (NOW, "head", [b"a"], b"M", 0, b"T"),
    (NOW, b"H", (b"a",), b"M", 0, b"T"),
    (NOW, b"H", [b"a", "b"], b"M", 0, b"T"),
    (NOW, b"H", [b"a", bytearray(b"b")], b"M", 0, b"T"),
    (NOW, b"H", [b"a"], b"M", "0", b"T"),
    (NOW, b"H", [b"a"], b"M", 0),
    (NOW, b"H", [b"a"], b"M", 0, b"T", b""),
])
def test_records_refuse_what_they_cannot_take(args: tuple[object, ...]) -> None:
    with pytest.raises(TypeError):
        _speedups.records(*args)


@pytest.mark.parametrize("arg", ["text", bytearray(b"{}"), memoryview(b"{}"), None, 1])
def test_split_lines_takes_bytes_only(arg: object) -> None:
    with pytest.raises(TypeError):
        _speedups.split_lines(arg)  # type: ignore[arg-type]


@pytest.mark.parametrize("ts", [0.0, 0.999, -0.5, -3.7, 1764821594.9999, 9.9e15, -9.9e15])
def test_record_formats_ts_as_int_of_ts(ts: float) -> None:
    g = IdGen()
    twin = copy.copy(g)
    line = encode_line(ts, "ip", "ua", "c", b'{"a":1}', g, b',"x":1')
    assert line == encode_line_py(ts, "ip", "ua", "c", b'{"a":1}', twin, b',"x":1')
    assert orjson.loads(line)["ts"] == int(ts)


@pytest.mark.parametrize(("args", "error"), [
    ((NOW, "ip", "ua", "c", b"{}", b"P", 0), TypeError),  # 7 arguments
    ((NOW, b"ip", "ua", "c", b"{}", b"P", 0, b""), TypeError),
    ((NOW, "ip", "ua", None, b"{}", b"P", 0, b""), TypeError),
    ((NOW, "ip", "ua", "c", "{}", b"P", 0, b""), TypeError),
    ((NOW, "ip", "ua", "c", b"{}", "P", 0, b""), TypeError),
    ((NOW, "ip", "ua", "c", b"{}", b"P", 0, None), TypeError),
    (("now", "ip", "ua", "c", b"{}", b"P", 0, b""), TypeError),
    ((float("nan"), "ip", "ua", "c", b"{}", b"P", 0, b""), ValueError),
    ((float("inf"), "ip", "ua", "c", b"{}", b"P", 0, b""), ValueError),
    ((1e19, "ip", "ua", "c", b"{}", b"P", 0, b""), ValueError),
])
def test_record_refuses_what_it_cannot_take(args: tuple[object, ...], error: type[Exception]) -> None:
    with pytest.raises(error):
        _speedups.record(*args)

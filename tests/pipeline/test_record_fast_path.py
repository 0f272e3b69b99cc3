"""`encode_records` (one head per request, then one C call: estat_ingest/_speedups.c), its Python
definition `encode_records_py` (one orjson call per request + one join per event) and `encode_line`
(a request's one event) produce exactly the bytes and ids of the per-event `encode_record` +
`IdGen.next` they replaced. Every test of `encode_records` runs with both."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from estat_ingest.pipeline.record import (
    IdGen,
    encode_line,
    encode_line_py,
    encode_record,
    encode_records,
    encode_records_py,
    record_head,
)

NOW = 1764821594.4567

BODIES = [
    '{"a":1}',
    '{"url":"https://shop.example.com/search?q=running+shoes","pad":"x"}',
    '"just a string"',
    "123",
    "[1,2.5,-3e10,true,false,null]",
    r'{"esc":"quote \" backslash \\ slash \/ nl \n tab \t u \u00e9 \ud83d\ude00"}',
    '{"k":"é € 😀 한국어 \u2028 \u2029 \x7f"}',
    '{"pct":"100% %s %d %b %06x %%"}',
    "\t{ }\r",  # JSON whitespace kept as sent
    "control \x00 \x01 \x1f chars (VALIDATE_JSON=false)",
    "raw line feeds \n, \r\n and \n\n inside one text, and a last one\n",  # json_strings splits at line feeds
    "\ufffd replaced",
    "",
    "x" * 5000,
]
HEADERS = [
    ("127.0.0.1", "estat-bench/1", ""),
    ("2001:db8::1", "Mozilla/5.0 (X11; Linux x86_64) \"quoted\" \\back", "sid=abc; x=1"),
    ("198.51.100.7", "100% %s %b %%", "a=%25; b=%s"),
    ("", "", ""),
    ("203.0.113.9", "ua with é and \ufffd and \x01", "c=\u00e9"),
]


def reference(ts: float, ip: str, ua: str, cookie: str, bodies: list[str], ids: IdGen, key: str | None = None
              ) -> list[tuple[float, bytes]]:
    """What /collect built before: one encode_record + one IdGen.next per event, then the key field."""
    out = [(ts, encode_record(ts, ip, ua, cookie, b, ids.next(ts))) for b in bodies]
    if key is not None:
        tail = b',"api_key_name":' + orjson.dumps(key) + b"}\n"
        out = [(t, line[:-2] + tail) for t, line in out]
    return out


Encode = Callable[..., list[tuple[float, bytes]]]


def call(impl: Callable[..., tuple[list[tuple[float, bytes]], int]], ts: float, ip: str, ua: str, cookie: str,
         bodies: list[str], ids: IdGen, extra: bytes = b"") -> list[tuple[float, bytes]]:
    """`impl` (`encode_records` or `encode_records_py`) over text bodies, sent as their UTF-8; the byte
    count it returns beside the items is checked."""
    items, nbytes = impl(ts, ip, ua, cookie, [b.encode() for b in bodies], ids, extra)
    assert nbytes == sum(len(line) for _, line in items)
    return items


IMPLS = pytest.mark.parametrize("impl", [encode_records, encode_records_py], ids=["c", "python"])
LINE_IMPLS = pytest.mark.parametrize("one", [encode_line, encode_line_py], ids=["c", "python"])


@pytest.fixture(params=[encode_records, encode_records_py], ids=["c", "python"])
def enc(request: pytest.FixtureRequest) -> Encode:
    return functools.partial(call, request.param)


def ids_and_extra(key: str | None) -> tuple[IdGen, IdGen, bytes]:
    """A fresh IdGen, its twin for `reference`, and the encoded `api_key_name` field for `key`."""
    g = IdGen()
    return g, copy.copy(g), b"" if key is None else b',"api_key_name":' + orjson.dumps(key)


@pytest.mark.parametrize(("ip", "ua", "cookie"), HEADERS)
@pytest.mark.parametrize("key", [None, "partner-a", 'we"ird %s \u00e9'])
def test_same_bytes_and_ids_as_encode_record(enc: Encode, ip: str, ua: str, cookie: str, key: str | None) -> None:
    g, twin, extra = ids_and_extra(key)
    got = enc(NOW, ip, ua, cookie, BODIES, g, extra)
    assert got == reference(NOW, ip, ua, cookie, BODIES, twin, key)
    for _, line in got:
        rec = orjson.loads(line)
        assert list(rec)[:6] == ["ts", "ip", "user_agent", "cookie", "body", "id"]
    # the generators stay in step: the next request continues the same sequence
    assert enc(NOW + 0.002, ip, ua, cookie, BODIES[:3], g, extra) == \
        reference(NOW + 0.002, ip, ua, cookie, BODIES[:3], twin, key)


def test_ids_across_requests_ms_changes_clock_steps_and_counter_wrap(enc: Encode) -> None:
    g = IdGen()
    g._counter = 0xFFFFFF - 3  # the counter wraps inside the next request, as next() wraps it
    twin = copy.copy(g)
    for ts, n in [(NOW, 5), (NOW, 2), (NOW + 0.0004, 3), (NOW + 0.0011, 1), (NOW - 1.0, 4), (NOW + 7.25, 2)]:
        bodies = [f'{{"i":{i}}}' for i in range(n)]
        assert enc(ts, "ip", "ua", "", bodies, g) == reference(ts, "ip", "ua", "", bodies, twin)
    assert (g._counter, g._last_ms, g._prefix) == (twin._counter, twin._last_ms, twin._prefix)


def test_ids_on_both_sides_of_a_change_of_the_first_three_hex_digits(enc: Encode) -> None:
    """A request's ids whose counters share their first three hex digits take the last three
    from a table (encode_records_py's `_LOW_DIGITS`; the C call formats each); one that crosses
    to the next 0x1000 formats every id. Both give the bytes of encode_record with next()."""
    for start, n in [(0x0FF0, 16), (0x0FF0, 17), (0x0FFF, 1), (0x0FFF, 2), (0x1000, 1), (0x1234FF, 0x101),
                     (0xFFE000, 0x1000), (0xFFF000, 0x1000), (0, 0x1000), (0, 0x1001)]:
        g = IdGen()
        g._counter = start - 1  # the first id of the request gets `start`
        twin = copy.copy(g)
        bodies = [f'{{"i":{i}}}' for i in range(n)]
        got = enc(NOW, "ip", "ua", "", bodies, g)
        assert got == reference(NOW, "ip", "ua", "", bodies, twin), (hex(start), n)
        first, last = orjson.loads(got[0][1])["id"], orjson.loads(got[-1][1])["id"]
        assert (int(first[-6:], 16), int(last[-6:], 16)) == (start, (start + n - 1) & 0xFFFFFF)


def test_reserve_matches_next() -> None:
    g = IdGen()
    twin = copy.copy(g)
    prefix, first = g.reserve(NOW, 4)
    assert [f"{prefix}{(first + i) & 0xFFFFFF:06x}" for i in range(4)] == [twin.next(NOW) for _ in range(4)]
    assert g.next(NOW) == twin.next(NOW)


def test_surrogates_in_headers_raise_before_any_id_is_taken(enc: Encode) -> None:
    # aiohttp keeps non-UTF-8 header bytes as surrogates; /collect then retries with U+FFFD
    g = IdGen()
    twin = copy.copy(g)
    with pytest.raises(TypeError):
        enc(NOW, "ip", "bad \udcff ua", "", ['{"a":1}'], g)
    with pytest.raises(TypeError):
        encode_record(NOW, "ip", "bad \udcff ua", "", '{"a":1}', "id")
    assert g.next(NOW) == twin.next(NOW)


def test_percent_signs_in_head_and_extra_are_kept_verbatim(enc: Encode) -> None:
    head = record_head(NOW, "ip", "%s%b%%", "c=%d")
    assert head.endswith(b'"cookie":"c=%d","body":')
    (_, line), = enc(NOW, "ip", "%s%b%%", "c=%d", ["body %06x"], IdGen(), b',"x":"%b"')
    rec = orjson.loads(line)
    assert (rec["user_agent"], rec["cookie"], rec["body"], rec["x"]) == ("%s%b%%", "c=%d", "body %06x", "%b")
    assert line.startswith(b'{"ts":1764821594,"ip":"ip","user_agent":"%s%b%%","cookie":"c=%d",'
                           b'"body":"body %06x","id":"')


texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60)


@IMPLS
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ip=texts, ua=texts, cookie=texts, bodies=st.lists(texts, min_size=1, max_size=6),
       ts=st.floats(min_value=0, max_value=4e9, allow_nan=False))
def test_property_same_bytes_as_encode_record(impl: Callable[..., tuple[list[tuple[float, bytes]], int]], ip: str,
                                              ua: str, cookie: str, bodies: list[str], ts: float) -> None:
    g = IdGen()
    twin = copy.copy(g)
    assert call(impl, ts, ip, ua, cookie, bodies, g) == reference(ts, ip, ua, cookie, bodies, twin)


@LINE_IMPLS
@pytest.mark.parametrize(("ip", "ua", "cookie"), HEADERS)
@pytest.mark.parametrize("key", [None, "partner-a", 'we"ird %s \u00e9'])
def test_one_line_is_the_record_of_encode_records(enc: Encode, one: Callable[..., bytes], ip: str, ua: str,
                                                  cookie: str, key: str | None) -> None:
    g, twin, extra = ids_and_extra(key)
    for ts, body in zip([NOW, NOW, NOW + 0.003, NOW - 2.0, NOW - 2.0, NOW + 5, NOW + 5, NOW + 6], BODIES, strict=False):
        line = one(ts, ip, ua, cookie, body.encode(), g, extra)
        assert line == reference(ts, ip, ua, cookie, [body], twin, key)[0][1]
    assert enc(NOW + 1, ip, ua, cookie, BODIES[:2], g, extra) == \
        reference(NOW + 1, ip, ua, cookie, BODIES[:2], twin, key)  # one sequence of ids with the NDJSON path


@LINE_IMPLS
def test_one_line_surrogates_raise_before_the_id_is_taken_and_the_counter_wraps(one: Callable[..., bytes]) -> None:
    g = IdGen()
    g._counter = 0xFFFFFF
    twin = copy.copy(g)
    for bad in (("bad \udcff ua", "", "ip"), ("ua", "c=\ud800", "ip"), ("ua", "", "\udfff")):
        with pytest.raises(TypeError):
            one(NOW, bad[2], bad[0], bad[1], b'{"a":1}', g)
    assert one(NOW, "ip", "ua", "", b"{}", g) == encode_record(NOW, "ip", "ua", "", "{}", twin.next(NOW))
    assert g._counter == twin._counter == 0


@LINE_IMPLS
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ip=texts, ua=texts, cookie=texts, body=texts, ts=st.floats(min_value=0, max_value=4e9, allow_nan=False))
def test_property_one_line_same_bytes_as_encode_record(one: Callable[..., bytes], ip: str, ua: str, cookie: str,
                                                       body: str, ts: float) -> None:
    g = IdGen()
    twin = copy.copy(g)
    assert one(ts, ip, ua, cookie, body.encode(), g) == encode_record(ts, ip, ua, cookie, body, twin.next(ts))


def test_a_request_that_starts_right_after_the_counter_wraps(enc: Encode) -> None:
    """The counter after 0xFFFFFF is 0: a request whose first id is the wrap gets six hex digits
    `000000`, `000001`, … (the table path once formatted `1000` into its ids, 31 characters)."""
    g = IdGen()
    g._counter = 0xFFFFFF
    twin = copy.copy(g)
    got = enc(NOW, "ip", "ua", "", ['{"i":0}', '{"i":1}'], g)
    assert got == reference(NOW, "ip", "ua", "", ['{"i":0}', '{"i":1}'], twin)
    assert [orjson.loads(line)["id"][-6:] for _, line in got] == ["000000", "000001"]
    assert {len(orjson.loads(line)["id"]) for _, line in got} == {30}

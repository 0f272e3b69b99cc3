"""The NDJSON fast path of /collect (one split, one simdjson check per line, one bracket count per body,
records from a per-request head) answers and enqueues exactly what the per-line path did: same
records byte for byte, same 400 reasons and line numbers, all-or-nothing."""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from estat_ingest.config import Settings
from estat_ingest.http.bodies import has_bom, max_openers, ndjson_lines, split_ndjson
from estat_ingest.http.collect import Collector
from estat_ingest.metrics import Metrics
from estat_ingest.pipeline.queue import EventQueue
from estat_ingest.pipeline.record import encode_record
from tests.http.util import value

TS = 1764821594.25
ND = "application/x-ndjson"


def make(capacity: int = 100_000, **overrides: Any) -> tuple[Collector, EventQueue[tuple[float, bytes]], Metrics]:
    s = Settings.from_env({}, **{"max_body_bytes": 1 << 20, "max_json_depth": 8, **overrides})
    q: EventQueue[tuple[float, bytes]] = EventQueue(capacity)
    m = Metrics()
    c = Collector(s, q, m, clock=lambda: TS)
    c.accepting = True
    return c, q, m


def headers(ua: str = "estat-test/1", **more: str) -> CIMultiDict[str]:
    return CIMultiDict({"Content-Type": ND, "User-Agent": ua, **more})


def reference(c: Collector, payload: bytes, ua: str, ids: Any) -> tuple[int, bytes, list[tuple[float, bytes]]]:
    """The per-line algorithm /collect used before the fast path: (status, reply body, records)."""
    bodies = []
    for n, raw in split_ndjson(payload):
        event, err = c.bodies.validate(raw, True)
        if event is None:
            return 400, f"line {n}: {err.replace('_', ' ')}\n".encode(), []
        bodies.append(event)
    if not bodies:
        return 400, b"empty NDJSON body\n", []
    try:
        orjson.dumps(ua)
    except TypeError:  # surrogates from non-UTF-8 header bytes: U+FFFD
        # (the per-line path also skipped one id here, as its first encode_record failed after
        # taking it; the fast path fails before taking any: ids stay unique and ordered either way)
        ua = ua.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    recs = [(TS, encode_record(TS, "127.0.0.1", ua, "", b.decode(), ids.next(TS))) for b in bodies]
    return 200, b"", recs


def check(c: Collector, q: EventQueue[tuple[float, bytes]], payload: bytes, ua: str = "estat-test/1") -> int:
    twin = copy.copy(c.ids)
    before = q.snapshot()
    r = c.handle("POST", "/collect", "", headers(ua), payload, "127.0.0.1")
    status, body, recs = reference(c, payload, ua, twin)
    assert (r.status, r.body) == (status, body)
    assert q.snapshot() == before + recs  # all or nothing, byte-identical
    return r.status


EVENT = b'{"event":"page_view","url":"https://x.example/?q=a%20b","n":1.5e3,"ok":true,"s":"\\"q\\" \\\\ \\u00e9"}'
DEEP = b'{"a":' * 9 + b"1" + b"}" * 9  # depth 9 > 8
BRACKETS_IN_STRINGS = b'{"s":"[[[[{{{{[[[[{{{{"}'  # 17 openers, depth 1


@pytest.mark.parametrize("payload", [
    EVENT + b"\n" + EVENT + b"\n",  # trailing newline
    EVENT + b"\n" + EVENT,  # last line without newline
    EVENT + b"\r\n" + EVENT + b"\r\n",  # CRLF
    b"\n\n" + EVENT + b"\n \t \n\r\n" + EVENT + b"\n\n",  # blank and whitespace-only lines skipped
    b"  " + EVENT + b"  \n\t1\r\n" + b'"str"\n[]\n{}\nnull\n',  # JSON whitespace kept as sent
    '{"k":"é € 😀 \u2028"}\n{"pct":"%s %06x %%"}\n'.encode(),
    BRACKETS_IN_STRINGS + b"\n" + EVENT,  # many openers, but not deep: accepted after the exact check
    b'{"a":' * 8 + b"1" + b"}" * 8,  # exactly MAX_JSON_DEPTH
])
def test_accepted_bodies_give_the_records_of_the_per_line_path(payload: bytes) -> None:
    c, q, m = make()
    assert check(c, q, payload) == 200
    assert value(m, "ingest_events_accepted_total") == len(list(split_ndjson(payload)))


@pytest.mark.parametrize(("payload", "reason", "line"), [
    (EVENT + b"\n{bad\n" + EVENT, "invalid_json", 2),
    (EVENT + b"\n\n\n" + b'{"a":"\xff"}\r\n' + EVENT, "invalid_utf8", 4),
    (EVENT + b"\n" + DEEP + b"\n" + EVENT, "too_deep", 2),
    (EVENT + b"\n" + DEEP + b"\n{bad", "too_deep", 2),  # the first bad line wins, whatever its reason
    (EVENT + b"\n{bad\n" + DEEP, "invalid_json", 2),
    (EVENT + b"\n" + EVENT + b"\n" + EVENT[:-1], "invalid_json", 3),  # truncated last line
    (EVENT + b"\n\xef\xbb\xbf" + EVENT, "invalid_json", 2),  # a BOM is not JSON
    (b"\n \r\n\t\n", "empty", None),
    (b"", "empty", None),
])
def test_a_bad_line_refuses_the_whole_request_naming_it(payload: bytes, reason: str, line: int | None) -> None:
    c, q, m = make()
    q.offer((0.0, b"already there\n"))
    assert check(c, q, payload) == 400
    assert len(q) == 1
    assert value(m, "http_requests_rejected_total", reason=reason) == 1
    r = c.handle("POST", "/collect", "", headers(), payload, "127.0.0.1")
    expected = f"line {line}: {reason.replace('_', ' ')}" if line else "empty NDJSON body"
    assert r.body == expected.encode() + b"\n"


def test_without_validation_lines_are_stored_as_text_with_invalid_utf8_replaced() -> None:
    c, q, _ = make(validate_json=False)
    payload = b"not json\n\xff\xfe bytes\r\n" + DEEP + b"\n{\x01}\n"
    assert check(c, q, payload) == 200
    assert [orjson.loads(line)["body"] for _, line in q.snapshot()] == [
        "not json", "\ufffd\ufffd bytes", DEEP.decode(), "{\x01}"]


def test_non_utf8_user_agent_is_replaced_in_every_record() -> None:
    c, q, _ = make()
    ua = "bot \udcff\udcfe/1"  # how aiohttp hands over non-UTF-8 header bytes
    assert check(c, q, EVENT + b"\n" + EVENT, ua) == 200
    assert {orjson.loads(line)["user_agent"] for _, line in q.snapshot()} == {"bot \ufffd\ufffd/1"}


def test_api_key_name_follows_the_id_in_every_record() -> None:
    c, q, _ = make(api_keys=(("partner-a", "k-web-0123456789"),), record_api_key_name=True)
    r = c.handle("POST", "/collect", "", headers(**{"X-API-Key": "k-web-0123456789"}), EVENT + b"\n" + EVENT,
                 "127.0.0.1")
    assert r.status == 200
    recs = [orjson.loads(line) for _, line in q.snapshot()]
    assert [list(rec) for rec in recs] == [["ts", "ip", "user_agent", "cookie", "body", "id", "api_key_name"]] * 2
    assert {rec["api_key_name"] for rec in recs} == {"partner-a"}
    assert recs[0]["id"] < recs[1]["id"]


def test_more_lines_than_the_queue_has_room_for_is_503_and_nothing_is_enqueued() -> None:
    c, q, m = make(capacity=5)
    q.offer((0.0, b"x\n"))
    q.offer((0.0, b"y\n"))
    r = c.handle("POST", "/collect", "", headers(), b"\n".join([EVENT] * 4), "127.0.0.1")
    assert r.status == 503 and r.headers["Retry-After"] == "1"
    assert len(q) == 2 and value(m, "http_requests_rejected_total", reason="queue_full") == 1
    # exactly the room left is accepted (blank lines do not count)
    r = c.handle("POST", "/collect", "", headers(), b"\n\n".join([EVENT] * 3) + b"\n\n", "127.0.0.1")
    assert r.status == 200 and len(q) == 5


def test_ids_are_unique_and_ordered_across_requests() -> None:
    c, q, _ = make()
    for _ in range(3):
        assert c.handle("POST", "/collect", "", headers(), b"\n".join([EVENT] * 50), "127.0.0.1").status == 200
    ids = [orjson.loads(line)["id"] for _, line in q.snapshot()]
    assert len(set(ids)) == 150 and ids == sorted(ids)


def test_splitter_and_bracket_count_agree_with_the_per_line_definitions() -> None:
    for payload in [b"", b"\n", b"a\r\n\r\n b \n\r", b"{[\n[[[\r\n{\"[\":1}", b"x" * 10]:
        assert ndjson_lines(payload) == [raw for _, raw in split_ndjson(payload)]
        per_line = [raw.count(b"[") + raw.count(b"{") for raw in payload.split(b"\n")]
        assert max_openers(payload) == max(per_line)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=40).map(lambda b: b.translate(bytes.maketrans(b"\x00\x01\x02\x03\x04", b"\n\n\r \t"))))
def test_property_splitter_is_the_per_line_definition(payload: bytes) -> None:
    # with and without CR (the two ways `ndjson_lines` splits), ending in a line feed or not
    for p in (payload, payload.replace(b"\r", b"")):
        assert ndjson_lines(p) == [raw for _, raw in split_ndjson(p)]


lines_pool = st.sampled_from([
    EVENT, DEEP, BRACKETS_IN_STRINGS, b"{bad", b'{"a":"\xff"}', b"\xef\xbb\xbf{}", b"", b"  ", b"\t", b"1", b'"s"',
    b"[[[[[[[[[]]]]]]]]]", b"[[[[[[[[]]]]]]]]", b"NaN", b"1e400", b"123456789012345678901234567890",
    b'"\\ud800"', b'"\\ud83d\\ude00"', b'{"k":"\xc3\xa9"}', b"\x00", b"{}\x00",
])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(lines_pool, st.sampled_from([b"\n", b"\r\n", b"\n\n", b"\r\n \n"])), max_size=8),
       st.booleans())
def test_property_same_answer_and_records_as_the_per_line_path(parts: list[tuple[bytes, bytes]], last_nl: bool) -> None:
    c, q, _ = make()
    payload = b"".join(line + sep for line, sep in parts)
    if not last_nl and parts:
        payload = payload[: -len(parts[-1][1])]
    check(c, q, payload)


# ---------------------------------------------------------------- simdjson as the first check

@pytest.mark.parametrize(("line", "status", "reason"), [
    (b"123456789012345678901234567890", 200, None),  # simdjson: BIGINT_ERROR; orjson accepts -> accepted
    (b'{"n":-9223372036854775809}', 200, None),
    (b"[" * 1100 + b"]" * 1100, 400, "invalid_json"),  # past orjson's own limit: invalid JSON, as before
    (b"\xef\xbb\xbf{}", 400, "invalid_json"),  # simdjson skips a BOM; orjson refuses it
    (b' {"a":"\xef\xbb\xbf"} ', 200, None),  # U+FEFF inside a string is fine (takes the orjson loop)
    (b'"\\ud800"', 400, "invalid_json"),
    (b'"\xed\xa0\x80"', 400, "invalid_utf8"),  # an encoded surrogate is not UTF-8
    (b"1e400", 400, "invalid_json"),
])
def test_what_simdjson_and_orjson_disagree_on_is_decided_by_orjson(
        line: bytes, status: int, reason: str | None) -> None:
    c, q, m = make(max_json_depth=512)
    assert check(c, q, EVENT + b"\n" + line + b"\n" + EVENT) == status
    if reason is not None:
        assert value(m, "http_requests_rejected_total", reason=reason) == 1
    # the parser is reused by the next request whatever happened before
    assert check(c, q, EVENT + b"\n" + EVENT) == 200


@pytest.mark.parametrize(("payload", "expected"), [
    (b"\xef\xbb\xbf{}", True),
    (b'{"a":1}\n\xef\xbb\xbf{}', True),
    (b'{"a":"\xef\xbb\xbf"}', True),  # anywhere counts: the screen is conservative
    (b'{"a":"\xef\x80\x80"}', False),  # U+F000: its first byte only
    (b'{"a":"\xef\xbb"}\n\xbf', False),  # the three bytes, not in a row
    (b'{"a":1}', False),
])
def test_has_bom_is_the_three_byte_search(payload: bytes, expected: bool) -> None:
    assert has_bom(payload) is expected is (b"\xef\xbb\xbf" in payload)


@pytest.mark.parametrize("ctype", [ND, "application/json"])
def test_a_body_with_0xef_but_no_bom_takes_the_fast_path_and_is_kept(ctype: str) -> None:
    c, q, _ = make()
    event = '{"k":"\uf000 \uffe5 x"}'  # U+F000 and U+FFE5 start with 0xEF in UTF-8
    raw = event.encode()
    assert b"\xef" in raw and not has_bom(raw)
    body = raw + b"\n" + raw if ctype == ND else raw
    r = c.handle("POST", "/collect", "", CIMultiDict({"Content-Type": ctype, "User-Agent": "u"}), body, "127.0.0.1")
    assert r.status == 200
    lines = [line for _, line in q.snapshot()]
    assert len(lines) == (2 if ctype == ND else 1)
    assert all(orjson.loads(line)["body"] == event for line in lines)


mutations = st.sampled_from([
    b'"', b"\\", b"\\u", b"\\ud800", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\x80", b"\xff", b"\xef\xbb\xbf",
    b"\x00", b"\x1f", b"\x7f", b"e400", b"9" * 25, b"{", b"}", b"[", b"]", b",", b":", b" ", b"\t", b"\r", b"\x0c",
    b"NaN", b"-", b".", b"0", b"\xc3", b"\xe2\x82", b"\xf0\x9f\x98", b"true", b"nul", b"\xc2\xa0", b"\xe2\x80\xa8",
])


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(EVENT)), mutations, st.integers(0, 3)), min_size=1, max_size=3))
def test_property_simdjson_never_accepts_a_line_orjson_refuses(edits: list[tuple[int, bytes, int]]) -> None:
    """The assumption the fast path rests on (apart from the BOM it screens out), checked on
    mutated events: a newer simdjson that accepted more would fail here, not in production."""
    import simdjson

    line = bytearray(EVENT)
    for pos, ins, cut in edits:
        line[pos:pos + cut] = ins
    raw = bytes(line)
    parser = simdjson.Parser()
    try:
        parser.parse(raw)
    except (ValueError, RuntimeError):
        return
    if b"\xef\xbb\xbf" not in raw:
        orjson.loads(raw)  # must not raise


# ---------------------------------------------------------------- one JSON event (not NDJSON)

def check_one(c: Collector, q: EventQueue[tuple[float, bytes]], payload: bytes, ctype: str = "application/json") -> int:
    """A single-event POST answers and enqueues what the orjson check (`validate`) alone decides."""
    twin = copy.copy(c.ids)
    before = q.snapshot()
    r = c.handle("POST", "/collect", "", CIMultiDict({"Content-Type": ctype, "User-Agent": "u"}), payload, "127.0.0.1")
    event, err = c.bodies.validate(payload, True)
    if event is None:
        assert (r.status, r.body) == (400, err.replace("_", " ").encode() + b"\n")
        assert q.snapshot() == before
    else:
        assert r.status == 200
        assert q.snapshot() == [*before, (TS, encode_record(TS, "127.0.0.1", "u", "", event.decode(), twin.next(TS)))]
    return r.status


@pytest.mark.parametrize("payload", [
    EVENT, DEEP, BRACKETS_IN_STRINGS, b'{"a":' * 8 + b"1" + b"}" * 8, b"\xef\xbb\xbf{}", b' {"a":"\xef\xbb\xbf"} ',
    b"123456789012345678901234567890", b'"\\ud800"', b'"\xed\xa0\x80"', b"1e400", b"", b" \t", b"{bad", b"{}\x00",
    b"[" * 1100 + b"]" * 1100, b'{"a":"\xff"}', b"null",
])
@pytest.mark.parametrize("ctype", ["application/json", "", "text/plain;charset=UTF-8", "Application/JSON; x=1"])
def test_one_event_is_decided_as_orjson_decides(payload: bytes, ctype: str) -> None:
    c, q, _ = make()
    check_one(c, q, payload, ctype)
    assert check_one(c, q, EVENT, ctype) == 200  # the parser is reused by the next request


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(EVENT)), mutations, st.integers(0, 3)), min_size=1, max_size=3))
def test_property_one_mutated_event_is_decided_as_orjson_decides(edits: list[tuple[int, bytes, int]]) -> None:
    c, q, _ = make()
    line = bytearray(EVENT)
    for pos, ins, cut in edits:
        line[pos:pos + cut] = ins
    check_one(c, q, bytes(line))


def test_ndjson_content_types_are_still_told_apart_once_remembered() -> None:
    c, q, _ = make()
    for _ in range(2):
        assert check(c, q, EVENT + b"\n" + EVENT) == 200
        assert check_one(c, q, EVENT, "application/json") == 200
    assert len(q.snapshot()) == 6


def test_valid_utf8_is_strict() -> None:
    """The check before an event's bytes go into records unchanged (after simdjson's own)."""
    from estat_ingest.http.bodies import valid_utf8

    assert valid_utf8("é € 😀".encode()) and valid_utf8(b"")
    for bad in (b"\xed\xa0\x80", b"\xc0\xaf", b"\xff", b"\xf4\x90\x80\x80", b"\xe2\x82"):  # surrogate, overlong, …
        assert not valid_utf8(bad)

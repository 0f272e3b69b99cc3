"""Property-based tests (hypothesis): the request validation function, the client-IP function, and a
short fuzzing run over the NDJSON splitter whose example count is printed (visible with -s)."""

from __future__ import annotations

import ipaddress
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from estat_ingest.config import DEFAULT_TRUSTED_PROXIES, Settings
from estat_ingest.http.bodies import split_ndjson
from estat_ingest.http.clientip import ClientIp
from estat_ingest.http.collect import Collector
from estat_ingest.metrics import Metrics
from estat_ingest.pipeline.queue import EventQueue

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
REASONS_400 = {"invalid_json", "invalid_utf8", "empty", "too_deep"}


def make(**overrides: Any) -> tuple[Collector, EventQueue[tuple[float, bytes]], Metrics]:
    s = Settings.from_env({}, **overrides)
    q: EventQueue[tuple[float, bytes]] = EventQueue(10_000_000)
    m = Metrics()
    c = Collector(s, q, m, clock=lambda: 1764821594.0)
    c.accepting = True
    return c, q, m


COLLECTOR, QUEUE, METRICS = make(max_body_bytes=4096, max_json_depth=16)
NO_HEADERS: CIMultiDict[str] = CIMultiDict()

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


def depth(v: Any) -> int:
    if isinstance(v, dict):
        return 1 + max((depth(x) for x in v.values()), default=0)
    if isinstance(v, list):
        return 1 + max((depth(x) for x in v), default=0)
    return 0


def _last_record() -> dict[str, Any]:
    return orjson.loads(QUEUE.snapshot()[-1][1])


@FAST
@given(st.binary(max_size=600))
def test_validation_any_bytes_is_200_only_for_utf8_json_and_stores_it_unchanged(body: bytes) -> None:
    before = len(QUEUE)
    r = COLLECTOR.handle("POST", "/collect", "", NO_HEADERS, body, None)
    assert r.status in (200, 400)
    try:
        text = body.decode("utf-8")
        parsed = orjson.loads(body)
        valid = bool(body.strip()) and depth(parsed) <= 16
    except (UnicodeDecodeError, orjson.JSONDecodeError):
        valid = False
    assert (r.status == 200) == valid
    if valid:
        assert len(QUEUE) == before + 1 and _last_record()["body"] == text
    else:
        assert len(QUEUE) == before and r.body.rstrip(b"\n").replace(b" ", b"_").decode() in REASONS_400


@FAST
@given(json_values, st.sampled_from([b"", b" ", b"\n", b"\t\r\n"]))
def test_validation_every_json_document_is_accepted_byte_for_byte(value: Any, pad: bytes) -> None:
    body = pad + orjson.dumps(value) + pad
    r = COLLECTOR.handle("POST", "/collect", "", NO_HEADERS, body, None)
    if depth(value) <= 16:
        assert r.status == 200 and _last_record()["body"] == body.decode()
    else:
        assert r.status == 400


@FAST
@given(st.lists(json_values, min_size=1, max_size=8), st.sampled_from([b"\n", b"\r\n"]), st.booleans())
def test_validation_ndjson_is_all_or_nothing(values: list[Any], sep: bytes, break_one: bool) -> None:
    lines = [orjson.dumps(v) for v in values]
    if break_one:
        lines[len(lines) // 2] = b'{"broken":'
    body = sep.join(lines) + sep
    before = len(QUEUE)
    h = CIMultiDict({"Content-Type": "application/x-ndjson"})
    r = COLLECTOR.handle("POST", "/collect", "", h, body, None)
    ok = not break_one and all(depth(v) <= 16 for v in values)
    assert (r.status == 200) == ok
    added = len(QUEUE) - before
    assert added == (len(values) if ok else 0)
    if ok:
        stored = [orjson.loads(line)["body"] for _, line in QUEUE.snapshot()[before:]]
        assert stored == [line.decode() for line in lines]


# ---------------------------------------------------------------- client ip

IPS = ClientIp(DEFAULT_TRUSTED_PROXIES)
TRUSTED_NETS = [ipaddress.ip_network(c) for c in DEFAULT_TRUSTED_PROXIES]


def _is_trusted(a: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return any(a.version == n.version and a in n for n in TRUSTED_NETS)


public_v4 = st.ip_addresses(v=4).filter(lambda a: not _is_trusted(a))
public_any = st.ip_addresses().filter(lambda a: not _is_trusted(a) and not (
    isinstance(a, ipaddress.IPv6Address) and (a.ipv4_mapped is not None or a.sixtofour is not None)))
trusted_addr = st.sampled_from(["10.0.1.5", "10.200.3.4", "172.16.9.9", "192.168.1.1", "127.0.0.1", "::1",
                                "fd00::1"])
garbage = st.text(alphabet=st.characters(blacklist_characters=","), max_size=30)
forged = st.lists(st.one_of(public_any.map(str), trusted_addr, garbage), max_size=6)


@FAST
@given(public_any, forged, st.one_of(st.none(), garbage))
def test_ip_untrusted_peer_is_the_client_whatever_the_headers(peer: Any, left: list[str], cf: str | None) -> None:
    assert IPS(str(peer), ", ".join(left) or None, cf) == str(peer)


@FAST
@given(forged, public_any, st.lists(trusted_addr, max_size=4), trusted_addr, st.one_of(st.none(), garbage))
def test_ip_is_the_rightmost_untrusted_hop_never_a_forged_one(
    left: list[str], client: Any, hops: list[str], peer: str, cf: str | None
) -> None:
    # what a client sent (left), then the address our first proxy saw (client), then our own hops
    xff = ", ".join([*left, str(client), *hops])
    assert IPS(peer, xff, cf) == str(client)


@FAST
@given(st.lists(trusted_addr, max_size=4), trusted_addr, public_v4, st.integers(1, 65535))
def test_ip_cloudfront_header_only_when_every_hop_is_trusted(
    hops: list[str], peer: str, viewer: Any, port: int
) -> None:
    cf = f"{viewer}:{port}"
    assert IPS(peer, ", ".join(hops) or None, cf) == str(viewer)
    # one untrusted hop anywhere on the path (here: a client reaching the ALB directly) → ignored
    attacker = "198.51.100.66"
    assert IPS(peer, ", ".join([*hops, attacker]), cf) == attacker


@FAST
@given(st.text(max_size=80), st.text(max_size=200), st.text(max_size=60))
def test_ip_never_raises_and_returns_an_address_or_empty(peer: str, xff: str, cf: str) -> None:
    got = IPS(peer, xff, cf)
    if got:
        ipaddress.ip_address(got)


# ---------------------------------------------------------------- NDJSON splitter fuzz

FUZZ_EXAMPLES = 2000
_runs = {"n": 0}


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300) | st.lists(st.sampled_from([b"\n", b"\r", b"\r\n", b" ", b"{}", b"x", b"\xff"]),
                                          max_size=40).map(b"".join))
def test_fuzz_ndjson_splitter(data: bytes) -> None:
    _runs["n"] += 1
    got = list(split_ndjson(data))
    raw_lines = data.split(b"\n")
    assert len(got) <= len(raw_lines)
    numbers = [n for n, _ in got]
    assert numbers == sorted(set(numbers)) and all(1 <= n <= len(raw_lines) for n in numbers)
    for n, line in got:
        assert b"\n" not in line and line.strip()
        original = raw_lines[n - 1]
        assert original in (line, line + b"\r")
    # every non-blank line comes out exactly once
    expected = [(i, (s[:-1] if s.endswith(b"\r") else s)) for i, s in enumerate(raw_lines, 1)
                if (s[:-1] if s.endswith(b"\r") else s).strip()]
    assert got == expected


def test_fuzz_ndjson_splitter_count_printed() -> None:
    # runs after the fuzz test in file order; the count shows in CI logs with -s / -rA
    print(f"\nNDJSON splitter fuzz: {_runs['n']} examples run (max {FUZZ_EXAMPLES})")
    assert _runs["n"] >= 100


# ---------------------------------------------------------------- bounded decoding

DECODE_LIMIT = 2048


def _compress(enc: str, data: bytes) -> bytes:
    import gzip
    import zlib

    import zstandard

    if enc == "gzip":
        return gzip.compress(data)
    if enc == "deflate":
        return zlib.compress(data)
    return zstandard.ZstdCompressor().compress(data)


@FAST
@given(st.sampled_from(["gzip", "deflate", "zstd"]), st.binary(max_size=3000) | st.integers(0, 200_000).map(
    lambda n: b"0" * n))
def test_decode_round_trips_under_the_limit_and_refuses_over_it(enc: str, data: bytes) -> None:
    from estat_ingest.http.bodies import BodyError, decode

    packed = _compress(enc, data)
    if len(data) <= DECODE_LIMIT:
        assert decode(enc, packed, DECODE_LIMIT) == data
    else:
        try:
            decode(enc, packed, DECODE_LIMIT)
        except BodyError as err:
            assert err.status == 413 and err.reason == "too_large"
        else:
            raise AssertionError("over-limit body decoded")


@FAST
@given(st.sampled_from(["gzip", "deflate", "zstd", "x-gzip", "br", "identity", "gzip, zstd"]),
       st.binary(max_size=400), st.integers(0, 400))
def test_decode_of_any_bytes_is_a_body_under_the_limit_or_a_clean_error(enc: str, data: bytes, cut: int) -> None:
    from estat_ingest.http.bodies import BodyError, decode

    for candidate in (data, _compress("gzip" if enc == "x-gzip" else enc, data)[:cut]
                      if enc in ("gzip", "deflate", "zstd", "x-gzip") else data):
        try:
            out = decode(enc, candidate, DECODE_LIMIT)
        except BodyError as err:
            assert (err.status, err.reason) in {(400, "bad_encoding"), (413, "too_large"),
                                                (415, "unsupported_encoding")}
        else:
            assert len(out) <= DECODE_LIMIT


# ---------------------------------------------------------------- the whole function never fails

HEADER_NAMES = ["User-Agent", "Cookie", "X-Forwarded-For", "CloudFront-Viewer-Address", "Origin", "Accept",
                "Content-Type", "Content-Encoding", "Authorization", "X-Api-Key",
                "Access-Control-Request-Method"]
# what aiohttp can hand over: any text, with undecodable bytes as lone surrogates (surrogateescape)
header_text = st.text(alphabet=st.characters(blacklist_categories=("Cc",)) | st.sampled_from(
    ["\udcff", "\udc80", "\ufffd", "\t"]), max_size=40)
EDGE, EDGE_Q, EDGE_M = make(max_body_bytes=4096, api_keys=(("web", "k"),), cors_allow_origins=("https://a.example",),
                            cookie_allowlist=("_ga",))
EDGE_OPEN, _, _ = make(max_body_bytes=4096)


@FAST
@given(st.sampled_from(["GET", "POST", "OPTIONS", "PUT", "HEAD", "BREW"]),
       st.sampled_from(["/collect", "/collect.gif", "/pixel.gif"]),
       st.text(max_size=60), st.lists(st.tuples(st.sampled_from(HEADER_NAMES), header_text), max_size=8),
       st.binary(max_size=200), st.one_of(st.none(), st.text(max_size=30)), st.booleans())
def test_handle_never_raises_and_answers_a_known_status(
    method: str, path: str, query: str, headers: list[tuple[str, str]], body: bytes, peer: str | None, keys: bool
) -> None:
    c = EDGE if keys else EDGE_OPEN
    r = c.handle(method, path, query, CIMultiDict(headers), body, peer)
    assert r.status in (200, 204, 400, 401, 405, 413, 415, 503)
    if r.status >= 400:
        assert r.body.endswith(b"\n")

"""Edge rules of the plain /collect function: CORS, API keys, encodings, pixels, depth, cookies, ip."""

from __future__ import annotations

import gzip
import zlib
from typing import Any

import orjson
import pytest
import zstandard
from multidict import CIMultiDict

from estat_ingest.config import ConfigError, Settings
from estat_ingest.http.collect import GIF
from estat_ingest.pipeline.queue import EventQueue
from tests.http.util import make, value


def records(q: EventQueue[tuple[float, bytes]]) -> list[dict[str, Any]]:
    return [orjson.loads(line) for _, line in q.snapshot()]


def H(**kv: str) -> CIMultiDict[str]:
    return CIMultiDict({k.replace("_", "-"): v for k, v in kv.items()})


# ---------------------------------------------------------------- CORS (v1 defect m)

SHOP = "https://shop.example"


def test_v1_defect_m_preflight_from_allowed_origin_gets_cors_headers() -> None:
    # v1 answered 204 with no Access-Control-* headers, so this assertion fails on v1's behaviour
    c, q, m = make(cors_allow_origins=(SHOP,))
    r = c.handle("OPTIONS", "/collect", "", H(Origin=SHOP, Access_Control_Request_Method="POST",
                                             Access_Control_Request_Headers="content-type"), b"", None)
    assert r.status == 204
    assert r.headers["Access-Control-Allow-Origin"] == SHOP
    assert "POST" in r.headers["Access-Control-Allow-Methods"]
    assert "content-type" in r.headers["Access-Control-Allow-Headers"].lower()
    assert int(r.headers["Access-Control-Max-Age"]) > 0
    assert r.headers["Access-Control-Allow-Credentials"] == "true" and r.headers["Vary"] == "Origin"


def test_preflight_from_other_origin_or_without_config_has_no_cors_headers() -> None:
    for settings, origin in (({"cors_allow_origins": (SHOP,)}, "https://evil.example"), ({}, SHOP)):
        c, q, m = make(**settings)
        r = c.handle("OPTIONS", "/collect", "", H(Origin=origin, Access_Control_Request_Method="POST"), b"", None)
        assert r.status == 204 and r.headers["Allow"] == "GET, POST, OPTIONS"
        assert not [k for k in r.headers if k.lower().startswith("access-control")]


def test_simple_and_credentialed_requests_get_the_right_headers() -> None:
    c, q, m = make(cors_allow_origins=(SHOP,))
    r = c.handle("POST", "/collect", "", H(Origin=SHOP), b'{"a":1}', None)
    assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == SHOP
    assert r.headers["Access-Control-Allow-Credentials"] == "true"
    # errors carry them too, so page scripts can read the status
    r = c.handle("POST", "/collect", "", H(Origin=SHOP), b"{", None)
    assert r.status == 400 and r.headers["Access-Control-Allow-Origin"] == SHOP
    r = c.handle("POST", "/collect", "", H(Origin="https://evil.example"), b'{"a":2}', None)
    assert r.status == 200 and "Access-Control-Allow-Origin" not in r.headers
    assert len(q) == 2  # CORS is enforced by browsers; the server still stores what it may


def test_wildcard_never_allows_credentials() -> None:
    c, q, m = make(cors_allow_origins=("*",))
    r = c.handle("OPTIONS", "/collect", "", H(Origin="https://any.example", Access_Control_Request_Method="POST"),
                 b"", None)
    assert r.headers["Access-Control-Allow-Origin"] == "*" and "Access-Control-Allow-Credentials" not in r.headers
    r = c.handle("POST", "/collect", "", H(Origin="https://any.example"), b"{}", None)
    assert r.headers["Access-Control-Allow-Origin"] == "*" and "Access-Control-Allow-Credentials" not in r.headers


def test_send_beacon_text_plain_is_json() -> None:
    c, q, m = make()
    r = c.handle("POST", "/collect", "", H(Content_Type="text/plain;charset=UTF-8"), b'{"ev":"unload"}', None)
    assert r.status == 200 and records(q)[0]["body"] == '{"ev":"unload"}'


@pytest.mark.parametrize("path,accept", [("/collect.gif", ""), ("/pixel.gif", "*/*"),
                                         ("/collect", "image/avif,image/webp,image/*,*/*;q=0.8")])
def test_pixel_answers_a_gif(path: str, accept: str) -> None:
    c, q, m = make()
    r = c.handle("GET", path, "e=view&p=%2F", H(Accept=accept), b"", "203.0.113.5")
    assert r.status == 200 and r.headers["Content-Type"] == "image/gif" and r.body == GIF
    assert GIF.startswith(b"GIF89a") and len(GIF) == 43
    assert records(q)[0]["body"] == "e=view&p=%2F"
    r = c.handle("GET", "/collect", "e=1", H(Accept="*/*"), b"", None)
    assert r.status == 200 and r.body == b""


# ---------------------------------------------------------------- API keys

KEYS = (("web", "k-web-0123456789"), ("app", "k-app-9876543210"))


@pytest.mark.parametrize("headers,query", [
    ({"Authorization": "Bearer k-web-0123456789"}, ""),
    ({"X-Api-Key": "k-web-0123456789"}, ""),
    ({}, "api_key=k-web-0123456789"),
])
def test_api_key_accepted_in_header_or_query(headers: dict[str, str], query: str) -> None:
    c, q, m = make(api_keys=KEYS)
    r = c.handle("POST", "/collect", query, CIMultiDict(headers), b'{"a":1}', None)
    assert r.status == 200
    assert value(m, "http_requests_api_key_total", key_name="web") == 1
    assert b"k-web" not in q.snapshot()[0][1]


def test_record_api_key_name_appends_the_name_after_id_when_enabled() -> None:
    c, q, m = make(api_keys=KEYS, record_api_key_name=True)
    assert c.handle("POST", "/collect", "", H(X_Api_Key="k-app-9876543210"), b'{"a":1}', None).status == 200
    nd = H(X_Api_Key="k-web-0123456789", Content_Type="application/x-ndjson")
    assert c.handle("POST", "/collect", "", nd, b'{"b":1}\n{"b":2}\n', None).status == 200
    recs = records(q)
    assert [list(r) for r in recs] == [["ts", "ip", "user_agent", "cookie", "body", "id", "api_key_name"]] * 3
    assert [r["api_key_name"] for r in recs] == ["app", "web", "web"]
    assert all(b"k-app" not in line and b"k-web" not in line for _, line in q.snapshot())
    c, q, m = make(api_keys=KEYS)  # off by default: v1's six fields
    assert c.handle("POST", "/collect", "", H(X_Api_Key="k-app-9876543210"), b'{"a":1}', None).status == 200
    assert list(records(q)[0]) == ["ts", "ip", "user_agent", "cookie", "body", "id"]


def test_401_missing_or_wrong_key_with_www_authenticate() -> None:
    c, q, m = make(api_keys=KEYS)
    r = c.handle("POST", "/collect", "", H(), b"{}", None)
    assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
    for h in ({"Authorization": "Bearer k-web-0123456788"}, {"X-Api-Key": ""}, {"Authorization": "Basic eA=="},
              {"X-Api-Key": "k-web-0123456789x"}):
        r = c.handle("POST", "/collect", "", CIMultiDict(h), b"{}", None)
        assert r.status == 401 and "WWW-Authenticate" in r.headers
        assert b"k-web" not in r.body
    assert len(q) == 0
    assert value(m, "http_requests_rejected_total", reason="auth_missing") >= 1
    assert value(m, "http_requests_rejected_total", reason="auth_invalid") >= 1


def test_get_beacon_key_is_removed_from_the_stored_payload() -> None:
    c, q, m = make(api_keys=KEYS)
    r = c.handle("GET", "/collect", "e=1&api_key=k-app-9876543210&p=2", H(), b"", None)
    assert r.status == 200 and records(q)[0]["body"] == "e=1&p=2"
    assert value(m, "http_requests_api_key_total", key_name="app") == 1


def test_preflight_needs_no_key() -> None:
    c, q, m = make(api_keys=KEYS, cors_allow_origins=(SHOP,))
    r = c.handle("OPTIONS", "/collect", "", H(Origin=SHOP, Access_Control_Request_Method="POST"), b"", None)
    assert r.status == 204 and r.headers["Access-Control-Allow-Origin"] == SHOP
    assert "X-Api-Key" in r.headers["Access-Control-Allow-Headers"]


# ---------------------------------------------------------------- compressed bodies

BODY = b'{"ev":"compressed","n":[1,2,3]}'


@pytest.mark.parametrize("enc,data", [
    ("gzip", gzip.compress(BODY)), ("x-gzip", gzip.compress(BODY)), ("deflate", zlib.compress(BODY)),
    ("deflate", zlib.compress(BODY)[2:-4]), ("zstd", zstandard.ZstdCompressor().compress(BODY)),
    ("GZIP ", gzip.compress(BODY)),
])
def test_compressed_bodies_are_decoded(enc: str, data: bytes) -> None:
    c, q, m = make()
    assert c.handle("POST", "/collect", "", H(Content_Encoding=enc), data, None).status == 200
    assert records(q)[0]["body"] == BODY.decode()


def test_compressed_limits_and_errors() -> None:
    c, q, m = make(max_body_bytes=1000)
    exact = b'"' + b"x" * 998 + b'"'
    over = b'"' + b"x" * 999 + b'"'
    for comp in (gzip.compress, zstandard.ZstdCompressor().compress, zlib.compress):
        assert c.handle("POST", "/collect", "", H(Content_Encoding=_enc(comp)), comp(exact), None).status == 200
        assert c.handle("POST", "/collect", "", H(Content_Encoding=_enc(comp)), comp(over), None).status == 413
    bomb = gzip.compress(b"0" * 900_000)  # 900 KB in under 1000 bytes
    assert len(bomb) < 1000
    assert c.handle("POST", "/collect", "", H(Content_Encoding="gzip"), bomb, None).status == 413
    zbomb = zstandard.ZstdCompressor().compress(b"0" * 20_000_000)  # 20 MB in under 1000 bytes
    assert len(zbomb) < 1000
    assert c.handle("POST", "/collect", "", H(Content_Encoding="zstd"), zbomb, None).status == 413
    assert c.handle("POST", "/collect", "", H(Content_Encoding="gzip"), gzip.compress(BODY)[:-6], None).status == 400
    assert c.handle("POST", "/collect", "", H(Content_Encoding="gzip"), b"not gzip at all", None).status == 400
    assert c.handle("POST", "/collect", "", H(Content_Encoding="zstd"), b"\x28\xb5\x2f\xfdjunk", None).status == 400
    assert c.handle("POST", "/collect", "", H(Content_Encoding="br"), BODY, None).status == 415
    assert c.handle("POST", "/collect", "", H(Content_Encoding="gzip, gzip"), BODY, None).status == 415
    assert len(q) == 3
    assert value(m, "http_requests_rejected_total", reason="too_large") == 5
    assert value(m, "http_requests_rejected_total", reason="bad_encoding") == 3
    assert value(m, "http_requests_rejected_total", reason="unsupported_encoding") == 2


def _enc(comp: Any) -> str:
    return {gzip.compress: "gzip", zlib.compress: "deflate"}.get(comp, "zstd")


def test_compressed_ndjson() -> None:
    c, q, m = make()
    nd = b'{"a":1}\n{"a":2}\n'
    r = c.handle("POST", "/collect", "", H(Content_Encoding="gzip", Content_Type="application/x-ndjson"),
                 gzip.compress(nd), None)
    assert r.status == 200 and [rec["body"] for rec in records(q)] == ['{"a":1}', '{"a":2}']


# ---------------------------------------------------------------- JSON depth

def test_depth_cap() -> None:
    c, q, m = make(max_json_depth=8)
    ok = b"[" * 8 + b"]" * 8
    deep = b"[" * 9 + b"]" * 9
    assert c.handle("POST", "/collect", "", H(), ok, None).status == 200
    r = c.handle("POST", "/collect", "", H(), deep, None)
    assert r.status == 400 and value(m, "http_requests_rejected_total", reason="too_deep") == 1
    objects = b'{"a":' * 9 + b"1" + b"}" * 9  # objects only (the screen counts `[` only when there is one)
    assert c.handle("POST", "/collect", "", H(), objects, None).status == 400
    assert value(m, "http_requests_rejected_total", reason="too_deep") == 2
    assert c.handle("POST", "/collect", "", H(), b'{"a":' * 8 + b"1" + b"}" * 8, None).status == 200
    wide = orjson.dumps([{"a": [1]} for _ in range(200)])  # many brackets, shallow
    assert c.handle("POST", "/collect", "", H(), wide, None).status == 200
    mixed = b'{"s":"[[[[[[[[[[[[","o":{"a":{"b":{}}}}'  # brackets inside strings do not count
    assert c.handle("POST", "/collect", "", H(), mixed, None).status == 200
    assert c.handle("POST", "/collect", "", H(), b"[" * 5000 + b"]" * 5000, None).status == 400
    assert len(q) == 4


# ---------------------------------------------------------------- client ip through the function

def test_v1_defect_l_forged_leftmost_xff_is_not_recorded() -> None:
    # v1 recorded the leftmost public X-Forwarded-For entry (1.1.1.1 here): this fails on v1
    c, q, m = make()
    h = CIMultiDict([("X-Forwarded-For", "1.1.1.1, 8.8.8.8"), ("X-Forwarded-For", "203.0.113.77")])
    assert c.handle("POST", "/collect", "", h, b"{}", "10.0.3.4").status == 200
    h = H(X_Forwarded_For="1.1.1.1", CloudFront_Viewer_Address="9.9.9.9:443")
    assert c.handle("POST", "/collect", "", h, b"{}", "198.51.100.20").status == 200
    assert [r["ip"] for r in records(q)] == ["203.0.113.77", "198.51.100.20"]


def test_new_settings_are_range_checked() -> None:
    for var, bad in (("MAX_HEADER_BYTES", "10"), ("MAX_HEADERS", "0"), ("REQUEST_READ_TIMEOUT", "0s"),
                     ("MAX_IN_FLIGHT", "0"), ("MAX_JSON_DEPTH", "0"), ("MAX_JSON_DEPTH", "x"),
                     ("RECORD_API_KEY_NAME", "maybe")):
        with pytest.raises(ConfigError) as err:
            Settings.from_env({var: bad})
        assert var in str(err.value) and "\n" not in str(err.value)
    s = Settings.from_env({"MAX_HEADER_BYTES": "16KiB", "MAX_HEADERS": "50", "REQUEST_READ_TIMEOUT": "2s",
                           "MAX_IN_FLIGHT": "10", "MAX_JSON_DEPTH": "12"})
    assert (s.max_header_bytes, s.max_headers, s.request_read_timeout_s, s.max_in_flight, s.max_json_depth) == (
        16384, 50, 2.0, 10, 12)


def test_cloudfront_viewer_address_formats_and_trust() -> None:
    from estat_ingest.http.clientip import ClientIp

    ips = ClientIp(("10.0.0.0/8", "127.0.0.0/8", "130.176.0.0/16"))  # 130.176/16: a CloudFront range
    # ALB (10.x) ← CloudFront edge (trusted) ← viewer: the viewer, from XFF or the header
    assert ips("10.0.0.2", "203.0.113.10, 130.176.1.1", "203.0.113.10:5555") == "203.0.113.10"
    assert ips("10.0.0.2", "130.176.1.1", "[2001:db8::7]:443") == "2001:db8::7"
    assert ips("10.0.0.2", "130.176.1.1", "2001:db8::7:443") == "2001:db8::7"
    # a client hitting the ALB directly with a forged header: the ALB appended its real address
    assert ips("10.0.0.2", "198.51.100.9", "203.0.113.10:5555") == "198.51.100.9"
    # an unparsable hop stops the walk at the last trusted address and disables the header
    assert ips("10.0.0.2", "203.0.113.10, unknown", "203.0.113.10:1") == "10.0.0.2"
    assert ips("::ffff:198.51.100.3", None, None) == "198.51.100.3"
    assert ips(None, "203.0.113.10", None) == ""


def test_rejections_are_logged_at_most_once_per_reason_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    c, q, m = make()
    now = [1000.0]
    c.reject_log.clock = lambda: now[0]
    with caplog.at_level("WARNING", logger="estat_ingest.http"):
        for _ in range(50):
            c.handle("POST", "/collect", "", H(), b"{", None)
            c.handle("POST", "/collect", "", H(), b"", None)
        now[0] += 11
        c.handle("POST", "/collect", "", H(), b"{", None)
    lines = [(r.reason, r.suppressed) for r in caplog.records]  # type: ignore[attr-defined]
    assert lines == [("invalid_json", 0), ("empty", 0), ("invalid_json", 49)]
    assert value(m, "http_requests_rejected_total", reason="invalid_json") == 51


def test_non_utf8_header_bytes_are_replaced_not_a_500() -> None:
    # aiohttp decodes header bytes with surrogateescape; \xff in a User-Agent arrives as \udcff
    c, q, m = make()
    h = CIMultiDict({"User-Agent": "bot\udcff/1", "Cookie": "sid=\udcfe"})
    assert c.handle("POST", "/collect", "", h, b"{}", None).status == 200
    rec = records(q)[0]
    assert rec["user_agent"] == "bot\ufffd/1" and rec["cookie"] == "sid=\ufffd"

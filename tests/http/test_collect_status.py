"""Every status code of DESIGN.md §3 from the plain /collect function, with its counter moving."""

from __future__ import annotations

import orjson
import pytest
from multidict import CIMultiDict

from tests.http.util import make, value

H = CIMultiDict({"User-Agent": "ua/1", "Cookie": "sid=1"})


def test_200_post_records_exact_body() -> None:
    c, q, m = make()
    body = b'{"ev": "click",  "x": [1, 2]}'
    r = c.handle("POST", "/collect", "", H, body, "203.0.113.9")
    assert r.status == 200 and r.body == b""
    [(ts, line)] = q.snapshot()
    rec = orjson.loads(line)
    assert rec["body"] == body.decode() and rec["ts"] == 1764821594 and rec["ip"] == "203.0.113.9"
    assert rec["user_agent"] == "ua/1" and rec["cookie"] == "sid=1"
    assert value(m, "http_requests_total") == 1 and value(m, "http_requests_accepted_total") == 1


def test_200_get_stores_raw_query_string() -> None:
    c, q, m = make()
    assert c.handle("GET", "/collect", "e=view&p=%2Fhome", H, b"", "203.0.113.9").status == 200
    assert orjson.loads(q.snapshot()[0][1])["body"] == "e=view&p=%2Fhome"


def test_400_invalid_json_and_invalid_utf8_and_empty() -> None:
    c, q, m = make()
    assert c.handle("POST", "/collect", "", H, b"{nope", None).status == 400
    assert c.handle("POST", "/collect", "", H, b'"\xff\xfe"', None).status == 400
    r = c.handle("POST", "/collect", "", H, b"", None)
    assert r.status == 400 and b"empty" in r.body
    assert len(q) == 0
    assert value(m, "http_requests_rejected_total", reason="invalid_json") == 1
    assert value(m, "http_requests_rejected_total", reason="invalid_utf8") == 1
    assert value(m, "http_requests_rejected_total", reason="empty") == 1
    assert value(m, "http_requests_total") == 0  # v1 meaning: only requests that reached the enqueue step


def test_validate_json_false_accepts_any_text() -> None:
    c, q, m = make(validate_json=False)
    assert c.handle("POST", "/collect", "", H, b"plain text", None).status == 200
    assert orjson.loads(q.snapshot()[0][1])["body"] == "plain text"


def test_405_has_allow_header() -> None:
    c, q, m = make()
    for method in ("PUT", "DELETE", "PATCH", "HEAD"):
        r = c.handle(method, "/collect", "", H, b"{}", None)
        assert r.status == 405 and r.headers["Allow"] == "GET, POST, OPTIONS"
    assert value(m, "http_requests_rejected_total", reason="method_not_allowed") == 4


def test_413_exact_max_allowed_and_max_plus_one_rejected() -> None:
    c, q, m = make(max_body_bytes=100)
    exact = b'{"p":"' + b"x" * 92 + b'"}'
    assert len(exact) == 100
    assert c.handle("POST", "/collect", "", H, exact, None).status == 200
    over = b'{"p":"' + b"x" * 93 + b'"}'
    assert c.handle("POST", "/collect", "", H, over, None).status == 413
    assert c.handle("GET", "/collect", "q=" + "x" * 99, H, b"", None).status == 413
    assert value(m, "http_requests_rejected_body_too_large_total") == 2
    assert len(q) == 1


def test_503_queue_full_with_retry_after() -> None:
    c, q, m = make(channel_size=2)
    assert c.handle("POST", "/collect", "", H, b"1", None).status == 200
    assert c.handle("POST", "/collect", "", H, b"2", None).status == 200
    r = c.handle("POST", "/collect", "", H, b"3", None)
    assert r.status == 503 and r.headers["Retry-After"] == "1"
    assert value(m, "http_requests_rejected_queue_full_total") == 1
    assert value(m, "http_requests_total") == 3 and value(m, "http_requests_accepted_total") == 2


def test_503_while_draining() -> None:
    c, q, m = make()
    c.accepting = False
    r = c.handle("POST", "/collect", "", H, b"{}", None)
    assert r.status == 503 and "Retry-After" in r.headers
    assert value(m, "http_requests_rejected_total", reason="draining") == 1 and len(q) == 0


NDJSON = CIMultiDict({"Content-Type": "application/x-ndjson"})


def test_ndjson_all_lines_enqueued() -> None:
    c, q, m = make()
    body = b'{"a":1}\n\n{"a":2}\r\n{"a":3}'
    assert c.handle("POST", "/collect", "", NDJSON, body, None).status == 200
    assert [orjson.loads(orjson.loads(line)["body"])["a"] for _, line in q.snapshot()] == [1, 2, 3]
    ids = [orjson.loads(line)["id"] for _, line in q.snapshot()]
    assert ids == sorted(ids) and len(set(ids)) == 3
    assert value(m, "ingest_events_accepted_total") == 3 and value(m, "http_requests_accepted_total") == 1


def test_ndjson_one_bad_line_rejects_all() -> None:
    c, q, m = make()
    r = c.handle("POST", "/collect", "", NDJSON, b'{"a":1}\n{"a":\n{"a":3}\n', None)
    assert r.status == 400 and b"line 2" in r.body and len(q) == 0


def test_ndjson_that_does_not_fit_is_refused_whole() -> None:
    c, q, m = make(channel_size=3)
    assert c.handle("POST", "/collect", "", H, b"{}", None).status == 200
    r = c.handle("POST", "/collect", "", NDJSON, b"1\n2\n3\n", None)
    assert r.status == 503 and len(q) == 1
    assert c.handle("POST", "/collect", "", NDJSON, b"1\n2\n", None).status == 200 and len(q) == 3


@pytest.mark.parametrize("store,allow,expected", [
    (False, (), ""), (True, (), "sid=1; _ga=x; theme=dark"), (True, ("theme", "_ga"), "_ga=x; theme=dark"),
])
def test_cookie_policy(store: bool, allow: tuple[str, ...], expected: str) -> None:
    c, q, m = make(store_cookies=store, cookie_allowlist=allow)
    h = CIMultiDict({"Cookie": "sid=1; _ga=x; theme=dark"})
    assert c.handle("POST", "/collect", "", h, b"{}", None).status == 200
    assert orjson.loads(q.snapshot()[0][1])["cookie"] == expected


def test_durable_requests_of_one_iteration_share_a_ticket_and_count_once_kept() -> None:
    import asyncio

    async def run() -> None:
        c, q, m = make(ack_mode="durable", api_keys=(("partner", "k1"),))
        hdrs = CIMultiDict({"X-API-Key": "k1", "Content-Type": "application/x-ndjson"})
        replies = [c.handle("POST", "/collect", "", hdrs, b'{"a":1}\n{"b":2}', None) for _ in range(3)]
        tickets = {id(r.ticket) for r in replies}
        assert len(tickets) == 1 and all(r.status == 200 for r in replies)  # one future for the three
        assert value(m, "http_requests_accepted_total") == 0  # not before the spool kept them
        assert await q.take(None, None) is not None
        [t] = q.take_tickets()
        t.set_result(None)
        await asyncio.sleep(0)
        assert value(m, "http_requests_accepted_total") == 3
        assert value(m, "ingest_events_accepted_total") == 6
        assert value(m, "http_requests_api_key_total", key_name="partner") == 3
        assert c.settle(replies[0]).status == 200
        # the next iteration's requests: a new ticket; a failed round counts nothing as accepted
        r = c.handle("POST", "/collect", "", hdrs, b'{"c":3}', None)
        assert r.ticket is not None and id(r.ticket) not in tickets
        await q.take(None, None)
        [t2] = q.take_tickets()
        t2.set_exception(OSError(28, "no space"))
        await asyncio.sleep(0)
        assert value(m, "http_requests_accepted_total") == 3
        assert c.settle(r).status == 503

    asyncio.run(run())

"""The edge policy (estat_ingest/http/policy.py) is what both fronts apply: one set of limits, one
admission count, the same canned answers."""

from __future__ import annotations

import asyncio

from estat_ingest.http.aiohttp_front import server_kwargs
from estat_ingest.http.fast.front import Front
from estat_ingest.http.policy import NOT_READY, OVERLOADED, READY, InFlight, Limits, ready_reply
from estat_ingest.http.routes import build_app
from tests.http.util import make, value


def test_both_fronts_take_their_limits_from_the_collector() -> None:
    c, q, m = make(max_body_bytes=10_000, max_header_bytes=4096, max_headers=30, max_in_flight=7,
                   header_read_timeout_s=3.0, request_read_timeout_s=4.0)
    limits = c.limits
    assert (limits.body_bytes, limits.request_line_bytes, limits.header_line_bytes, limits.headers,
            limits.in_flight, limits.header_read_s, limits.body_read_s) == (10_000, 14_096, 4096, 30, 7, 3.0, 4.0)
    assert (limits.keepalive_s, limits.linger_s, limits.close_flush_s) == (75.0, 2.0, 1.0)
    kw = server_kwargs(build_app(c, m))
    assert (kw["max_line_size"], kw["max_field_size"], kw["max_headers"], kw["keepalive_timeout"],
            kw["lingering_time"], kw["auto_decompress"]) == (14_096, 4096, 30, 75.0, 2.0, False)
    front = Front(c, m)
    assert front.limits is limits and front.max_url == 14_096
    assert c.inflight.cap == 7


def test_the_request_line_holds_a_get_payload_of_max_body_size() -> None:
    c, _, _ = make(max_body_bytes=100)
    assert c.limits.request_line_bytes == 8190  # never below what common servers accept
    c, _, _ = make(max_body_bytes=1 << 20)
    assert Limits.of(c.settings).request_line_bytes == (1 << 20) + 4096


def test_admission_counts_every_request_until_it_leaves_and_refuses_past_the_cap() -> None:
    f = InFlight(2)
    assert [f.admit() for _ in range(3)] == [True, True, False]
    assert f.count == 3  # the refused one is counted until it is answered

    async def drain() -> list[bool]:
        waiting = asyncio.ensure_future(f.wait_zero(30))
        await asyncio.sleep(0)
        for _ in range(3):
            f.leave()
        return [await waiting, await f.wait_zero(0)]

    assert asyncio.run(drain()) == [True, True] and f.count == 0
    assert f.admit()


def test_refusals_are_counted_under_their_reason_with_their_headers() -> None:
    c, _, m = make()
    r = c.refuse(OVERLOADED)
    assert (r.status, r.headers["Retry-After"], r.headers["Content-Type"]) == (503, "1", "text/plain; charset=utf-8")
    assert r.body == b"too many requests in flight, retry later\n"
    assert value(m, "http_requests_rejected_total", reason="overloaded") == 1
    assert ready_reply(True) is READY and ready_reply(False) is NOT_READY and NOT_READY.status == 503

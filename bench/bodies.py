"""Request bodies used by every benchmark: realistic analytics events of a fixed size."""

from __future__ import annotations

import hashlib

import orjson

PAGES = ("/", "/products/shoes", "/cart", "/checkout/payment", "/search?q=running+shoes", "/blog/2026/11/fit")


def event_body(i: int, size: int) -> bytes:
    """A JSON object of exactly `size` bytes (size >= 200), varied per `i`; compresses ≈ 3-4x."""
    h = hashlib.sha256(str(i).encode()).hexdigest()
    ev = {
        "event": "page_view" if i % 3 else "click",
        "url": "https://shop.example.com" + PAGES[i % len(PAGES)],
        "ref": "https://www.google.com/",
        "sid": h[:24],
        "uid": h[24:40],
        "ts_client": 1_795_000_000_000 + i,
        "screen": "1920x1080",
        "lang": "ko-KR",
        "pad": "",
    }
    base = len(orjson.dumps(ev))
    fill = max(0, size - base)
    # half pseudo-random hex (does not compress), half repeated text (does): ≈ real payloads
    rnd = (h * (fill // 64 + 1))[: fill // 2]
    ev["pad"] = rnd + ("abcdefghij" * (fill // 10 + 1))[: fill - len(rnd)]
    out = orjson.dumps(ev)
    assert len(out) == max(size, base), (len(out), size)
    return out


def ndjson_body(n: int, size: int) -> bytes:
    return b"".join(event_body(i, size) + b"\n" for i in range(n))


# Request headers of a browser page view (the v1 comparison sends them with every event; both
# servers store the User-Agent and the Cookie in each record)
BROWSER_UA = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
              "Chrome/131.0.0.0 Safari/537.36")
BROWSER_COOKIE = "_ga=GA1.1.1795000007.1795000000; sid=5b0e3c1a9f2d4e67; consent=analytics"

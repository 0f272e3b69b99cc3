"""Accepted lines take the memory their length says, so BUFFER_MAX_BYTES bounds real memory.

orjson >= 3.12 returns bytes whose allocation is rounded up (at least 4 KiB, and about 8x the
length of a long string it escaped) and never shrunk. A line kept that way from /collect until its
batch is compressed made 16 KB events cost ~130 KB each: 471 MB RSS under overload while
`ingest_buffer_bytes` stayed under 96 MiB (docs/tuning.md). Measured with tracemalloc, which
sees the real allocation where `sys.getsizeof` sees only the length.
"""

from __future__ import annotations

import tracemalloc

import orjson
import pytest
from multidict import CIMultiDict

from estat_ingest.config import Settings
from estat_ingest.http.collect import Collector
from estat_ingest.metrics import Metrics
from estat_ingest.pipeline.queue import EventQueue


@pytest.mark.parametrize(("pad", "ndjson"), [(16_000, False), (300, False), (300, True), (4_000, True)])
def test_queued_lines_are_allocated_at_their_length(pad: int, ndjson: bool) -> None:
    s = Settings.from_env({}, max_body_bytes=1024 * 1024, channel_size=100_000, buffer_max_bytes=1024**3)
    q: EventQueue[tuple[float, bytes]] = EventQueue(s.channel_size)
    c = Collector(s, q, Metrics())
    c.accepting = True
    ctype = "application/x-ndjson" if ndjson else "application/json"
    headers = CIMultiDict({"User-Agent": "probe/1.0", "Content-Type": ctype})
    per_request = 20 if ndjson else 1
    bodies = [b"\n".join(orjson.dumps({"i": i, "j": j, "pad": "p" * pad}) for j in range(per_request))
              for i in range(200)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for body in bodies:
            assert c.handle("POST", "/collect", "", headers, body, "198.51.100.7").status == 200
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    lines = [line for _, line in q.snapshot()]
    assert len(lines) == 200 * per_request
    payload = sum(map(len, lines))
    # each line is one bytes object (~33 bytes of header) in a tuple (~56 bytes) in the deque
    overhead = len(lines) * 160
    assert held <= payload * 1.1 + overhead, (held, payload)

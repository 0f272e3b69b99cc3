"""Push N events through Collector.handle and the whole in-process pipeline (queue, dispatcher,
batcher, compression, delivery) into the memory sink: the per-event cost of everything behind the
HTTP front, for A/B comparisons between commits. Deterministic with callgrind:

    PYTHONHASHSEED=0 valgrind --tool=callgrind python bench/path_cost.py single 5000
    PYTHONHASHSEED=0 valgrind --tool=callgrind python bench/path_cost.py single 25000

(instructions of the second minus the first, divided by 20,000 = instructions per event).
"""
import asyncio
import sys
import tempfile

import orjson
import uvloop
from multidict import CIMultiDict

from estat_ingest.config import Settings
from estat_ingest.http.collect import Collector
from estat_ingest.metrics import Metrics
from estat_ingest.pipeline.engine import Pipeline
from estat_ingest.sinks.memory import MemorySink


async def main(kind: str, n: int) -> None:
    d = tempfile.mkdtemp()
    s = Settings.from_env({}, dlq_dir=d + "/dlq", instance_id="t", batch_max_events=5000, channel_size=20000)
    sink = MemorySink()
    p = Pipeline(s, Metrics(), [sink])
    await p.start()
    c = Collector(s, p.queue, p.metrics)
    c.accepting = True
    ev = orjson.dumps({"event": "click", "page": "/home", "pad": "x" * 250})
    ua = "Mozilla/5.0 bench"
    if kind == "ndjson":
        body, per = b"\n".join([ev] * 100) + b"\n", 100
        hdrs = CIMultiDict({"Content-Type": "application/x-ndjson", "User-Agent": ua})
    else:
        body, per = ev, 1
        hdrs = CIMultiDict({"Content-Type": "application/json", "User-Agent": ua})
    sent = 0
    while sent < n:
        r = c.handle("POST", "/collect", "", hdrs, body, "127.0.0.1")
        if r.status == 200:
            sent += per
        else:
            await asyncio.sleep(0)
        if sent % 2000 < per:
            await asyncio.sleep(0)
    await p.flush_and_wait()
    await p.drain(5)
    assert sum(x.num_events for x in sink.delivered) == sent, (sent,)

if __name__ == "__main__":
    uvloop.run(main(sys.argv[1], int(sys.argv[2])))

"""Which estat_ingest modules one accepted event passes through, in order (consecutive repeats
collapsed), from Collector.handle to the sink's send, traced with sys.setprofile in-process (the
HTTP front is left out). `python bench/hops.py` from the repository root, in the venv.
"""
import asyncio
import sys
import tempfile
import threading

from multidict import CIMultiDict

from estat_ingest.config import Settings
from estat_ingest.http.collect import Collector
from estat_ingest.metrics import Metrics
from estat_ingest.pipeline.engine import Pipeline
from estat_ingest.sinks.memory import MemorySink

seq = []
def prof(frame, event, arg):
    if event == "call":
        mod = frame.f_globals.get("__name__", "")
        ours = mod.startswith("estat_ingest") and not mod.startswith("estat_ingest.metrics")
        if ours and (not seq or seq[-1] != mod):
            seq.append(mod)

async def main(ndjson: bool) -> None:
    d = tempfile.mkdtemp()
    s = Settings.from_env({}, dlq_dir=d + "/dlq", instance_id="t", batch_max_events=1 if not ndjson else 3)
    sink = MemorySink()
    p = Pipeline(s, Metrics(), [sink])
    await p.start()
    c = Collector(s, p.queue, p.metrics)
    c.accepting = True
    body = b'{"a":1}\n{"a":2}\n{"a":3}\n' if ndjson else b'{"a":1}'
    hdrs = CIMultiDict({"Content-Type": "application/x-ndjson" if ndjson else "application/json"})
    await asyncio.sleep(0.1)
    sys.setprofile(prof)
    threading.setprofile(prof)
    r = c.handle("POST", "/collect", "", hdrs, body, "127.0.0.1")
    await p.flush_and_wait()
    sys.setprofile(None)
    threading.setprofile(None)
    assert r.status == 200 and len(sink.delivered) == 1
    await p.drain(2)

if __name__ == "__main__":
    for nd in (False, True):
        seq.clear()
        asyncio.run(main(nd))
        short = [m.removeprefix("estat_ingest.") for m in seq]
        print(("ndjson" if nd else "json  "), len(short) - 1, "module transitions:", " → ".join(short))

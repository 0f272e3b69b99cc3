"""In-process micro benchmarks (run by bench/run.py, pinned to the server's core):

- `encoder`: the engine's batch encoding (join the accepted JSONL lines + `encoder.compress`) against
  raw `zlib.compress(level 1)` and raw zstandard on the same bytes, alternating A B A B.
- `dlq`: one pass of the DLQ partial scan (`estat_ingest.dlq.scan.scan_pass`) over directories of
  1k, 10k and 100k files (+ their .meta.json), against a full `os.scandir` listing.
- `collect`: the plain /collect function (`Collector.handle`) per request, without HTTP: the part
  of a request's CPU that is ours.

Prints one JSON line per run: BENCHJSON {...}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent))  # after PYTHONPATH: a snapshot may be under test
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bodies import event_body


def summary(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def alternate(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, list[float]]:
    """Time each function `reps` times, interleaved A B A B …, return seconds per call.

    The order rotates every repetition (A B C D, B C D A, …) so that cache and allocator state left
    by one function does not always fall on the same next one.
    """
    out: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm
    items = list(fns.items())
    for rep in range(reps):
        k = rep % len(items)
        for name, fn in items[k:] + items[:k]:
            t0 = time.perf_counter()
            fn()
            out[name].append(time.perf_counter() - t0)
    return out


def bench_encoder(reps: int) -> dict[str, object]:
    import zstandard

    from estat_ingest.formats.codec import compress, encode_lines
    from estat_ingest.pipeline.record import IdGen, encode_record

    ids = IdGen()
    now = time.time()
    lines = [encode_record(now, "203.0.113.7", "Mozilla/5.0 (X11; Linux x86_64) bench", "sid=abc",
                           event_body(i, 300).decode(), ids.next(now)) for i in range(5000)]
    joined = b"".join(lines)
    mb = len(joined) / 1e6
    zc = zstandard.ZstdCompressor(level=3)
    times = alternate({
        # what the engine runs: encode_lines over the batch's lines (kept, so every rep sees them)
        "encoder_gzip1": lambda: encode_lines(lines, len(joined), "gzip", 1),
        "raw_zlib1": lambda: zlib.compress(joined, 1),
        "encoder_zstd3": lambda: encode_lines(lines, len(joined), "zstd", 3),
        "raw_zstd3": lambda: zc.compress(joined),
    }, reps)
    mbps = {k: summary([mb / t for t in v]) for k, v in times.items()}
    ratio_gz = [r / z for r, z in zip(
        [mb / t for t in times["encoder_gzip1"]], [mb / t for t in times["raw_zlib1"]], strict=True)]
    ratio_zs = [r / z for r, z in zip(
        [mb / t for t in times["encoder_zstd3"]], [mb / t for t in times["raw_zstd3"]], strict=True)]
    return {"batch_events": len(lines), "batch_mb": mb, "mb_per_s": mbps,
            "ratio_gzip": summary(ratio_gz), "ratio_zstd": summary(ratio_zs),
            "gzip_ratio": len(joined) / len(compress(joined, "gzip", 1))}


def make_dlq_dir(root: str, n: int) -> str:
    d = os.path.join(root, f"n{n}", "s3")
    os.makedirs(d)
    base = 1_700_000_000
    for i in range(n):
        name = f"{base + i * 7 % 100_000:010d}_bench-w0-abcdef_{i % 999_999 + 1:06d}.jsonl.gz"
        for nm in (name, name + ".meta.json"):
            fd = os.open(os.path.join(d, nm), os.O_CREAT | os.O_WRONLY, 0o644)
            os.write(fd, b"x")
            os.close(fd)
    return d


def bench_dlq(sizes: list[int], passes: int, limit: int) -> dict[str, object]:
    source = "estat_ingest.dlq.scan.scan_pass"
    try:
        from estat_ingest.dlq.scan import Scanner, scan_pass
    except ImportError:  # pragma: no cover - older tree
        Scanner = scan_pass = None  # type: ignore[assignment,misc]
        source = f"os.scandir limited to {limit} entries"
    root = tempfile.mkdtemp(prefix="estat-bench-dlq-", dir=os.environ.get("BENCH_TMP"))
    out: dict[str, object] = {"source": source, "limit": limit, "sizes": {}}
    try:
        for n in sizes:
            t0 = time.perf_counter()
            d = make_dlq_dir(root, n)
            created = time.perf_counter() - t0
            now = time.time()
            warm: list[float] = []
            cold: list[float] = []
            full: list[float] = []
            if Scanner is not None:
                sc = Scanner(d)
                for _ in range(passes):  # steady state: the index already knows every file
                    t = time.perf_counter()
                    res = scan_pass(sc, limit, lambda _d, _n: True, now, 300.0)
                    warm.append(time.perf_counter() - t)
                    assert res.entries == min(limit, 2 * n), res.entries
                sc.close()
                sc = Scanner(d)
                for _ in range(max(3, passes // 4)):  # first sight: one stat per new data file
                    t = time.perf_counter()
                    scan_pass(sc, limit, lambda _d, _n: False, now, 300.0)
                    cold.append(time.perf_counter() - t)
                sc.close()
            else:
                for _ in range(passes):
                    t = time.perf_counter()
                    with os.scandir(d) as it:
                        for k, e in enumerate(it):
                            e.is_file()
                            if k + 1 >= limit:
                                break
                    warm.append(time.perf_counter() - t)
            for _ in range(3):
                t = time.perf_counter()
                with os.scandir(d) as it:
                    for e in it:
                        e.is_file()
                full.append(time.perf_counter() - t)
            out["sizes"][str(n)] = {  # type: ignore[index]
                "files": n, "entries": 2 * n, "create_s": created,
                "pass_ms": summary([x * 1000 for x in warm]),
                "cold_pass_ms": summary([x * 1000 for x in cold]) if cold else None,
                "full_listing_ms": summary([x * 1000 for x in full]),
            }
            shutil.rmtree(os.path.dirname(d))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return out


def bench_collect(n: int) -> dict[str, object]:
    from multidict import CIMultiDict, CIMultiDictProxy

    from estat_ingest.config import Settings
    from estat_ingest.http.collect import Collector
    from estat_ingest.metrics import Metrics
    from estat_ingest.pipeline.queue import EventQueue

    settings = Settings()
    q: EventQueue[tuple[float, bytes]] = EventQueue(10**9)
    c = Collector(settings, q, Metrics())
    c.accepting = True
    c.ready = True
    hdrs = CIMultiDictProxy(CIMultiDict({"Host": "127.0.0.1:8080", "Content-Type": "application/json",
                                         "User-Agent": "estat-bench/1", "Content-Length": "300"}))
    body = event_body(1, 300)
    handle = c.handle
    res: list[float] = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            r = handle("POST", "/collect", "", hdrs, body, "127.0.0.1")
        res.append((time.perf_counter() - t0) / n * 1e6)
        q._items.clear()
    assert getattr(r, "status", None) == 200, r
    return {"us_per_request": summary(res)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["encoder", "dlq", "collect"])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--sizes", default="1000,10000,100000")
    p.add_argument("--limit", type=int, default=1000)
    args = p.parse_args()
    if args.what == "encoder":
        result = bench_encoder(args.reps)
    elif args.what == "dlq":
        result = bench_dlq([int(s) for s in args.sizes.split(",")], args.reps, args.limit)
    else:
        result = bench_collect(20_000 if args.reps >= 10 else 5_000)
    sys.stdout.write("BENCHJSON " + json.dumps(result) + "\n")


if __name__ == "__main__":
    main()

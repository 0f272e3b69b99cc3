"""Pass cost of the DLQ scan at several backlog sizes: `python -m estat_ingest.dlq.bench 1000 10000 100000`.

Prints, per size: `scan_pass` time (one chunk of `--limit` entries, all files known), the whole pass
bookkeeping of the store (rescan + TTL/capacity + `--limit` index pops and pushes), and the start-up
index build. Medians of `--passes` passes; the files are tiny (the cost is per entry, not per byte).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import time

from estat_ingest.dlq.scan import Scanner, scan_pass
from estat_ingest.dlq.store import DlqStore, Limits
from estat_ingest.metrics import Metrics


def make_dir(directory: str, n: int) -> None:
    os.makedirs(directory, exist_ok=True)
    base = int(time.time()) - n
    for i in range(n):  # names in an order unrelated to creation order
        name = f"{base + (i * 7919) % n:010d}_bench-{i:06d}_{i % 999_999 + 1:06d}.jsonl.gz"
        with open(os.path.join(directory, name), "wb") as f:
            f.write(b"x")
        with open(os.path.join(directory, name + ".meta.json"), "wb") as f:
            f.write(b'{"num_events":1}')


async def store_passes(root: str, limit: int, passes: int) -> tuple[float, list[float]]:
    store = DlqStore(root, "bench", Metrics(), limits=Limits(max_age_s=0, scan_limit=limit))
    t0 = time.perf_counter()
    await store.start()
    build = time.perf_counter() - t0
    out = []
    for _ in range(passes):
        t0 = time.perf_counter()
        await store.rescan()
        await store.enforce()
        taken = [store.index.pop() for _ in range(limit)]
        for e in taken:
            if e is not None:
                store.index.push_back(e)
        out.append(time.perf_counter() - t0)
    return build, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("sizes", nargs="*", type=int, default=[1000, 10_000, 100_000])
    ap.add_argument("--limit", type=int, default=1000, help="DLQ_SCAN_LIMIT")
    ap.add_argument("--passes", type=int, default=20)
    ap.add_argument("--dir", default=None, help="parent of the temporary directories (default: system temp)")
    args = ap.parse_args(argv)
    for n in args.sizes:
        root = tempfile.mkdtemp(prefix="dlq-bench-", dir=args.dir)
        try:
            make_dir(os.path.join(root, "bench"), n)
            scanner = Scanner(os.path.join(root, "bench"))
            scans = []
            for _ in range(args.passes):
                t0 = time.perf_counter()
                scan_pass(scanner, args.limit, lambda d, name: True, time.time(), 300.0)
                scans.append(time.perf_counter() - t0)
            scanner.close()
            build, passes = asyncio.run(store_passes(root, args.limit, args.passes))
            print(f"dlq files={n:>7}  scan_pass({args.limit} entries) median {statistics.median(scans) * 1e3:6.2f} ms"
                  f"  pass median {statistics.median(passes) * 1e3:6.2f} ms (max {max(passes) * 1e3:.2f})"
                  f"  index build at start {build * 1e3:7.0f} ms", flush=True)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

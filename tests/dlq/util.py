"""Helpers for DLQ tests: write DLQ entries the way the server (or v1) did, read them back."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson

from estat_ingest.config import Settings
from estat_ingest.formats.codec import checksum, compress
from estat_ingest.formats.keys import partition

TZ = "Asia/Seoul"


def lines_for(tag: str, n: int, ts: int) -> bytes:
    return b"".join(orjson.dumps({"ts": ts, "body": f'{{"i":{i}}}', "id": f"{tag}-{i:06d}"}) + b"\n"
                    for i in range(n))


def name_for(unix: int, counter: int, instance: str = "t-abc123", ext: str = ".jsonl.gz") -> str:
    return f"{unix:010d}_{instance}_{counter:06d}{ext}"


def write_entry(directory: Path, unix: int, counter: int, n: int, *, v1: bool = False, meta: bool = True,
                compression: str = "gzip", instance: str = "t-abc123", data: bytes | None = None,
                extra_meta: dict[str, Any] | None = None) -> tuple[str, list[str]]:
    """One DLQ pair as the server writes it (or v1: meta = {"num_events": N}). Returns (name, ids)."""
    directory.mkdir(parents=True, exist_ok=True)
    ext = ".jsonl.zst" if compression == "zstd" else ".jsonl.gz"
    name = name_for(unix, counter, instance, ext)
    tag = name.split(".")[0]
    raw = lines_for(tag, n, unix)
    if data is None:
        data = gzip.compress(raw, 1) if v1 else compress(raw, compression, 1)
    (directory / name).write_bytes(data)
    if meta:
        m: dict[str, Any] = {"num_events": n}
        if not v1:
            part = partition(unix, TZ)
            m.update({"sink": directory.name, "key": f"{part}/{name}", "partition": part, "first_ts": unix,
                      "created_at": unix, "compression": compression, "checksum": checksum(data),
                      "attempts": 3, "reason": "failed"})
        m.update(extra_meta or {})
        (directory / (name + ".meta.json")).write_bytes(orjson.dumps(m))
    return name, [f"{tag}-{i:06d}" for i in range(n)]


def write_entries(directory: Path, counters: range, n: int, base: int = 1_700_000_000, **kw: Any) -> list[str]:
    """`write_entry` for each counter c (file time base + c, n events each); the ids of all, in order."""
    ids: list[str] = []
    for c in counters:
        ids += write_entry(directory, base + c, c, n, **kw)[1]
    return ids


def data_files(directory: Path) -> list[str]:
    if not directory.exists():
        return []
    return sorted(p.name for p in directory.iterdir()
                  if p.is_file() and not p.name.startswith(".") and not p.name.endswith(".meta.json"))


def settings(tmp: Path, **kw: Any) -> Settings:
    base: dict[str, Any] = {"dlq_dir": str(tmp / "dlq"), "instance_id": "test", "partition_tz": TZ,
                            "dlq_min_free_bytes": 0, "sinks": ("file",), "file_sink_dir": str(tmp / "out")}
    base.update(kw)
    return Settings(**base)


def counter_value(metrics: Any, name: str, **labels: str) -> float:
    v = metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if v is None else float(v)


async def wait_for(pred: Any, timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


def ids_in(payload_datas: Iterable[tuple[str, bytes]]) -> list[str]:
    from tests.helpers import decode_object

    return [r["id"] for name, data in payload_datas for r in decode_object(name, data)]



def run_async(fn: Any) -> Any:
    """Run an `async def test_…` with asyncio.run (no async pytest plugin in this project)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return asyncio.run(fn(*args, **kwargs))

    return wrapper

"""`serve --workers N`: one /metrics for the whole process group.

Each worker keeps its own prometheus-client registry (the hot path stays as cheap as in one
process: `LoopCounter.inc` ≈ 0.05-0.08 µs, folded at scrape). A scrape of the group goes through the
parent, which holds the only state that outlives a worker:

    Prometheus ─GET /metrics─▶ any worker (SO_REUSEPORT) ─unix socket─▶ parent (`Aggregator`)
        parent ─unix socket, all at once, GATHER_TIMEOUT_S─▶ every worker's `SnapshotServer`
        parent: merge (`merge`) + render ─▶ the worker ─▶ the HTTP answer
    (with METRICS_ADDR the parent's own listener calls the same `Aggregator`)

The sockets live in a run directory the parent creates (mode 0700) and removes: `w<i>.sock` per
worker, `parent.sock`. Every exchange is one connection: connect, read until EOF.

What is always true of a merged scrape:
- Counters and histograms are the sum over the workers, and never go back while the parent lives:
  a worker that does not answer within GATHER_TIMEOUT_S counts with the last values it gave (it is
  missing from `estat_ingest_workers_scraped`); a worker that died or was restarted leaves its last
  values in a retired total, so a restart is not a counter reset for Prometheus. (Increments of a
  worker that crashed after its last scrape are lost with it.)
- Gauges follow `GAUGE_RULES`: summed unless their meaning needs another rule; `ingest_ready` is 1
  only when every worker is ready; `process_*` keep one series per process (label `worker`, the
  parent as `worker="supervisor"`), since a sum of start times or descriptor limits means nothing.
- `estat_ingest_workers` is N, `estat_ingest_workers_scraped` the workers that answered this scrape.
- A worker's snapshot is taken on its event loop (LoopCounters fold there, as they must); nothing
  here blocks a loop: every wait is a socket read with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field

import orjson
from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample

from estat_ingest.metrics import READY_HELP, SCRAPED_HELP, WORKERS_HELP, Metrics

log = logging.getLogger("estat_ingest.workers")

GATHER_TIMEOUT_S = 2.0  # a busy worker answers in milliseconds; a stuck one must not fail the scrape
PARENT_TIMEOUT_S = GATHER_TIMEOUT_S + 3.0  # a worker waiting for the parent's merged answer
SUPERVISOR = "supervisor"  # the `worker` label of the parent's own process_* series

# gauges whose sum would not mean what the gauge says (every other gauge is summed)
GAUGE_RULES: dict[str, str] = {
    "ingest_ready": "all",  # 1 only when every one of the N workers answered with 1
    "dlq_oldest_file_age_seconds": "max",  # the oldest file of the group
    "dlq_unavailable": "max",  # 1 while any worker's DLQ refuses batches
    "estat_ingest_build_info": "max",  # 1 per version running
    "python_info": "max",
}
READY, WORKERS, SCRAPED = "ingest_ready", "estat_ingest_workers", "estat_ingest_workers_scraped"
PER_PROCESS_PREFIX = "process_"
SUMMED_TYPES = frozenset({"counter", "histogram", "summary", "gaugehistogram"})

Key = tuple[str, tuple[tuple[str, str], ...]]  # (sample name, sorted labels)


@dataclass(slots=True)
class Family:
    name: str
    type: str
    help: str
    samples: dict[Key, float] = field(default_factory=dict)  # in exposition order


@dataclass(slots=True)
class Snapshot:
    """One process's registry as read on its loop: who (worker index, pid, start) and its families."""

    worker: int
    pid: int
    started: float
    families: list[Family]


# ------------------------------------------------------------------------------------ snapshots


def families_of(registry: CollectorRegistry) -> list[Family]:
    out = []
    for metric in registry.collect():
        fam = Family(metric.name, metric.type, metric.documentation)
        for s in metric.samples:
            fam.samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
        out.append(fam)
    return out


def encode(worker: int, started: float, registry: CollectorRegistry) -> bytes:
    """A snapshot of `registry`, read now (call it on the loop that increments its LoopCounters)."""
    fams = [[f.name, f.type, f.help, [[n, dict(lab), v] for (n, lab), v in f.samples.items()]]
            for f in families_of(registry)]
    # orjson writes NaN and ±Inf as null; no gauge of ours holds them, and null reads back as NaN
    return orjson.dumps({"worker": worker, "pid": os.getpid(), "started": started, "families": fams})


def decode(data: bytes) -> Snapshot:
    doc = orjson.loads(data)
    fams = []
    for name, typ, help_, samples in doc["families"]:
        fam = Family(name, typ, help_)
        for sname, labels, value in samples:
            fam.samples[(sname, tuple(sorted(labels.items())))] = float("nan") if value is None else value
        fams.append(fam)
    return Snapshot(int(doc["worker"]), int(doc["pid"]), float(doc["started"]), fams)


# ------------------------------------------------------------------------------------ the merge


def _labelled(key: Key, worker: str) -> Key:
    name, labels = key
    return name, tuple(sorted((*labels, ("worker", worker))))


def merge(snapshots: Sequence[Snapshot], expected: int, scraped: int, supervisor: Iterable[Family] = (),
          retired: Iterable[Family] = ()) -> list[Family]:
    """The group's families: `snapshots` (one per live worker, fresh or the last known), the
    `retired` totals of workers that are gone, the parent's own `supervisor` families (process_*,
    python_info). Families keep the order in which they first appear."""
    out: dict[str, Family] = {}
    seen_in: dict[str, int] = {}  # gauge name → snapshots that had it ("all" rule)

    def family(f: Family) -> Family:
        got = out.get(f.name)
        if got is None:
            got = out[f.name] = Family(f.name, f.type, f.help)
        return got

    def add(f: Family, worker: str) -> None:
        into = family(f)
        if f.name.startswith(PER_PROCESS_PREFIX):
            for key, v in f.samples.items():
                into.samples[_labelled(key, worker)] = v
            return
        rule = "sum" if f.type in SUMMED_TYPES else GAUGE_RULES.get(f.name, "sum" if f.type == "gauge" else "max")
        samples = into.samples
        for key, v in f.samples.items():
            old = samples.get(key)
            if old is None:
                samples[key] = v
            elif rule == "sum":
                samples[key] = old + v
            elif rule == "max":
                samples[key] = max(old, v)
            else:  # all
                samples[key] = min(old, v)
        if rule == "all":
            seen_in[f.name] = seen_in.get(f.name, 0) + 1

    for snap in snapshots:
        for f in snap.families:
            add(f, str(snap.worker))
    for f in retired:
        add(f, "")  # counters and histograms only (process_* are never retired)
    for f in supervisor:
        add(f, SUPERVISOR)
    for name, n in seen_in.items():
        if n < expected:  # a worker that is down or starting is not ready
            fam = out[name]
            fam.samples = dict.fromkeys(fam.samples, 0.0)
    # there even when no worker answered yet (the parent's process_* alone would look like a group)
    for name, value, help_ in ((READY, 0.0, READY_HELP), (WORKERS, float(expected), WORKERS_HELP),
                               (SCRAPED, float(scraped), SCRAPED_HELP)):
        got = out.get(name)
        if got is None:
            got = out[name] = Family(name, "gauge", help_, {(name, ()): value})
        elif name != READY:
            got.samples = {(name, ()): value}
    return list(out.values())


def retire_into(retired: dict[str, Family], snap: Snapshot) -> None:
    """Keep what a gone worker counted (counters and histograms), so the group's sums never go back."""
    for f in snap.families:
        if f.type not in SUMMED_TYPES or f.name.startswith(PER_PROCESS_PREFIX):
            continue
        into = retired.get(f.name)
        if into is None:
            into = retired[f.name] = Family(f.name, f.type, f.help)
        for key, v in f.samples.items():
            into.samples[key] = into.samples.get(key, 0.0) + v


class _Families:
    """A `collect()` over fixed families, for prometheus-client's renderer."""

    def __init__(self, families: Sequence[Family]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        for f in self.families:
            m = Metric(f.name, f.help, f.type)
            m.samples = [Sample(n, dict(lab), v) for (n, lab), v in f.samples.items()]
            yield m


def render(families: Sequence[Family]) -> bytes:
    """The text format 0.0.4, by the same renderer as one process's /metrics."""
    return generate_latest(_Families(families))


# ------------------------------------------------------------------------------------ sockets


SUN_PATH_MAX = 107  # bytes of a unix socket's path (Linux sun_path, less its NUL)


def make_run_dir() -> str:
    """The parent's directory for the group's sockets (private: mode 0700), under TMPDIR unless
    that is too long a path for a socket in it."""
    base = tempfile.gettempdir()
    if len(os.fsencode(base)) + len("/estat-ingest-12345678/parent.sock") > SUN_PATH_MAX:
        base = "/tmp"
    return tempfile.mkdtemp(prefix="estat-ingest-", dir=base)


def remove_run_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


@dataclass(frozen=True, slots=True)
class GroupLink:
    """Where a process of the group finds the others (picklable: given to each spawned worker)."""

    run_dir: str
    workers: int

    def worker_socket(self, index: int) -> str:
        return os.path.join(self.run_dir, f"w{index}.sock")

    @property
    def parent_socket(self) -> str:
        return os.path.join(self.run_dir, "parent.sock")


async def fetch(path: str, timeout: float) -> bytes:  # noqa: ASYNC109 - a bound, not a cancel scope
    """Everything the server at `path` writes before it closes, within `timeout` seconds."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_unix_connection(path)
        try:
            return await reader.read()
        finally:
            writer.close()


async def _unix_server(path: str, answer: Callable[[], Awaitable[bytes]]) -> asyncio.Server:
    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(await answer())
            await writer.drain()
        except Exception:  # a bug in the answer, or a peer gone: one line, the server goes on
            log.exception("group metrics: answer failed")
        finally:
            writer.close()

    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # left by this slot's previous worker
    return await asyncio.start_unix_server(one, path)


async def _close_server(server: asyncio.Server | None) -> None:
    """Stop listening; wait at most 1 s for the answers under way."""
    if server is not None:
        server.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 1.0)


class SnapshotServer:
    """A worker's side: answers each connection on `w<i>.sock` with a snapshot of its registry."""

    def __init__(self, metrics: Metrics, link: GroupLink, worker: int) -> None:
        self.metrics = metrics
        self.path = link.worker_socket(worker)
        self.worker = worker
        self.started = _process_start()
        self.server: asyncio.Server | None = None

    async def _snapshot(self) -> bytes:
        return encode(self.worker, self.started, self.metrics.registry)

    async def start(self) -> None:
        self.server = await _unix_server(self.path, self._snapshot)

    async def close(self) -> None:
        await _close_server(self.server)


def _process_start() -> float:
    """This process's start (jiffies since boot, /proc): with the pid, who a snapshot comes from."""
    try:
        with open(f"/proc/{os.getpid()}/stat", "rb") as f:
            return float(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return 0.0


_DOWN = (ConnectionRefusedError, FileNotFoundError)  # nobody listens on the socket: not running


class Aggregator:
    """The parent's side: gathers every worker's snapshot and merges them (module docstring)."""

    def __init__(self, link: GroupLink, timeout_s: float = GATHER_TIMEOUT_S,
                 registry: CollectorRegistry | None = None) -> None:
        self.link = link
        self.timeout_s = timeout_s
        self.last: dict[int, Snapshot] = {}  # per slot: the last snapshot of its live worker
        self.retired: dict[str, Family] = {}
        self.registry = registry if registry is not None else _supervisor_registry()
        self._lock = asyncio.Lock()  # one gather at a time: `last` and `retired` change in order
        self.server: asyncio.Server | None = None

    async def _one(self, index: int) -> Snapshot | BaseException:
        try:
            return decode(await fetch(self.link.worker_socket(index), self.timeout_s))
        except (OSError, TimeoutError, ValueError, KeyError, TypeError) as err:
            return err

    async def gather(self) -> tuple[list[Snapshot], int]:
        """(a snapshot per live worker — fresh, or its last one when it did not answer in time —,
        how many answered now)."""
        async with self._lock:
            got = await asyncio.gather(*(self._one(i) for i in range(self.link.workers)))
            scraped = 0
            for index, res in enumerate(got):
                old = self.last.get(index)
                if isinstance(res, Snapshot):
                    scraped += 1
                    if old is not None and (old.pid, old.started) != (res.pid, res.started):
                        retire_into(self.retired, old)  # restarted since the last scrape
                    self.last[index] = res
                elif isinstance(res, _DOWN) and old is not None:
                    retire_into(self.retired, self.last.pop(index))
                # else: alive but slow (timeout) or garbled, or never seen: its last values stand
            return [self.last[i] for i in sorted(self.last)], scraped

    async def families(self) -> list[Family]:
        snaps, scraped = await self.gather()
        return merge(snaps, self.link.workers, scraped, families_of(self.registry), self.retired.values())

    async def render(self) -> bytes:
        return render(await self.families())

    async def ready_workers(self) -> int:
        """Workers whose /ready answers 200, by what they say now (slow ones by their last word)."""
        snaps, _ = await self.gather()
        n = 0
        for snap in snaps:
            for f in snap.families:
                if f.name == "ingest_ready":
                    n += any(v == 1.0 for v in f.samples.values())
        return n

    async def start(self) -> None:
        """Answer each connection on `parent.sock` with the group's rendered text."""
        self.server = await _unix_server(self.link.parent_socket, self.render)

    async def close(self) -> None:
        await _close_server(self.server)


def _supervisor_registry() -> CollectorRegistry:
    r = CollectorRegistry()
    ProcessCollector(registry=r)
    PlatformCollector(registry=r)
    return r

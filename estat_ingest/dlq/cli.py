"""`estat-ingest dlq stats|verify|replay|cat` (operator commands; docs/dlq.md has the runbook).

DIR may be a DLQ_DIR root (every sink's subdirectory, worker roots `w<N>/`, and v1 files at the top,
which belong to the s3 sink) or one sink's subdirectory. The commands work on a live directory:
`replay` claims each file exactly like the server's replayer, so both can run at once.

Exit codes: 0 ok; 1 something is corrupt (verify) or not every file was delivered (replay: also
when the destination refused everything — a missing bucket, refused credentials — which stops the
run at once and moves nothing aside); 2 usage or configuration error (bad DIR, missing RAW_BUCKET …).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson

from estat_ingest.delivery import Delivery, Next
from estat_ingest.dlq import files
from estat_ingest.dlq.scan import Entry
from estat_ingest.dlq.settle import settle
from estat_ingest.dlq.store import DlqStore
from estat_ingest.formats.codec import (
    CorruptPayload,
    Members,
    compression_of,
    decodable_prefix,
    decompress,
    walk_members,
)
from estat_ingest.formats.keys import parse_spool_name, unix_of_name
from estat_ingest.metrics import Metrics
from estat_ingest.sinks.base import Sink

SINK_DIRS = ("s3", "file", "opensearch", "memory")
SPOOL_DIR = "spool"  # ACK_MODE=durable's default SPOOL_DIR under DLQ_DIR: <owner>/<sink>/<spool files>


# ------------------------------------------------------------------------------ discovery


@dataclass(slots=True)
class Group:
    directory: str
    sink: str  # the sink its files belong to (v1 files at a root → s3)
    label: str  # path relative to DIR, "." for DIR itself
    spool: bool = False  # open batches of ACK_MODE=durable (spool files), not DLQ entries


def discover(root: str) -> list[Group]:
    """The directories of DIR that hold DLQ files, with the sink each belongs to."""
    root = os.path.abspath(root)
    base = os.path.basename(root.rstrip("/"))
    if base in SINK_DIRS:
        return [Group(root, base, ".")]
    out = [Group(root, "s3", ".")]  # v1 files lie directly in DLQ_DIR
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if not os.path.isdir(path) or name in files.SUBDIRS:
            continue
        if name == SPOOL_DIR:
            out += spool_groups(path, name)
        elif name in SINK_DIRS:
            out.append(Group(path, name, name))
        elif name.startswith("w") and name[1:].isdigit():  # --workers roots
            out.append(Group(path, "s3", name))
            for sub in sorted(os.listdir(path)):
                if sub in SINK_DIRS and os.path.isdir(os.path.join(path, sub)):
                    out.append(Group(os.path.join(path, sub), sub, f"{name}/{sub}"))
    return out


def spool_groups(spool: str, label: str) -> list[Group]:
    """SPOOL_DIR/<owner>/<sink>/: the open (or crashed) batches of each durable process."""
    out = []
    for owner in sorted(os.listdir(spool)):
        for sink in sorted(os.listdir(os.path.join(spool, owner))) if os.path.isdir(os.path.join(spool, owner)) else []:
            d = os.path.join(spool, owner, sink)
            if os.path.isdir(d):
                out.append(Group(d, sink, f"{label}/{owner}/{sink}", spool=True))
    return out


def spool_files(group: Group) -> list[tuple[str, str, str]]:
    """(path, partition, name) of the spool files of a spool group, oldest first."""
    out = []
    with contextlib.suppress(FileNotFoundError):
        for fname in os.listdir(group.directory):
            parsed = parse_spool_name(fname)
            if parsed is not None:
                out.append((os.path.join(group.directory, fname), *parsed))
    out.sort(key=lambda f: (unix_of_name(f[2]) or 0, f[2]))
    return out


def walk_spool_file(path: str, name: str) -> Members:
    with open(path, "rb") as f:
        return walk_members(f.read(), compression_of(name))


@dataclass(slots=True)
class Found:
    directory: str
    name: str  # the data name
    path: str  # where the bytes are now (the data file or a claim)
    size: int
    claimed: bool = False


def entries(group: Group) -> Iterator[tuple[str, os.DirEntry[str]]]:
    with contextlib.suppress(FileNotFoundError), os.scandir(group.directory) as it:
        for e in it:
            with contextlib.suppress(FileNotFoundError):
                if e.is_file(follow_symlinks=False):
                    yield files.kind_of(e.name), e


def data_of(group: Group, include_claims: bool = True) -> list[Found]:
    out: list[Found] = []
    for kind, e in entries(group):
        with contextlib.suppress(FileNotFoundError):
            if kind == "data":
                out.append(Found(group.directory, e.name, e.path, e.stat(follow_symlinks=False).st_size))
            elif kind == "claim" and include_claims:
                m = files.CLAIM_RE.match(e.name)
                assert m is not None
                out.append(Found(group.directory, m.group("name"), e.path,
                                 e.stat(follow_symlinks=False).st_size, claimed=True))
    out.sort(key=lambda f: (unix_of_name(f.name) or 0, f.name))
    return out


def count_sub(group: Group, sub: str) -> int:
    d = os.path.join(group.directory, sub)
    if not os.path.isdir(d):
        return 0
    return sum(1 for n in os.listdir(d) if files.kind_of(n) == "data")


def _check_dir(path: str) -> int | None:
    if not os.path.isdir(path):
        print(f"estat-ingest dlq: {path}: not a directory", file=sys.stderr)
        return 2
    return None


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}TB"


def _human_age(s: float | None) -> str:
    if s is None:
        return "-"
    s = max(0, int(s))
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600:02d}h"


def _print_json(obj: Any) -> None:
    sys.stdout.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode() + "\n")


# ------------------------------------------------------------------------------ stats


@dataclass(slots=True)
class GroupStats:
    path: str
    sink: str
    files: int = 0
    events: int = 0
    events_unknown_files: int = 0  # data files without a readable meta (count with `verify`)
    bytes: int = 0
    oldest_age_s: float | None = None
    newest_age_s: float | None = None
    claimed: int = 0
    rejected: int = 0
    corrupt: int = 0
    foreign: int = 0
    temp: int = 0
    spool: bool = False  # open batches of a durable process (acknowledged, not yet delivered)
    torn_bytes: int = 0  # spool: bytes after the last complete member (never acknowledged)


def stats_of(group: Group, now: float) -> GroupStats:
    st = GroupStats(group.label, group.sink, spool=group.spool)
    unixes: list[int] = []
    if group.spool:
        for path, _part, name in spool_files(group):
            with contextlib.suppress(FileNotFoundError):
                m = walk_spool_file(path, name)
                st.files += 1
                st.events += m.events
                st.bytes += m.good + m.torn
                st.torn_bytes += m.torn
                unixes.append(unix_of_name(name) or 0)
        if unixes:
            st.oldest_age_s = round(now - min(unixes), 1)
            st.newest_age_s = round(now - max(unixes), 1)
        return st
    for kind, e in entries(group):
        if kind in ("data", "claim"):
            name = e.name if kind == "data" else files.CLAIM_RE.match(e.name).group("name")  # type: ignore[union-attr]
            with contextlib.suppress(FileNotFoundError):
                st.bytes += e.stat(follow_symlinks=False).st_size
            st.files += 1
            st.claimed += kind == "claim"
            n = files.events_of(files.read_meta(group.directory, name))
            if n is None:
                st.events_unknown_files += 1
            else:
                st.events += n
            u = unix_of_name(name)
            if u is not None:
                unixes.append(u)
        elif kind == "foreign":
            st.foreign += 1
        elif kind == "temp":
            st.temp += 1
    if unixes:
        st.oldest_age_s = round(now - min(unixes), 1)
        st.newest_age_s = round(now - max(unixes), 1)
    st.rejected = count_sub(group, files.REJECTED)
    st.corrupt = count_sub(group, files.CORRUPT)
    return st


def cmd_stats(args: argparse.Namespace) -> int:
    if (code := _check_dir(args.path)) is not None:
        return code
    now = time.time()
    groups = [stats_of(g, now) for g in discover(args.path)]
    shown = [g for g in groups if g.path != "." or g.files or g.foreign or g.rejected or g.corrupt]
    total = {k: sum(getattr(g, k) for g in groups) for k in
             ("files", "events", "events_unknown_files", "bytes", "claimed", "rejected", "corrupt", "foreign")}
    ages = [g.oldest_age_s for g in groups if g.oldest_age_s is not None]
    total["oldest_age_s"] = max(ages) if ages else None
    if args.json:
        _print_json({"dir": os.path.abspath(args.path), "groups": [asdict(g) for g in shown], "total": total})
        return 0
    print(f"DLQ {os.path.abspath(args.path)}")
    head = ("path", "sink", "files", "events", "bytes", "oldest", "newest", "claimed", "rejected", "corrupt",
            "foreign")
    rows = [head]
    for g in shown:
        events = f"{g.events}" + (f"+?{g.events_unknown_files}" if g.events_unknown_files else "")
        sink = g.sink + (" (spool)" if g.spool else "")
        rows.append((g.path if g.path != "." else ". (v1)", sink, str(g.files), events, _human_bytes(g.bytes),
                     _human_age(g.oldest_age_s), _human_age(g.newest_age_s), str(g.claimed), str(g.rejected),
                     str(g.corrupt), str(g.foreign)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for r in rows:
        print("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))))
    if any(g.events_unknown_files for g in groups):
        print("+?N: N files without meta (v1 or torn between renames); `dlq verify` counts their events")
    return 0


# ------------------------------------------------------------------------------ verify


def verify_file(f: Found) -> tuple[int | None, str]:
    meta = files.read_meta(f.directory, f.name)
    try:
        data = files.read_file(f.path)
        return files.verify_sync(data, files.compression_from(f.name, meta), meta), ""
    except CorruptPayload as err:
        return None, str(err)
    except OSError as err:
        return None, f"unreadable: {err}"


def cmd_verify(args: argparse.Namespace) -> int:
    if (code := _check_dir(args.path)) is not None:
        return code
    ok, events, corrupt, quarantined, torn = 0, 0, [], [], []
    for g in discover(args.path):
        if g.spool:  # open batches: every complete member is verified; a torn tail was never acknowledged
            for path, _part, name in spool_files(g):
                with contextlib.suppress(FileNotFoundError):
                    m = walk_spool_file(path, name)
                    ok += 1
                    events += m.events
                    if m.torn:
                        torn.append({"path": os.path.relpath(path, args.path), "sink": g.sink, "bytes": m.torn})
            continue
        for f in data_of(g):
            n, err = verify_file(f)
            if n is None:
                corrupt.append({"path": os.path.relpath(f.path, args.path), "sink": g.sink, "error": err})
            else:
                ok += 1
                events += n
        qd = os.path.join(g.directory, files.CORRUPT)
        if os.path.isdir(qd):
            quarantined += [os.path.relpath(os.path.join(qd, n), args.path) for n in sorted(os.listdir(qd))
                            if files.kind_of(n) == "data"]
    if args.json:
        _print_json({"dir": os.path.abspath(args.path), "ok_files": ok, "events": events, "corrupt": corrupt,
                     "quarantined": quarantined, "spool_torn": torn})
    else:
        for c in corrupt:
            print(f"CORRUPT  {c['path']}: {c['error']}")
        for t in torn:
            print(f"spool file with a torn tail (never acknowledged; cut when recovered)  {t['path']}: "
                  f"{t['bytes']} bytes")
        for q in quarantined:
            print(f"quarantined (already moved aside by the server)  {q}")
        print(f"{ok} files ok ({events} events), {len(corrupt)} corrupt")
    return 1 if corrupt else 0


# ------------------------------------------------------------------------------ cat


def cat_files(root: str) -> list[tuple[str, bool]]:
    """(path, is a spool file) of every DLQ data file (also claimed ones) and spool file under DIR,
    oldest first across sinks (by the time in the name, then the name). `rejected/` and `corrupt/`
    are left out: pass one of them as DIR to see it."""
    found: list[tuple[int, str, str, bool]] = []
    for g in discover(root):
        if g.spool:
            found += [(unix_of_name(name) or 0, name, path, True) for path, _part, name in spool_files(g)]
        else:
            found += [(unix_of_name(f.name) or 0, f.name, f.path, False) for f in data_of(g)]
    found.sort(key=lambda f: (f[0], f[1], f[2]))
    return [(path, spool) for _, _, path, spool in found]


def _cat_err(line: str) -> None:
    print(f"estat-ingest dlq cat: {line}", file=sys.stderr)


def _out(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def cat_one(path: str, partial: bool, in_dir: bool = False) -> int:
    """Write one file's records to stdout: 0 ok, 1 corrupt (with --partial: its valid prefix was
    written), 2 unreadable. A file gone since DIR was listed (delivered meanwhile) is skipped."""
    base = os.path.basename(path)
    try:
        data = files.read_file(path)
    except FileNotFoundError:
        if in_dir:
            return 0
        _cat_err(f"{path}: no such file")
        return 2
    except OSError as err:
        _cat_err(str(err))
        return 2
    spooled = parse_spool_name(base)
    if spooled is not None:  # an open batch: its complete members (what was acknowledged)
        walked = walk_members(data, compression_of(spooled[1]))
        if walked.good:
            _out(decompress(data[:walked.good], compression_of(spooled[1])))
        if walked.torn:
            _cat_err(f"{path}: {walked.torn} bytes of torn tail not shown (never acknowledged)")
        return 0
    m = files.CLAIM_RE.match(base)
    name = m.group("name") if m else base
    compression = files.compression_from(name, files.read_meta(os.path.dirname(path) or ".", name))
    try:
        text = decompress(data, compression)
    except CorruptPayload as err:
        if not partial:
            more = "; --partial prints its valid start" + (", the other files are printed" if in_dir else "")
            _cat_err(f"{path}: corrupt: {err}{more}")
            return 1
        prefix = decodable_prefix(data, compression)
        _out(prefix.text)
        cut = f"{prefix.cut_text} decoded bytes after them"
        if prefix.good < len(data):
            cut += f" and {len(data) - prefix.good} of {len(data)} compressed bytes after the damage"
        _cat_err(f"{path}: corrupt ({prefix.why}): printed the first {prefix.lines} complete lines; cut {cut}")
        return 1
    _out(text)
    return 0


def cmd_cat(args: argparse.Namespace) -> int:
    if not os.path.isdir(args.path):
        return cat_one(args.path, args.partial)
    found = cat_files(args.path)
    if not found:
        _cat_err(f"{args.path}: no DLQ or spool files here")
    code = 0
    for path, _spool in found:
        code = max(code, cat_one(path, args.partial, in_dir=True))
    return code


# ------------------------------------------------------------------------------ replay


@dataclass(slots=True)
class ReplayReport:
    files: int = 0
    events: int = 0
    bytes: int = 0
    delivered_files: int = 0
    delivered_events: int = 0
    delivered_bytes: int = 0
    rejected: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    skipped_claimed: int = 0  # claimed by a live replayer (younger than DLQ_CLAIM_TIMEOUT)
    outage: str = ""  # "<sink>: <reason>" when the destination refused everything: the run stopped
    not_attempted: int = 0  # files left alone after the outage
    dry_run: bool = False


class Progress:
    """One status line on stderr: files, events and bytes done of the total (a bar on a terminal)."""

    def __init__(self, total_files: int, total_bytes: int, enabled: bool) -> None:
        self.total_files, self.total_bytes = total_files, total_bytes
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self._last = 0.0

    def update(self, r: ReplayReport, final: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not final and now - self._last < (0.1 if self.tty else 5.0):
            return
        self._last = now
        done = r.delivered_files + len(r.rejected) + len(r.corrupt) + len(r.failed)
        frac = done / self.total_files if self.total_files else 1.0
        bar = "#" * int(frac * 30)
        line = (f"[{bar:<30}] {done}/{self.total_files} files  {r.delivered_events} events  "
                f"{_human_bytes(r.delivered_bytes)}/{_human_bytes(self.total_bytes)}")
        if self.tty:
            sys.stderr.write("\r" + line + ("\n" if final else ""))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


async def _replay(args: argparse.Namespace) -> int:
    from estat_ingest.config import ConfigError, Settings
    from estat_ingest.sinks import REGISTRY, build_sink

    try:
        settings = Settings.from_env()
    except ConfigError as err:
        print(f"estat-ingest dlq replay: configuration error: {err}", file=sys.stderr)
        return 2
    groups = discover(args.path)
    if args.sink is not None and args.sink not in REGISTRY:
        print(f"estat-ingest dlq replay: --sink {args.sink}: expected one of {', '.join(REGISTRY)}", file=sys.stderr)
        return 2
    now = time.time()
    todo: list[tuple[Group, Found]] = []
    report = ReplayReport(dry_run=args.dry_run)
    for g in groups:
        for f in data_of(g):
            if f.claimed:
                stale = files.stale_claim(os.path.basename(f.path), now, 0 if args.steal_claims
                                          else settings.dlq_claim_timeout_s)
                if stale is None:
                    report.skipped_claimed += 1
                    continue
                if not args.dry_run and not files.recover(g.directory, os.path.basename(f.path), f.name):
                    continue
                f = Found(f.directory, f.name, os.path.join(f.directory, f.name), f.size)
            todo.append((g, f))
    todo.sort(key=lambda gf: (unix_of_name(gf[1].name) or 0, gf[1].name))
    report.files = len(todo)
    report.bytes = sum(f.size for _, f in todo)
    needed = {args.sink or g.sink for g, _ in todo}
    if "s3" in needed and not settings.raw_bucket and not args.dry_run:
        print("estat-ingest dlq replay: RAW_BUCKET is not set: the s3 sink needs it (or pass --sink)",
              file=sys.stderr)
        return 2
    if "opensearch" in needed and not settings.opensearch_urls and not args.dry_run:
        print("estat-ingest dlq replay: OPENSEARCH_URL is not set: the opensearch sink needs it (or pass --sink)",
              file=sys.stderr)
        return 2
    deliveries: dict[str, tuple[Delivery, DlqStore]] = {}
    progress = Progress(report.files, report.bytes, enabled=not args.no_progress and not args.dry_run)
    owner = files.owner_id(f"{settings.instance_id}-cli")
    sem = asyncio.Semaphore(args.concurrency)
    metrics = Metrics()  # this process's own counters; nothing scrapes them

    async def one(g: Group, f: Found) -> None:
        async with sem:
            rel = os.path.relpath(f.path, args.path)  # noqa: ASYNC240 - string work, CLI process
            sink_name = args.sink or g.sink
            if report.outage:  # the destination refuses everything: stop, move nothing
                report.not_attempted += 1
                return
            if args.dry_run:
                n, err = await asyncio.to_thread(verify_file, f)
                if n is None:
                    report.corrupt.append(f"{rel}: {err}")
                else:
                    report.events += n
                    meta = files.read_meta(f.directory, f.name)
                    p = files.payload_of(f.name, b"", meta, n, settings.partition_tz)
                    print(f"would send  {rel}  {n} events  → {targets[sink_name].target_of(p)}")
                return
            cpath = await asyncio.to_thread(files.claim, f.directory, f.name, owner)
            if cpath is None:
                report.skipped_claimed += 1
                return
            settled = None
            try:
                meta = files.read_meta(f.directory, f.name)
                data = await asyncio.to_thread(files.read_file, cpath)
                try:
                    n = await files.verify_async(data, files.compression_from(f.name, meta), meta)
                except CorruptPayload as err:
                    report.corrupt.append(f"{rel}: {err}")
                    return
                report.events += n
                payload = files.payload_of(f.name, data, meta, n, settings.partition_tz)
                delivery, store = deliveries[sink_name]
                final = await delivery.run(payload)
                if final.next is Next.OUTAGE and not report.outage:
                    report.outage = f"{sink_name}: {final.reason}"
                entry = Entry(unix_of_name(f.name) or 0, f.name, f.directory, f.size)
                settled = await settle(store, delivery.sink, entry, cpath, final)
                report.delivered_events += final.delivered
                for items, where in () if settled is None else settled.set_aside:
                    shown = os.path.relpath(where, args.path) if where.startswith("/") else where  # noqa: ASYNC240
                    report.rejected.append(f"{rel}: {items.num_events} items → {shown}")
                if settled is None:
                    report.failed.append(f"{rel}: {final.reason}")
                elif settled.kind == "delivered":
                    report.delivered_files += not settled.set_aside
                    report.delivered_bytes += len(data)
                elif settled.kind == "rewritten":
                    report.failed.append(f"{rel}: {final.payload.num_events} of {n} events left ({final.reason})")
                else:
                    report.rejected.append(f"{rel}: {final.reason} → {settled.where}")
            except Exception as err:  # one unreadable file must not stop the others
                report.failed.append(f"{rel}: {type(err).__name__}: {err}")
            finally:
                if settled is None:
                    await asyncio.to_thread(files.release, cpath, f.directory, f.name)
                progress.update(report)

    # a dry run names each file's destination as the sink sees it (built, never started)
    targets = {name: build_sink(name, settings, metrics) for name in sorted(needed)} if args.dry_run else {}
    sinks: list[Sink] = []
    try:
        if not args.dry_run:
            for name in sorted(needed):
                sink = build_sink(name, settings, metrics)
                await sink.start()
                sinks.append(sink)
                store = DlqStore(os.path.abspath(args.path), name, metrics, owner=owner)  # noqa: ASYNC240
                deliveries[name] = (Delivery(sink, metrics), store)
        await asyncio.gather(*(one(g, f) for g, f in todo))
    finally:
        for s in sinks:
            with contextlib.suppress(Exception):
                await s.aclose()
    progress.update(report, final=True)
    ok = not (report.corrupt or report.failed or report.rejected or report.skipped_claimed or report.outage)
    if args.json:
        _print_json({**asdict(report), "ok": ok})
    else:
        verb = "would send" if args.dry_run else "delivered"
        count = report.files - len(report.corrupt) if args.dry_run else report.delivered_files
        print(f"{verb} {count}/{report.files} files ({report.delivered_events if not args.dry_run else report.events}"
              f" events); rejected {len(report.rejected)}, corrupt {len(report.corrupt)}, failed "
              f"{len(report.failed)}, skipped (claimed by a live replayer) {report.skipped_claimed}")
        for line in report.corrupt:
            print(f"CORRUPT   {line}")
        for line in report.rejected:
            print(f"REJECTED  {line}")
        for line in report.failed:
            print(f"FAILED    {line}")
        if report.outage:
            print(f"OUTAGE    {report.outage}: the destination refuses everything (missing bucket, credentials, "
                  f"closed or blocked index); stopped, nothing moved aside, {report.not_attempted} files not "
                  "attempted: fix the destination and run again")
        if report.skipped_claimed:
            print(f"SKIPPED   {report.skipped_claimed} files claimed by another replayer (younger than "
                  "DLQ_CLAIM_TIMEOUT): run again later, or with --steal-claims if that process is dead")
    return 0 if ok else 1


def cmd_replay(args: argparse.Namespace) -> int:
    if (code := _check_dir(args.path)) is not None:
        return code
    if args.concurrency < 1:
        print("estat-ingest dlq replay: --concurrency must be 1 or more", file=sys.stderr)
        return 2
    return asyncio.run(_replay(args))


# ------------------------------------------------------------------------------ parser


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    d = sub.add_parser("dlq", help="inspect, verify and replay DLQ directories",
                       description="DIR: a DLQ_DIR root (sink subdirectories, w<N>/ worker roots, v1 files at "
                                   "the top) or one sink's subdirectory.")
    dsub = d.add_subparsers(dest="dlq_command", required=True)

    s = dsub.add_parser("stats", help="files, events, bytes, ages per sink; corrupt and rejected counts")
    s.add_argument("path", metavar="DIR")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_stats)

    v = dsub.add_parser("verify", help="verify every file in full; exit 1 if any is corrupt")
    v.add_argument("path", metavar="DIR")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_verify)

    r = dsub.add_parser("replay", help="send every file to its sink (environment as for serve); "
                                       "exit 0 only if all were delivered")
    r.add_argument("path", metavar="DIR")
    r.add_argument("--sink", default=None, help="send everything to this sink instead of each file's own")
    r.add_argument("--dry-run", action="store_true", help="verify and list, send nothing, delete nothing")
    r.add_argument("--concurrency", type=int, default=4, help="files in flight (default 4)")
    r.add_argument("--steal-claims", action="store_true",
                   help="take files claimed by another replayer at once (only when that process is dead)")
    r.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_replay)

    c = dsub.add_parser("cat", help="print the JSONL records of a DLQ file, or of every file of a directory "
                                    "(oldest first), decompressed")
    c.add_argument("path", metavar="DIR|FILE")
    c.add_argument("--partial", action="store_true",
                   help="of a corrupt or truncated file, print the complete lines that can be decoded and say on "
                        "stderr how much was cut")
    c.set_defaults(func=cmd_cat)

"""Section 8 of `make bench`: estat-ingest against the Go original (v1), in the same run.

Given V1_BIN (how to build it: ../shared/bench/README.md, outside the project), v1 and
`estat-ingest serve` run alternately under the same pinning, each with an S3 sink writing to one
local moto server, and the section prints for each: requests/s, p99, CPU µs per 2xx request (user
and kernel apart), RSS, and the events the bucket holds against the 2xx responses wrk counted.
Without V1_BIN it says so and runs the estat-only rows.

Rows (medians with [min-max] over rounds; every server process is started fresh for each run):
- single-event POST /collect, 318-byte JSON with a browser User-Agent and a Cookie, 16/64/256
  connections: server pinned to core 0 (v1 with GOMAXPROCS=1), wrk -t1 and moto pinned to core 1;
  v1 and estat alternate (the order flips every round); ratio estat/v1 in requests per
  server CPU-second, per round. `ACK_MODE=durable` joins as a third server once
  `estat-ingest config show` knows ACK_MODE, and is "not available" until then.
- NDJSON, 100 events of 318 B per request, 4 and 64 connections (estat only: v1 has no NDJSON).
- two cores: `serve --workers 2` against v1 with GOMAXPROCS=2; servers, wrk (-t2) and moto all
  unpinned.
- RSS under overload (256 connections) with 318 B and 16 KB events, sampled every 0.25 s.

CPU of a server = utime + stime of its process (all threads; with --workers, the parent and every
worker) from /proc/<pid>/stat over wrk's measured run. No loss: after each run the server gets
SIGTERM; once it exited, every object in the run's own bucket is decompressed and its lines counted.
wrk counts the 2xx it read (warm-up included); requests still in flight when wrk stops may be
accepted without wrk seeing the answer, so the bucket may hold up to that many more, never fewer.
The server's own accepted counter (/metrics, scraped before SIGTERM) must equal the bucket exactly.

    python bench/run.py --only v1 [--quick] [--v1-bin PATH]      # or V1_BIN=PATH make bench
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bodies import BROWSER_COOKIE, BROWSER_UA, event_body, ndjson_body  # noqa: E402
from common import CLK, busy_jiffies, fmt, free_port, get, med, proc_cpu_s, proc_cpu_split, proc_mem_mb  # noqa: E402

PY = sys.executable
SERVER_CORE, GEN_CORE = "0", "1"
REGION = "ap-northeast-2"
BODY_BYTES = 318
NDJSON_EVENTS = 100
SKIPPED = "V1_BIN not set: v1 section skipped (see ../shared/bench/README.md)"

TARGETS = {
    "per_cpu_ratio": 0.85,  # estat / v1, requests per CPU-second, one core, 64 connections
    "p99_ratio": 1.0,  # estat p99 / v1 p99 at 64 connections: below v1's
    "lost_events": 0,  # 2xx events the bucket does not hold
    "ndjson_64_over_4": 0.9,
    "ndjson_events_per_s": 400_000,  # at its best, one core
    "workers_ratio": 1.0,  # --workers 2 / v1 GOMAXPROCS=2, requests/s, two cores
    "rss_mb": 60.0,  # per process, defaults, S3 sink
    "rss_16k_growth": 1.10,  # peak of the second half of the run / the first half: bounded
    # ACK_MODE=durable (issue 12): against memory mode in the same run, and its tail at half of its own maximum
    "durable_over_memory": 0.8,  # req/s at 64 connections; NDJSON events/s
    "durable_half_p99_ms": 10.0,
}

# What the process gets from the caller's environment; everything else is set below and printed.
INHERITED = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV")
# moto's dummy credentials; no credential file, no instance metadata: nothing real is read
AWS_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_CONFIG_FILE": "/dev/null",
           "AWS_SHARED_CREDENTIALS_FILE": "/dev/null", "AWS_EC2_METADATA_DISABLED": "true"}
# v1 requires every variable (durations with a unit, sizes in plain bytes). Values = estat-ingest's
# defaults wherever the two mean the same thing, so neither side is starved or favoured:
# S3_APP_RETRIES counts ATTEMPTS in v1 (0 = never upload), so 3 = our default of 1 + 2 retries.
V1_DEFAULTS = {"RAW_PREFIX": "raw", "DLQ_PREFIX": "raw_dlq", "MAX_BODY_SIZE": "16384", "CHANNEL_SIZE": "4000",
               "UPLOAD_QUEUE": "4", "BATCH_SIZE": "5000", "FLUSH_INTERVAL": "120s", "S3_TIMEOUT": "3s",
               "S3_APP_RETRIES": "3", "DLQ_MAX_AGE": "24h", "DLQ_MAX_SIZE_BYTES": "18000000000"}
# the estat-ingest settings shown with the env (from `config show`), to make the comparison visible
SHOWN = ("HTTP_FRONT", "CHANNEL_SIZE", "BATCH_SIZE", "UPLOAD_QUEUE", "UPLOAD_CONCURRENCY", "FLUSH_INTERVAL",
         "MAX_BODY_SIZE", "S3_TIMEOUT", "S3_APP_RETRIES", "COMPRESSION", "GZIP_LEVEL", "BUFFER_MAX_BYTES")


@dataclass
class Opts:
    work: Path
    v1_bin: str | None
    wrk: str | None
    pin: bool
    rounds: int
    duration: float
    warmup: float
    rss_duration: float
    conns: tuple[int, ...] = (16, 64, 256)
    estat_env: dict[str, str] = field(default_factory=dict)  # --env
    v1_env: dict[str, str] = field(default_factory=dict)  # --v1-env
    say: Callable[[str], None] = print


# ------------------------------------------------------------------------------------ processes


def taskset(cores: str | None, pin: bool) -> list[str]:
    return ["taskset", "-c", cores] if cores is not None and pin else []


def all_cores() -> str:
    return f"0-{(os.cpu_count() or 1) - 1}"


def base_env() -> dict[str, str]:
    env = {k: os.environ[k] for k in INHERITED if k in os.environ}
    env.update(AWS_ENV)
    return env


def descendants(pid: int) -> list[int]:
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{p}/task"):
                for c in Path(f"/proc/{p}/task/{task}/children").read_text().split():
                    out.append(int(c))
                    todo.append(int(c))
    return out


def listeners(port: int) -> int:
    """Sockets in LISTEN state on `port` (SO_REUSEPORT workers each have their own)."""
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                f = line.split()
                if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:
                    n += 1
    return n


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 60.0) -> int:
    """SIGTERM, wait (the drain), SIGKILL if it does not end; the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


class Moto:
    """One moto S3 server for the whole section, pinned with the load generator; a bucket per run."""

    def __init__(self, work: Path, pin: bool) -> None:
        self.port = free_port()
        self.pin = pin
        self.log = work / "moto.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.seq = 0

    def __enter__(self) -> Moto:
        import boto3
        from botocore.config import Config

        self._log = open(self.log, "wb")
        # moto behind waitress: connections kept open, as S3 keeps them (bench/moto_keepalive.py)
        self.proc = subprocess.Popen([*taskset(GEN_CORE, self.pin), PY, str(HERE / "moto_keepalive.py"), "127.0.0.1",
                                      str(self.port)], env=base_env(), stdout=self._log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"moto exited: {self.log.read_text()[-2000:]}")
                with contextlib.suppress(OSError):
                    if get(self.port, "/") == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError("moto not ready after 60 s")
                time.sleep(0.1)
        except BaseException:
            self.__exit__()
            raise
        self.s3 = boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                               aws_access_key_id="bench", aws_secret_access_key="bench",
                               config=Config(retries={"max_attempts": 3, "mode": "standard"}))
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop_process(self.proc, 10)
        self._log.close()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def set_cores(self, cores: str) -> None:
        """Move moto (all of its threads; new ones inherit) to `cores`."""
        if self.pin:
            subprocess.run(["taskset", "-a", "-pc", cores, str(self.pid)], capture_output=True, check=False)

    def bucket(self, what: str) -> str:
        self.seq += 1
        name = re.sub(r"[^a-z0-9-]", "-", f"b{self.seq:04d}-{what}".lower())[:63]
        self.s3.create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": REGION})
        return name

    def count_and_drop(self, bucket: str) -> dict[str, int]:
        """Objects, events (lines of every decompressed object) and compressed bytes; then the bucket
        is emptied and removed (moto keeps objects in memory)."""
        import zstandard

        objects = events = size = 0
        keys: list[str] = []
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for obj in page.get("Contents", []):
                key = obj["Key"]
                keys.append(key)
                data = self.s3.get_object(Bucket=bucket, Key=key)["Body"].read()
                size += len(data)
                if key.endswith(".zst"):
                    data = zstandard.ZstdDecompressor().decompressobj().decompress(data)
                elif key.endswith(".gz") or data[:2] == b"\x1f\x8b":
                    data = gzip.decompress(data)
                objects += 1
                events += data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)
        for i in range(0, len(keys), 1000):
            self.s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]]})
        self.s3.delete_bucket(Bucket=bucket)
        return {"objects": objects, "events": events, "bytes": size}


class Srv:
    """A server under test (v1 or estat-ingest serve), its own directory and bucket; stopped on exit."""

    def __init__(self, kind: str, cmd: list[str], env: dict[str, str], workdir: Path, port: int,
                 cores: str | None, pin: bool, processes: int = 1) -> None:
        self.kind, self.port, self.processes = kind, port, processes
        self.dir = workdir
        self.cmd = [*taskset(cores, pin), *cmd]
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.exit_code: int | None = None
        self.drain_s = float("nan")
        self.log = workdir / "server.log"

    def __enter__(self) -> Srv:
        self._log = open(self.log, "wb")
        self.proc = subprocess.Popen(self.cmd, cwd=self.dir, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.kind} exited ({self.proc.returncode}): {self.log.read_text()[-2000:]}")
                with contextlib.suppress(OSError):
                    if listeners(self.port) >= self.processes and get(self.port, "/health") == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.kind} not ready after 60 s: {self.log.read_text()[-2000:]}")
                time.sleep(0.05)
        except BaseException:
            self.__exit__()
            raise
        self.pids = [self.proc.pid, *descendants(self.proc.pid)]
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self._log.close()

    def cpu(self) -> tuple[float, float]:
        user = kernel = 0.0
        for p in self.pids:
            u, k = proc_cpu_split(p)
            user, kernel = user + u, kernel + k
        return user, kernel

    def mem(self) -> dict[int, tuple[float, float]]:
        return {p: proc_mem_mb(p) for p in self.pids}

    def accepted_events(self) -> int | None:
        """The server's own count of accepted events (estat: ingest_events_accepted_total; v1:
        http_requests_accepted_total, one event per request). None with several workers: a scrape
        reaches one of them."""
        if self.processes > 1:
            return None
        name = "http_requests_accepted_total" if self.kind.startswith("v1") else "ingest_events_accepted_total"

        def scrape() -> int | None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
                    text = r.read().decode()
            except OSError:
                return None
            vals = re.findall(rf"^{name}(?:{{[^}}]*}})?[ =]\s*([0-9.eE+]+)\s*$", text, re.M)
            return round(sum(float(v) for v in vals)) if vals else None

        # handlers of the requests wrk left in flight may still be running: read until it is stable
        last = scrape()
        for _ in range(25):
            time.sleep(0.2)
            now = scrape()
            if now == last:
                break
            last = now
        return last

    def stop(self) -> None:
        if self.proc is None or self.exit_code is not None:
            return
        t0 = time.monotonic()
        self.exit_code = stop_process(self.proc)
        self.drain_s = time.monotonic() - t0


def dlq_events(d: Path) -> int:
    n = 0
    for meta in d.rglob("*.meta.json") if d.exists() else ():
        with contextlib.suppress(OSError, ValueError):
            n += int(json.loads(meta.read_text()).get("num_events", 0))
    return n


# ------------------------------------------------------------------------------------ load


@dataclass
class Load:
    body: Path
    ctype: str = "application/json"
    conns: int = 64
    threads: int = 1
    gen_cores: str | None = GEN_CORE
    events_per_request: int = 1
    rate: float | None = None  # constant offered load (open loop, bench/loadgen.py); None: closed loop


def generator(o: Opts, port: int, ld: Load, duration: float) -> tuple[list[str], dict[str, str]]:
    url = f"http://127.0.0.1:{port}/collect"
    env = {**os.environ, "BENCH_BODY_FILE": str(ld.body), "BENCH_CTYPE": ld.ctype, "BENCH_UA": BROWSER_UA,
           "BENCH_COOKIE": BROWSER_COOKIE}
    pre = taskset(ld.gen_cores, o.pin)
    if o.wrk and ld.rate is None:
        # wrk takes whole seconds only ("0.5s" is a usage error)
        return [*pre, o.wrk, f"-t{ld.threads}", f"-c{ld.conns}", f"-d{max(1, round(duration))}s", "--timeout", "10s",
                "-s", str(HERE / "wrk.lua"), url], env
    return [*pre, PY, str(HERE / "loadgen.py"), "--url", url, "--body-file", str(ld.body), "--content-type",
            ld.ctype, "-H", f"User-Agent: {BROWSER_UA}", "-H", f"Cookie: {BROWSER_COOKIE}",
            "-c", str(ld.conns), "-d", str(duration)] + ([] if ld.rate is None else ["--rate", str(ld.rate)]), env


def parse_gen(out: bytes, err: bytes, code: int) -> dict[str, Any]:
    line = next((ln for ln in out.decode(errors="replace").splitlines() if ln.startswith("BENCHJSON ")), None)
    if line is None:
        raise RuntimeError(f"load generator failed ({code}): {err.decode(errors='replace')[-1000:]}")
    r: dict[str, Any] = json.loads(line[len("BENCHJSON "):])
    if r["tool"] == "wrk":
        dur = r["duration_us"] / 1e6
        r.update(duration_s=dur, ok=r["requests"] - r["non2xx"], p50_ms=r["p50_us"] / 1000,
                 p99_ms=r["p99_us"] / 1000, p999_ms=r["p999_us"] / 1000)
    return r


def measure(o: Opts, moto: Moto, srv: Srv, ld: Load, duration: float) -> dict[str, Any]:
    """Warm-up, then one measured generator run with the server's CPU, RSS and the machine's load."""
    warm_ok = 0
    if o.warmup > 0:
        cmd, env = generator(o, srv.port, ld, o.warmup)
        w = subprocess.run(cmd, env=env, capture_output=True, check=False)
        warm_ok = parse_gen(w.stdout, w.stderr, w.returncode)["ok"]
    cmd, env = generator(o, srv.port, ld, duration)
    (u0, k0), m0, busy0, t0 = srv.cpu(), proc_cpu_s(moto.pid), busy_jiffies(), time.monotonic()
    gen = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    samples: list[tuple[float, float]] = []  # (seconds into the run, largest VmRSS of the server's processes)
    try:
        while True:  # wait4 reaps the generator and gives its CPU time
            pid, status, ru = os.wait4(gen.pid, os.WNOHANG)
            if pid:
                break
            rss = [m[0] for m in srv.mem().values() if m[0] == m[0]]
            if rss:
                samples.append((time.monotonic() - t0, max(rss)))
            time.sleep(0.25)
    finally:
        if gen.returncode is None and gen.poll() is None:
            gen.kill()
            gen.wait()
    wall = time.monotonic() - t0
    (u1, k1), m1, busy1 = srv.cpu(), proc_cpu_s(moto.pid), busy_jiffies()
    out, err = gen.stdout.read(), gen.stderr.read()  # type: ignore[union-attr]
    gen.stdout.close()  # type: ignore[union-attr]
    gen.stderr.close()  # type: ignore[union-attr]
    r = parse_gen(out, err, os.waitstatus_to_exitcode(status))
    user, kernel = u1 - u0, k1 - k0
    cpu = user + kernel
    ok = r["ok"]
    mem = srv.mem()
    half = wall / 2
    first = [s for t, s in samples if t < half]
    second = [s for t, s in samples if t >= half]
    gen_cpu, moto_cpu = ru.ru_utime + ru.ru_stime, m1 - m0
    r.update(
        kind=srv.kind, conns=ld.conns, wall_s=wall, warmup_ok=warm_ok, ok_rps=ok / r["duration_s"],
        events_per_s=ok * ld.events_per_request / r["duration_s"],
        cpu_user_s=user, cpu_kernel_s=kernel,
        ok_per_cpu_s=ok / cpu if cpu > 0 else float("nan"),
        events_per_cpu_s=ok * ld.events_per_request / cpu if cpu > 0 else float("nan"),
        us_user=user / ok * 1e6 if ok else float("nan"), us_kernel=kernel / ok * 1e6 if ok else float("nan"),
        server_cores=cpu / wall, gen_cores=gen_cpu / wall, moto_cores=moto_cpu / wall,
        other_cores=max(0.0, (busy1 - busy0) / CLK - cpu - gen_cpu - moto_cpu) / wall,
        processes=len(srv.pids),
        rss_mb=max((m[0] for m in mem.values() if m[0] == m[0]), default=float("nan")),
        hwm_mb=max((m[1] for m in mem.values() if m[1] == m[1]), default=float("nan")),
        rss_peak_first_half_mb=max(first, default=float("nan")),
        rss_peak_second_half_mb=max(second, default=float("nan")),
    )
    return r


# ------------------------------------------------------------------------------------ servers


@dataclass
class Kind:
    name: str  # v1, estat, estat_durable, v1_2cores, estat_w2
    label: str
    cores: str | None  # taskset for the server; None = unpinned
    processes: int = 1
    env: dict[str, str] = field(default_factory=dict)  # on top of the side's own


def v1_env(o: Opts, port: int, bucket: str, d: Path, endpoint: str, extra: dict[str, str]) -> dict[str, str]:
    return {"HTTP_ADDR": f"127.0.0.1:{port}", "AWS_REGION": REGION, "RAW_BUCKET": bucket, **V1_DEFAULTS,
            "DLQ_DIR": str(d / "dlq"), "S3_ENDPOINT_URL": endpoint, "GOMAXPROCS": "1", **o.v1_env, **extra}


def estat_env(o: Opts, port: int, bucket: str, d: Path, endpoint: str, extra: dict[str, str]) -> dict[str, str]:
    return {"HTTP_ADDR": f"127.0.0.1:{port}", "AWS_REGION": REGION, "RAW_BUCKET": bucket,
            "S3_ENDPOINT_URL": endpoint, "DLQ_DIR": str(d / "dlq"), "INSTANCE_ID": "bench", "LOG_LEVEL": "warning",
            **o.estat_env, **extra}


def one_run(o: Opts, moto: Moto, kind: Kind, ld: Load, duration: float) -> dict[str, Any]:
    """A fresh server with a fresh bucket: load, scrape, SIGTERM, count the bucket."""
    port = free_port()
    d = Path(tempfile.mkdtemp(prefix=f"{kind.name}-", dir=o.work))
    bucket = moto.bucket(kind.name)
    try:
        if kind.name.startswith("v1"):
            assert o.v1_bin
            env = {**base_env(), **v1_env(o, port, bucket, d, moto.endpoint, kind.env)}
            cmd = [o.v1_bin]
        else:
            env = {**base_env(), **estat_env(o, port, bucket, d, moto.endpoint, kind.env)}
            cmd = [PY, "-m", "estat_ingest", "serve"] + (["--workers", str(kind.processes)] if kind.processes > 1 else [])
        with Srv(kind.name, cmd, env, d, port, kind.cores, o.pin, kind.processes) as srv:
            r = measure(o, moto, srv, ld, duration)
            r["accepted_by_server"] = srv.accepted_events()
            srv.stop()
        r.update(exit_code=srv.exit_code, drain_s=srv.drain_s, dlq_events=dlq_events(d / "dlq"))
        stored = moto.count_and_drop(bucket)
        bucket = ""
        answered = (r["ok"] + r["warmup_ok"]) * ld.events_per_request
        r.update(stored_events=stored["events"], objects=stored["objects"], object_bytes=stored["bytes"],
                 ok_events_incl_warmup=answered, lost_events=max(0, answered - stored["events"]),
                 stored_beyond_2xx=stored["events"] - answered)
        return r
    finally:
        if bucket:
            with contextlib.suppress(Exception):
                moto.count_and_drop(bucket)
        shutil.rmtree(d, ignore_errors=True)


def loss_note(r: dict[str, Any]) -> str:
    acc = r.get("accepted_by_server")
    acc_s = "" if acc is None else (" = server's count" if acc == r["stored_events"] else f" ≠ server's count {acc:,}")
    verdict = "ok" if r["lost_events"] == 0 else f"LOST {r['lost_events']:,}"
    dlq = f", +{r['dlq_events']:,} in DLQ" if r.get("dlq_events") else ""
    return f"stored {r['stored_events']:,}/{r['ok_events_incl_warmup']:,} 2xx {verdict}{acc_s}{dlq}"


def run_line(r: dict[str, Any]) -> str:
    return (f"{r['ok_rps']:>9,.0f} req/s {r['ok_per_cpu_s']:>8,.0f}/CPU-s  p99 {r['p99_ms']:6.2f} ms  "
            f"CPU {r['us_user']:.1f}+{r['us_kernel']:.1f} µs  RSS {r['hwm_mb']:.0f} MB  non2xx {r['non2xx']}  "
            f"{loss_note(r)}  exit {r['exit_code']}  (server {r['server_cores'] * 100:.0f}% gen "
            f"{r['gen_cores'] * 100:.0f}% moto {r['moto_cores'] * 100:.0f}% other {r['other_cores'] * 100:.0f}%)")


def stats(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("ok_rps", "ok_per_cpu_s", "events_per_s", "events_per_cpu_s", "p50_ms", "p99_ms", "us_user",
            "us_kernel", "hwm_mb", "rss_mb", "server_cores", "gen_cores", "moto_cores", "other_cores")
    out: dict[str, Any] = {k: med([r[k] for r in runs]) for k in keys}
    out["us_total"] = med([r["us_user"] + r["us_kernel"] for r in runs])
    out["non2xx"] = sum(r["non2xx"] for r in runs)
    out["lost_events"] = sum(r["lost_events"] for r in runs)
    out["stored_events"] = sum(r["stored_events"] for r in runs)
    out["ok_events"] = sum(r["ok_events_incl_warmup"] for r in runs)
    out["accepted_mismatch"] = sum(1 for r in runs if r.get("accepted_by_server") not in (None, r["stored_events"]))
    out["exit_codes"] = sorted({r["exit_code"] for r in runs})
    return out


def ratios(a: list[dict[str, Any]], b: list[dict[str, Any]], key: str) -> dict[str, float]:
    return med([x[key] / y[key] for x, y in zip(a, b, strict=True) if y[key]])


# ------------------------------------------------------------------------------------ ack mode


def estat_config(o: Opts, extra: dict[str, str]) -> tuple[dict[str, Any] | None, str]:
    env = {**base_env(), **estat_env(o, 8080, "bench-bucket", o.work, "http://127.0.0.1:1", extra)}
    p = subprocess.run([PY, "-m", "estat_ingest", "config", "show", "--json"], env=env, capture_output=True,
                       text=True, check=False, timeout=120, cwd=o.work)
    if p.returncode != 0:
        return None, (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]
    try:
        shown: dict[str, dict[str, str]] = json.loads(p.stdout)  # {"BATCH_SIZE": {"value": "5000", "source": …}}
        cfg: dict[str, Any] = {name: item["value"] for name, item in shown.items()}
    except (ValueError, TypeError, KeyError):
        return None, "config show --json printed no {NAME: {value, source}} object"
    return cfg, ""


def durable_mode(o: Opts) -> tuple[bool, str]:
    """ACK_MODE=durable is measured when `estat-ingest config show` knows ACK_MODE: with it set to
    durable, some `ack…` setting reads "durable"."""
    cfg, why = estat_config(o, {"ACK_MODE": "durable"})
    if cfg is None:
        return False, f"config show refused ACK_MODE=durable: {why}"
    if any("ack" in k.lower() and v == "durable" for k, v in cfg.items()):
        return True, ""
    return False, "estat-ingest config show has no ACK_MODE setting"


# ------------------------------------------------------------------------------------ rows


def rows_collect(o: Opts, moto: Moto, body: Path, kinds: list[Kind]) -> dict[str, Any]:
    runs: dict[int, dict[str, list[dict[str, Any]]]] = {c: {k.name: [] for k in kinds} for c in o.conns}
    for rnd in range(o.rounds):
        order = kinds if rnd % 2 == 0 else kinds[::-1]
        for conns in o.conns:
            for kind in order:
                r = one_run(o, moto, kind, Load(body, conns=conns), o.duration)
                runs[conns][kind.name].append(r)
                o.say(f"  round {rnd + 1} c{conns:<3} {kind.name:13} {run_line(r)}")
    out: dict[str, Any] = {}
    for conns, by_kind in runs.items():
        row: dict[str, Any] = {k: stats(v) for k, v in by_kind.items()}
        if "v1" in by_kind:
            for k in by_kind:
                if k != "v1":
                    row[f"{k}_over_v1"] = {m: ratios(by_kind[k], by_kind["v1"], m) for m in ("ok_per_cpu_s", "ok_rps", "p99_ms")}
        if "estat" in by_kind and "estat_durable" in by_kind:  # ACK_MODE=durable against memory mode, same rounds
            row["estat_durable_over_estat"] = {m: ratios(by_kind["estat_durable"], by_kind["estat"], m)
                                               for m in ("ok_rps", "ok_per_cpu_s", "p99_ms")}
        row["runs"] = by_kind
        out[str(conns)] = row
    return out


def print_collect(o: Opts, res: dict[str, Any], labels: dict[str, str]) -> None:
    o.say(f"\n  {'conns':>5} {'server':30} {'req/s':>26} {'req per CPU-s':>16} {'p99 ms':>22} "
          f"{'CPU µs/req user+kernel':>24} {'RSS MB':>7}  stored / 2xx")
    for conns, row in res.items():
        for k, label in labels.items():
            if k not in row:
                continue
            s = row[k]
            loss = "no loss" if s["lost_events"] == 0 else f"LOST {s['lost_events']:,}"
            mism = f", {s['accepted_mismatch']} run(s) ≠ server count" if s["accepted_mismatch"] else ""
            o.say(f"  {conns:>5} {label:30} {fmt(s['ok_rps'], '/s'):>26} {s['ok_per_cpu_s']['median']:>16,.0f} "
                  f"{fmt(s['p99_ms'], '', 2):>22} {s['us_user']['median']:>9.1f} + {s['us_kernel']['median']:.1f} "
                  f"= {s['us_total']['median']:.1f} {s['hwm_mb']['median']:>7.0f}  "
                  f"{s['stored_events']:,} / {s['ok_events']:,} {loss}{mism}")
        for k in labels:
            q = row.get(f"{k}_over_v1")
            if q:
                o.say(f"  {conns:>5} {k}/v1: per CPU-second {fmt(q['ok_per_cpu_s'], '', 2)} · req/s "
                      f"{fmt(q['ok_rps'], '', 2)} · p99 {fmt(q['p99_ms'], '', 2)}x")
        q = row.get("estat_durable_over_estat")
        if q:
            o.say(f"  {conns:>5} durable/memory: req/s {fmt(q['ok_rps'], '', 2)} · per CPU-second "
                  f"{fmt(q['ok_per_cpu_s'], '', 2)} · p99 {fmt(q['p99_ms'], '', 2)}x")


def rows_ndjson(o: Opts, moto: Moto, body: Path, durable: bool = False) -> dict[str, Any]:
    kinds = [Kind("estat_ndjson", "estat-ingest serve, NDJSON", SERVER_CORE, env={"MAX_BODY_SIZE": "64KiB"})]
    if durable:
        kinds.append(Kind("estat_ndjson_durable", "ACK_MODE=durable, NDJSON", SERVER_CORE,
                          env={"MAX_BODY_SIZE": "64KiB", "ACK_MODE": "durable"}))
    levels = (4, 64)
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {k.name: {c: [] for c in levels} for k in kinds}
    for rnd in range(o.rounds):
        for conns in levels if rnd % 2 == 0 else levels[::-1]:
            for kind in kinds if rnd % 2 == 0 else kinds[::-1]:
                r = one_run(o, moto, kind, Load(body, "application/x-ndjson", conns, events_per_request=NDJSON_EVENTS),
                            o.duration)
                runs[kind.name][conns].append(r)
                o.say(f"  round {rnd + 1} c{conns:<3} {kind.name:21} {r['events_per_s']:>10,.0f} events/s "
                      f"{r['events_per_cpu_s']:>10,.0f}/CPU-s  ({r['ok_rps']:,.0f} req/s, non2xx {r['non2xx']}, p99 "
                      f"{r['p99_ms']:.1f} ms)  {loss_note(r)}  (server {r['server_cores'] * 100:.0f}% other "
                      f"{r['other_cores'] * 100:.0f}%)")
    main = runs["estat_ndjson"]
    out: dict[str, Any] = {str(c): stats(v) for c, v in main.items()}
    out["c64_over_c4"] = ratios(main[64], main[4], "events_per_s")
    out["best_events_per_s"] = max(out[str(c)]["events_per_s"]["median"] for c in levels)
    out["env"] = kinds[0].env
    out["runs"] = {str(c): v for c, v in main.items()}
    for c in levels:
        s = out[str(c)]
        o.say(f"  c{c:<3}: {fmt(s['events_per_s'], ' events/s')} · {s['events_per_cpu_s']['median']:,.0f} per CPU-s · "
              f"p99 {fmt(s['p99_ms'], ' ms', 1)} · non2xx {s['non2xx']:,} · stored {s['stored_events']:,} / "
              f"{s['ok_events']:,} 2xx events " + ("no loss" if s["lost_events"] == 0 else f"LOST {s['lost_events']:,}"))
    o.say(f"  64 / 4 connections: {fmt(out['c64_over_c4'], '', 2)} · best median {out['best_events_per_s']:,.0f} events/s")
    if durable:
        d = runs["estat_ndjson_durable"]
        dur: dict[str, Any] = {str(c): stats(v) for c, v in d.items()}
        dur["over_memory"] = {str(c): ratios(d[c], main[c], "events_per_s") for c in levels}
        dur["c64_over_c4"] = ratios(d[64], d[4], "events_per_s")
        dur["env"] = kinds[1].env
        dur["runs"] = {str(c): v for c, v in d.items()}
        out["durable"] = dur
        for c in levels:
            s = dur[str(c)]
            o.say(f"  durable c{c:<3}: {fmt(s['events_per_s'], ' events/s')} · p99 {fmt(s['p99_ms'], ' ms', 1)} · "
                  f"durable / memory {fmt(dur['over_memory'][str(c)], '', 2)} · stored {s['stored_events']:,} / "
                  f"{s['ok_events']:,} 2xx events " + ("no loss" if s["lost_events"] == 0 else f"LOST {s['lost_events']:,}"))
    return out


def rows_half_load(o: Opts, moto: Moto, body: Path, collect: dict[str, Any], kinds: list[Kind]) -> dict[str, Any]:
    """Open loop (bench/loadgen.py --rate) at half of each server's own 64-connection maximum of 8a:
    the tail a client sees when the server is not saturated, queueing included."""
    c64 = collect.get("64", {})
    rates = {k.name: round(c64[k.name]["ok_rps"]["median"] / 2) for k in kinds if k.name in c64}
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in rates}
    for rnd in range(o.rounds):
        for kind in kinds if rnd % 2 == 0 else kinds[::-1]:
            if kind.name not in rates:
                continue
            r = one_run(o, moto, kind, Load(body, conns=64, rate=rates[kind.name]), o.duration)
            runs[kind.name].append(r)
            o.say(f"  round {rnd + 1} {kind.name:13} offered {rates[kind.name]:,}/s achieved {r['ok_rps']:,.0f}/s  "
                  f"p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  p999 {r['p999_ms']:.2f} ms  "
                  f"(server {r['server_cores'] * 100:.0f}% gen {r['gen_cores'] * 100:.0f}% other "
                  f"{r['other_cores'] * 100:.0f}%)  {loss_note(r)}")
    out: dict[str, Any] = {}
    for name, v in runs.items():
        if v:
            out[name] = {"rate": rates[name], **stats(v), "p999_ms": med([r["p999_ms"] for r in v]), "runs": v}
    for name, s in out.items():
        o.say(f"  {name:13} at {s['rate']:,}/s: p99 {fmt(s['p99_ms'], ' ms', 2)} · p50 {fmt(s['p50_ms'], ' ms', 2)} "
              f"· p999 {fmt(s['p999_ms'], ' ms', 2)}")
    return out


def rows_two_cores(o: Opts, moto: Moto, body: Path, have_v1: bool) -> dict[str, Any]:
    kinds = [Kind("estat_w2", "serve --workers 2", None, processes=2)]
    if have_v1:
        kinds.insert(0, Kind("v1_2cores", "v1 GOMAXPROCS=2", None, env={"GOMAXPROCS": "2"}))
    runs: dict[str, list[dict[str, Any]]] = {k.name: [] for k in kinds}
    moto.set_cores(all_cores())
    try:
        for rnd in range(o.rounds):
            for kind in kinds if rnd % 2 == 0 else kinds[::-1]:
                r = one_run(o, moto, kind, Load(body, conns=64, threads=2, gen_cores=None), o.duration)
                runs[kind.name].append(r)
                o.say(f"  round {rnd + 1} {kind.name:10} {run_line(r)}")
    finally:
        moto.set_cores(GEN_CORE)
    out: dict[str, Any] = {k: stats(v) for k, v in runs.items()}
    if have_v1:
        out["estat_w2_over_v1"] = {m: ratios(runs["estat_w2"], runs["v1_2cores"], m) for m in ("ok_rps", "ok_per_cpu_s", "p99_ms")}
    out["runs"] = runs
    for k in kinds:
        s = out[k.name]
        o.say(f"  {k.label:20} {fmt(s['ok_rps'], ' req/s')} · {s['ok_per_cpu_s']['median']:,.0f} per CPU-s · p99 "
              f"{fmt(s['p99_ms'], ' ms', 2)} · CPU {s['us_user']['median']:.1f}+{s['us_kernel']['median']:.1f} µs/req · "
              f"RSS {s['hwm_mb']['median']:.0f} MB per process (largest) · stored {s['stored_events']:,} / {s['ok_events']:,} "
              + ("no loss" if s["lost_events"] == 0 else f"LOST {s['lost_events']:,}"))
    if have_v1:
        q = out["estat_w2_over_v1"]
        o.say(f"  --workers 2 / v1 GOMAXPROCS=2: req/s {fmt(q['ok_rps'], '', 2)} · per CPU-second "
              f"{fmt(q['ok_per_cpu_s'], '', 2)} · p99 {fmt(q['p99_ms'], '', 2)}x")
    return out


def rows_rss(o: Opts, moto: Moto, bodies: dict[str, Path], have_v1: bool) -> dict[str, Any]:
    kinds = [Kind("estat", "estat-ingest serve", SERVER_CORE)]
    if have_v1:
        kinds.insert(0, Kind("v1", "v1 GOMAXPROCS=1", SERVER_CORE))
    out: dict[str, Any] = {}
    for case, body in bodies.items():
        out[case] = {}
        for kind in kinds:
            r = one_run(o, moto, kind, Load(body, conns=256), o.rss_duration)
            out[case][kind.name] = r
            o.say(f"  {case:5} {kind.label:20} peak RSS {r['hwm_mb']:6.1f} MB (end {r['rss_mb']:.1f}; peak in the 1st "
                  f"half {r['rss_peak_first_half_mb']:.1f}, 2nd half {r['rss_peak_second_half_mb']:.1f})  "
                  f"{r['ok_rps']:,.0f} ok/s  non2xx {r['non2xx'] / max(1.0, r['duration_s']):,.0f}/s  {loss_note(r)}")
    return out


# ------------------------------------------------------------------------------------ section


def describe_env(o: Opts, cfg: dict[str, Any] | None) -> dict[str, Any]:
    d = Path("<run dir>")
    v1 = v1_env(o, 0, "<fresh bucket per run>", d, "http://127.0.0.1:<moto>", {})
    v1["HTTP_ADDR"] = "127.0.0.1:<free port>"
    es = estat_env(o, 0, "<fresh bucket per run>", d, "http://127.0.0.1:<moto>", {})
    es["HTTP_ADDR"] = "127.0.0.1:<free port>"
    return {"v1": v1, "estat": es, "both": AWS_ENV, "inherited": [k for k in INHERITED if k in os.environ],
            "estat_effective": {k: cfg.get(k) for k in SHOWN} if cfg else None}


def section(o: Opts) -> dict[str, Any]:
    say = o.say
    have_v1 = bool(o.v1_bin)
    res: dict[str, Any] = {"v1_bin": o.v1_bin, "v1_available": have_v1}
    if o.v1_bin and not (os.path.isfile(o.v1_bin) and os.access(o.v1_bin, os.X_OK)):
        say(f"  V1_BIN={o.v1_bin} is not an executable file: v1 section skipped (see ../shared/bench/README.md)")
        res["skipped"] = f"V1_BIN={o.v1_bin} is not executable"
        o.v1_bin, have_v1 = None, False
        res["v1_available"] = False
    elif not have_v1:
        say(f"  {SKIPPED}")
        res["skipped"] = SKIPPED
    cfg, why = estat_config(o, {})
    if cfg is None:
        raise RuntimeError(f"estat-ingest config show failed with the bench's env: {why}")
    durable, why_not = durable_mode(o)
    env = describe_env(o, cfg)
    warm = max(1, round(o.warmup)) if o.wrk else o.warmup  # wrk takes whole seconds
    res.update(env=env, durable_available=durable, settings={
        "rounds": o.rounds, "duration_s": o.duration, "warmup_s": warm, "rss_duration_s": o.rss_duration,
        "connections": list(o.conns), "body_bytes": BODY_BYTES, "user_agent": BROWSER_UA, "cookie": BROWSER_COOKIE,
        "loadgen": "wrk" if o.wrk else "bench/loadgen.py",
        "pinning": f"servers taskset -c {SERVER_CORE}; wrk -t1 and moto taskset -c {GEN_CORE}" if o.pin else "none"})
    say(f"  env of v1:    {' '.join(f'{k}={v}' for k, v in env['v1'].items())}"
        + ("" if have_v1 else "   (not run)"))
    say(f"  env of estat: {' '.join(f'{k}={v}' for k, v in env['estat'].items())}; everything else at its "
        f"default, effective: {', '.join(f'{k}={v}' for k, v in env['estat_effective'].items())}")
    say(f"  both:         {' '.join(f'{k}={v}' for k, v in AWS_ENV.items())} (moto's dummies); from the caller "
        f"only {', '.join(env['inherited'])}; a fresh server, directory and bucket for every run")
    say(f"  pinning: {res['settings']['pinning']}; two-core rows unpinned · {o.rounds} rounds x {o.duration:g}s "
        f"(+{warm:g}s warm-up) · {BODY_BYTES} B JSON, browser User-Agent and Cookie · "
        f"generator {res['settings']['loadgen']}")

    b318, b16k, bnd = o.work / "v1-e318.json", o.work / "v1-e16k.json", o.work / "v1-nd100.ndjson"
    b318.write_bytes(event_body(7, BODY_BYTES))
    b16k.write_bytes(event_body(7, 16000))
    bnd.write_bytes(ndjson_body(NDJSON_EVENTS, BODY_BYTES))

    kinds = [Kind("estat", "estat-ingest serve", SERVER_CORE)]
    if durable:
        kinds.append(Kind("estat_durable", "estat-ingest ACK_MODE=durable", SERVER_CORE, env={"ACK_MODE": "durable"}))
    if have_v1:
        kinds.insert(0, Kind("v1", "v1 GOMAXPROCS=1", SERVER_CORE))
    labels = {k.name: k.label for k in kinds}
    with Moto(o.work, o.pin) as moto:
        say(f"\n  8a. single-event POST /collect, one core, {', '.join(map(str, o.conns))} connections "
            f"({' / '.join(labels.values())}, alternating, the order flips every round)")
        if not durable:
            say(f"  ACK_MODE=durable: not available ({why_not})")
        res["collect"] = rows_collect(o, moto, b318, kinds)
        print_collect(o, res["collect"], labels)
        res["durable"] = ("measured: collect.<conns>.estat_durable (ACK_MODE=durable)" if durable
                          else f"not available ({why_not})")

        say(f"\n  8b. NDJSON, {NDJSON_EVENTS} events of {BODY_BYTES} B per request, 4 and 64 connections, one core "
            "(estat only: v1 has no NDJSON; MAX_BODY_SIZE=64KiB)")
        res["ndjson"] = rows_ndjson(o, moto, bnd, durable)

        say("\n  8c. two cores: serve --workers 2" + (" vs v1 GOMAXPROCS=2" if have_v1 else "") +
            ", 64 connections; servers, wrk -t2 and moto UNPINNED (they share both cores)")
        res["two_cores"] = rows_two_cores(o, moto, b318, have_v1)

        say(f"\n  8d. RSS under overload with the S3 sink, 256 connections, {o.rss_duration:g}s, defaults")
        res["rss"] = rows_rss(o, moto, {"318B": b318, "16KB": b16k}, have_v1)

        mine = [k for k in kinds if k.name in ("estat", "estat_durable")]
        say("\n  8e. constant load at half of each estat-ingest server's own 64-connection maximum (8a), open loop "
            "(bench/loadgen.py --rate, 64 connections): the latency a client sees below saturation")
        res["half_load"] = rows_half_load(o, moto, b318, res["collect"], mine)
    return res


def summary_rows(v: dict[str, Any], row: Callable[[str, float, float, bool, str], None]) -> None:
    """The issue's targets as rows of run.py's summary table."""
    c64 = v.get("collect", {}).get("64", {})
    q = c64.get("estat_over_v1")
    if q:
        row("estat/v1 per CPU-s, 1 core, c64", q["ok_per_cpu_s"]["median"], TARGETS["per_cpu_ratio"], True,
            f"{fmt(q['ok_per_cpu_s'], '', 2)} (estat {fmt(c64['estat']['ok_per_cpu_s'], '/CPU-s')} vs v1 "
            f"{fmt(c64['v1']['ok_per_cpu_s'], '/CPU-s')})")
        row("estat/v1 p99, c64 (below 1)", q["p99_ms"]["median"], TARGETS["p99_ratio"], False,
            f"{fmt(q['p99_ms'], '', 2)} (estat {fmt(c64['estat']['p99_ms'], ' ms', 2)} vs v1 "
            f"{fmt(c64['v1']['p99_ms'], ' ms', 2)})")
    else:
        row("estat/v1 per CPU-s, 1 core, c64", float("nan"), TARGETS["per_cpu_ratio"], True,
            "v1 not run" if c64 else "not measured")
    dq = c64.get("estat_durable_over_v1")
    if dq:
        d = c64["estat_durable"]
        row("  ACK_MODE=durable / v1 per CPU-s", dq["ok_per_cpu_s"]["median"], TARGETS["per_cpu_ratio"], True,
            f"{fmt(dq['ok_per_cpu_s'], '', 2)} (durable {fmt(d['ok_per_cpu_s'], '/CPU-s')})")
        row("  ACK_MODE=durable / v1 p99, c64", dq["p99_ms"]["median"], TARGETS["p99_ratio"], False,
            f"{fmt(dq['p99_ms'], '', 2)} (durable {fmt(d['p99_ms'], ' ms', 2)})")
    elif "durable" in v:
        row("  ACK_MODE=durable / v1 per CPU-s", float("nan"), TARGETS["per_cpu_ratio"], True,
            "v1 not run" if v.get("durable_available") else v["durable"])
    dm = c64.get("estat_durable_over_estat")
    if dm:
        row("  ACK_MODE=durable / memory req/s, c64", dm["ok_rps"]["median"], TARGETS["durable_over_memory"], True,
            f"{fmt(dm['ok_rps'], '', 2)} (durable {fmt(c64['estat_durable']['ok_rps'], '/s')} vs memory "
            f"{fmt(c64['estat']['ok_rps'], '/s')})")
    nd = v.get("ndjson", {}).get("durable")
    if nd:
        q64 = nd["over_memory"]["64"]
        row("  ACK_MODE=durable / memory NDJSON c64", q64["median"], TARGETS["durable_over_memory"], True,
            f"{fmt(q64, '', 2)} (durable {fmt(nd['64']['events_per_s'], ' events/s')}; c4: "
            f"{fmt(nd['over_memory']['4'], '', 2)})")
    hl = v.get("half_load", {})
    if "estat_durable" in hl:
        h = hl["estat_durable"]
        ref = hl.get("estat")
        row("  ACK_MODE=durable p99 at half load", h["p99_ms"]["median"], TARGETS["durable_half_p99_ms"], False,
            f"{fmt(h['p99_ms'], ' ms', 2)} at {h['rate']:,}/s (half of its own c64 maximum)" +
            (f"; memory mode {fmt(ref['p99_ms'], ' ms', 2)} at {ref['rate']:,}/s" if ref else ""))
    if "collect" in v:
        mine = [s for r in v["collect"].values() for k, s in r.items() if k in ("estat", "estat_durable")]
        lost = sum(s["lost_events"] for s in mine)
        row("estat 2xx events not in the bucket", lost, TARGETS["lost_events"], False,
            f"{lost:,} of {sum(s['ok_events'] for s in mine):,} (single events, every run of 8a)")
    n = v.get("ndjson")
    if n:
        row("NDJSON c64 / c4", n["c64_over_c4"]["median"], TARGETS["ndjson_64_over_4"], True, fmt(n["c64_over_c4"], "", 2))
        row("NDJSON events/s at its best", n["best_events_per_s"], TARGETS["ndjson_events_per_s"], True,
            f"{n['best_events_per_s']:,.0f}/s (c4 {fmt(n['4']['events_per_s'], '/s')}, c64 {fmt(n['64']['events_per_s'], '/s')})")
    w = v.get("two_cores", {})
    if "estat_w2_over_v1" in w:
        q = w["estat_w2_over_v1"]
        row("--workers 2 / v1 GOMAXPROCS=2 req/s", q["ok_rps"]["median"], TARGETS["workers_ratio"], True,
            f"{fmt(q['ok_rps'], '', 2)} ({fmt(w['estat_w2']['ok_rps'], '/s')} vs {fmt(w['v1_2cores']['ok_rps'], '/s')})")
    r = v.get("rss")
    if r:
        e, e16 = r["318B"]["estat"], r["16KB"]["estat"]
        worst = max([e["hwm_mb"]] + [s["hwm_mb"]["median"] for s in (w.get("estat_w2"),) if s])
        v1s = f"; v1 {r['318B']['v1']['hwm_mb']:.0f} MB" if "v1" in r["318B"] else ""
        row("RSS per process, S3 sink, 318 B (MB)", worst, TARGETS["rss_mb"], False,
            f"{e['hwm_mb']:.0f} MB one process under overload" +
            (f", {w['estat_w2']['hwm_mb']['median']:.0f} MB per worker" if w.get("estat_w2") else "") + v1s)
        growth = e16["rss_peak_second_half_mb"] / e16["rss_peak_first_half_mb"]
        row("RSS 16 KB: 2nd-half / 1st-half peak", growth, TARGETS["rss_16k_growth"], False,
            f"{growth:.2f} (peak {e16['hwm_mb']:.0f} MB" +
            (f"; v1 {r['16KB']['v1']['hwm_mb']:.0f} MB" if "v1" in r["16KB"] else "") + ")")

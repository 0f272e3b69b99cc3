"""`make bench`: speed and memory of estat-ingest against baselines measured in the same run.

Every figure is either a ratio to a baseline taken in the same run (A B A B alternation) or a
median with min and max. The server runs pinned to core 0 (`taskset -c 0`, its compression
threads included); the load generator is pinned to core 1. For every load run the table shows
the generator's own CPU (a generator near 100% is the limit, not the server) and the CPU that
OTHER processes used on the machine during the run ("other", in cores), so a noisy run is visible.

Sections: 1 single-event /collect (full pipeline vs bare aiohttp) · 2 NDJSON events/s ·
3 latency at half of the maximum (constant rate) · 4 peak RSS under overload (300 B, 16 KB, sink
down) · 5 encoder vs raw zlib/zstd · 6 DLQ scan pass at 1k/10k/100k files · 7 generator CPU ·
8 v1 comparison (bench/v1.py): the Go original against `serve`, S3 sink to a local moto, given
V1_BIN or --v1-bin (without it the estat-only rows of section 8 run and v1 is skipped).

    python bench/run.py            # ~ 5 minutes, + ~ 13-16 for section 8
    python bench/run.py --quick    # ~ 1.5 minutes, + ~ 2.5-3 for section 8; fewer and shorter runs
    V1_BIN=/tmp/v1-bench/estat-v1 python bench/run.py --only v1
    python bench/run.py --loadgen python   # force the Python generator even when wrk exists
Figures go to bench/results.json as well (override with --out).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import v1  # noqa: E402
from bodies import event_body, ndjson_body  # noqa: E402
from common import CLK, busy_jiffies, fmt, free_port, get, loadavg, med, proc_cpu_s, proc_mem_mb  # noqa: E402

PY = sys.executable
SERVER_CORE, GEN_CORE = "0", "1"

TARGETS = {
    "collect_ratio": 0.75,
    "ndjson_events_per_s": 300_000,
    "half_load_p99_ms": 10.0,
    "rss_300b_mb": 100.0,
    "rss_16k_mb": 200.0,
    "encoder_ratio": 0.80,
    "dlq_100k_over_1k": 2.0,
}


# ------------------------------------------------------------------------------------ helpers


def pinned(core: str) -> list[str]:
    return ["taskset", "-c", core] if PIN else []


# ------------------------------------------------------------------------------------ servers


class Server:
    """One server process pinned to the server core: `full` (estat-ingest serve) or `bare`."""

    def __init__(self, kind: str, workdir: Path, env: dict[str, str] | None = None) -> None:
        self.kind = kind
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=workdir))
        self.env = {**os.environ, **(EXTRA_ENV if kind != "bare" else {}), **(env or {})}
        self.log = self.dir / "server.log"
        if kind in ("full", "aio"):  # `full`: serve as configured (default front: fast); `aio`: HTTP_FRONT=aiohttp
            self.env.update({
                "HTTP_ADDR": f"127.0.0.1:{self.port}",
                "FILE_SINK_DIR": {**EXTRA_ENV, **(env or {})}.get("FILE_SINK_DIR", str(self.dir / "data")),
                "DLQ_DIR": str(self.dir / "dlq"),
                "INSTANCE_ID": "bench", "LOG_LEVEL": "warning", "LOG_FORMAT": "json",
            })
            if kind == "aio":
                self.env["HTTP_FRONT"] = "aiohttp"
            for k in ("SINKS", "RAW_BUCKET"):
                if k not in (env or {}):
                    self.env.pop(k, None)
            self.cmd = [PY, "-m", "estat_ingest", "serve"]
        else:
            self.cmd = [PY, str(HERE / "baseline.py"), "127.0.0.1", str(self.port)]
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Server:
        self._log = open(self.log, "wb")
        self.proc = subprocess.Popen(pinned(SERVER_CORE) + self.cmd, cwd=self.dir, env=self.env,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} server exited: {self.log.read_text()[-2000:]}")
            with contextlib.suppress(OSError):
                if get(self.port, "/health") == 200:
                    return self
            time.sleep(0.05)
        raise RuntimeError(f"{self.kind} server not ready: {self.log.read_text()[-2000:]}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.exit_code: int | None = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.exit_code = self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        else:
            self.exit_code = self.proc.returncode
        self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


# ------------------------------------------------------------------------------------ load


def run_load(srv: Server, body_file: Path, *, ctype: str = "application/json", conns: int = 64,
             duration: float = 10.0, rate: float | None = None, warmup: float | None = None,
             sample_rss: bool = False) -> dict[str, Any]:
    """One measured load run against `srv`; returns throughput, latency and CPU accounting."""
    url = f"http://127.0.0.1:{srv.port}/collect"
    warmup = WARMUP_S if warmup is None else warmup
    use_wrk = WRK is not None and rate is None
    env = {**os.environ, "BENCH_BODY_FILE": str(body_file), "BENCH_CTYPE": ctype}
    if use_wrk:
        cmd = [*pinned(GEN_CORE), WRK, "-t1", f"-c{conns}", f"-d{duration:g}s", "--timeout", "10s", "-s", str(HERE / "wrk.lua"), url]
        warm = [*pinned(GEN_CORE), WRK, "-t1", f"-c{conns}", f"-d{max(1, round(warmup))}s", "-s", str(HERE / "wrk.lua"), url]
    else:
        cmd = [*pinned(GEN_CORE), PY, str(HERE / "loadgen.py"), "--url", url, "--body-file", str(body_file), "--content-type", ctype, "-c", str(conns), "-d", str(duration)]
        if rate is not None:
            cmd += ["--rate", str(rate)]
        warm = [*pinned(GEN_CORE), PY, str(HERE / "loadgen.py"), "--url", url, "--body-file", str(body_file), "--content-type", ctype, "-c", str(conns), "-d", str(warmup)]
    if warmup > 0:
        subprocess.run(warm, env=env, capture_output=True, check=False)
    busy0, scpu0, t0 = busy_jiffies(), proc_cpu_s(srv.pid), time.monotonic()
    gen = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak_rss = 0.0
    while True:  # wait4, not poll(): it reaps the child and gives its CPU time
        pid, status, ru = os.wait4(gen.pid, os.WNOHANG if sample_rss else 0)
        if pid:
            break
        peak_rss = max(peak_rss, proc_mem_mb(srv.pid)[0])
        time.sleep(0.2)
    gen.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - t0
    scpu1, busy1 = proc_cpu_s(srv.pid), busy_jiffies()
    out_b, err_b = gen.stdout.read(), gen.stderr.read()  # type: ignore[union-attr]
    gen.stdout.close()  # type: ignore[union-attr]
    gen.stderr.close()  # type: ignore[union-attr]
    line = next((ln for ln in out_b.decode(errors="replace").splitlines() if ln.startswith("BENCHJSON ")), None)
    if line is None:
        raise RuntimeError(f"load generator failed ({gen.returncode}): {err_b.decode()[-1000:]}")
    r = json.loads(line[len("BENCHJSON "):])
    if r["tool"] == "wrk":
        dur = r["duration_us"] / 1e6
        r.update(duration_s=dur, rps=r["requests"] / dur, ok_rps=(r["requests"] - r["non2xx"]) / dur,
                 p50_ms=r["p50_us"] / 1000, p99_ms=r["p99_us"] / 1000, p999_ms=r["p999_us"] / 1000)
    gen_cpu = ru.ru_utime + ru.ru_stime
    server_cpu = scpu1 - scpu0
    total = (busy1 - busy0) / CLK
    r.update(
        wall_s=wall,
        # requests answered 2xx per CPU-second the server actually got: robust to CPU stolen by
        # other processes on a shared machine (the server is pinned and cannot move away from them)
        ok_per_cpu_s=(r["ok_rps"] * r["duration_s"]) / server_cpu if server_cpu > 0 else float("nan"),
        server_cpu_cores=server_cpu / wall,
        gen_cpu_cores=gen_cpu / wall,
        other_cpu_cores=max(0.0, total - server_cpu - gen_cpu) / wall,
    )
    if sample_rss:
        r["peak_rss_sampled_mb"] = peak_rss
    return r


def cpu_note(r: dict[str, Any]) -> str:
    return (f"server {r['server_cpu_cores'] * 100:.0f}% · gen {r['gen_cpu_cores'] * 100:.0f}% · "
            f"other {r['other_cpu_cores'] * 100:.0f}%")


# ------------------------------------------------------------------------------------ sections


def section_collect(cfg: argparse.Namespace, work: Path, body: Path) -> dict[str, Any]:
    kinds = ("bare", "full", "aio") if cfg.aio else ("bare", "full")
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    for rnd in range(cfg.rounds):
        for kind in kinds:  # A B (C) A B (C) …
            with Server(kind, work) as srv:
                r = run_load(srv, body, duration=cfg.duration)
            runs[kind].append(r)
            say(f"  round {rnd + 1} {kind:4}: {r['ok_rps']:>9,.0f} req/s  {r['ok_per_cpu_s']:>7,.0f} req/CPU-s  "
                f"p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  non2xx {r['non2xx']}  ({cpu_note(r)})")
    out: dict[str, Any] = {
        k: {"rps": med([r["ok_rps"] for r in v]), "per_cpu_s": med([r["ok_per_cpu_s"] for r in v]),
            "p50_ms": med([r["p50_ms"] for r in v]), "p99_ms": med([r["p99_ms"] for r in v]),
            "gen_cpu": med([r["gen_cpu_cores"] for r in v]), "server_cpu": med([r["server_cpu_cores"] for r in v]),
            "other_cpu": med([r["other_cpu_cores"] for r in v])} for k, v in runs.items()}
    for k in kinds[1:]:  # per-round ratios to the bare run of the same round
        out[f"ratio_{k}"] = med([f["ok_rps"] / b["ok_rps"] for b, f in zip(runs["bare"], runs[k], strict=True)])
        out[f"ratio_{k}_per_cpu"] = med([f["ok_per_cpu_s"] / b["ok_per_cpu_s"]
                                         for b, f in zip(runs["bare"], runs[k], strict=True)])
    out["ratio"] = out["ratio_full"]
    out["runs"] = runs
    for k in kinds[1:]:
        say(f"  {k}/bare: throughput {fmt(out[f'ratio_{k}'], '', 2)} · per server CPU-second "
            f"{fmt(out[f'ratio_{k}_per_cpu'], '', 2)}")
    return out


def section_ndjson(cfg: argparse.Namespace, work: Path, body: Path, per_req: int) -> dict[str, Any]:
    runs = []
    for rnd in range(cfg.rounds):
        with Server("full", work, {"MAX_BODY_SIZE": "64KiB"}) as srv:
            r = run_load(srv, body, ctype="application/x-ndjson", duration=cfg.duration)
        r["events_per_s"] = r["ok_rps"] * per_req
        runs.append(r)
        say(f"  run {rnd + 1}: {r['events_per_s']:>10,.0f} events/s ({r['ok_rps']:,.0f} req/s, "
            f"non2xx {r['non2xx']}, p99 {r['p99_ms']:.1f} ms)  ({cpu_note(r)})")
    return {"events_per_s": med([r["events_per_s"] for r in runs]), "events_per_request": per_req,
            "runs": runs}


def section_half_load(cfg: argparse.Namespace, work: Path, body: Path,
                      max_rps: dict[str, float]) -> dict[str, dict[str, Any]]:
    """Each server kind at half of its own maximum, alternating kinds round by round. The bare
    handler's tail at half ITS maximum is the same-run reference: what the machine and the
    generator add to any server's p99."""
    rates = {kind: round(m / 2) for kind, m in max_rps.items()}
    runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in rates}
    for rnd in range(cfg.rounds):
        for kind, rate in rates.items():
            with Server(kind, work) as srv:
                r = run_load(srv, body, duration=cfg.duration, rate=rate)
            runs[kind].append(r)
            say(f"  {kind:4} run {rnd + 1}: offered {rate:,}/s achieved {r['rps']:,.0f}/s  p50 {r['p50_ms']:.2f} ms  "
                f"p99 {r['p99_ms']:.2f} ms  p999 {r['p999_ms']:.2f} ms  max {r['max_ms']:.1f} ms  ({cpu_note(r)})")
    return {kind: {"rate": rates[kind], "achieved": med([r["rps"] for r in v]),
                   "p50_ms": med([r["p50_ms"] for r in v]), "p99_ms": med([r["p99_ms"] for r in v]),
                   "p999_ms": med([r["p999_ms"] for r in v]), "runs": v} for kind, v in runs.items()}


def section_rss(cfg: argparse.Namespace, work: Path, bodies: dict[str, Path]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    broken = work / "broken-sink"
    broken.mkdir(exist_ok=True)
    (broken / "raw").write_bytes(b"a file where the sink wants a directory: every write fails\n")
    cases = [("300B", bodies["300"], {}), ("16KB", bodies["16k"], {}),
             ("300B_sink_down", bodies["300"], {"FILE_SINK_DIR": str(broken)})]
    for name, body, env in cases:
        with Server("full", work, env) as srv:
            r = run_load(srv, body, conns=256, duration=cfg.rss_duration, sample_rss=True)
            r["rss_end_mb"], r["peak_rss_mb"] = proc_mem_mb(srv.pid)
            dlq = srv.dir / "dlq"
            r["dlq_files"] = sum(1 for p in dlq.rglob("*") if p.is_file()) // 2 if dlq.exists() else 0
        out[name] = r
        say(f"  {name:15} peak RSS {r['peak_rss_mb']:6.1f} MB (end {r['rss_end_mb']:.1f})  "
            f"{r['ok_rps']:,.0f} ok/s  non2xx {r['non2xx'] / max(1.0, r['duration_s']):,.0f}/s  "
            f"dlq files {r['dlq_files']}  ({cpu_note(r)})")
    return out


def micro(what: str, *args: str) -> dict[str, Any]:
    p = subprocess.run([*pinned(SERVER_CORE), PY, str(HERE / "micro.py"), what, *args], cwd=WORK,
                       capture_output=True, text=True, check=False, env={**os.environ, "BENCH_TMP": str(WORK)})
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("BENCHJSON ")), None)
    if line is None:
        raise RuntimeError(f"micro {what} failed: {p.stderr[-2000:]}")
    return json.loads(line[len("BENCHJSON "):])  # type: ignore[no-any-return]


# ------------------------------------------------------------------------------------ main


def say(msg: str) -> None:
    print(msg, flush=True)


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="estat-bench-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def code_under_test() -> dict[str, Any]:
    """Which estat_ingest the servers import (PYTHONPATH may point at a clean snapshot)."""
    p = subprocess.run([PY, "-c", "import estat_ingest, os; print(os.path.dirname(estat_ingest.__file__))"],
                       capture_output=True, text=True, check=False, cwd=tempfile.gettempdir())
    path = p.stdout.strip()
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=False).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "estat_ingest"],
                           capture_output=True, text=True, check=False).stdout.strip()
    return {"estat_ingest": path, "repo_head": head,
            "working_tree_changes_in_estat_ingest": bool(dirty) and path.startswith(str(ROOT))}


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else "met" if ok else "MISSED"


def main() -> int:
    global PIN, WRK, WORK, WARMUP_S
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="~1.5 minutes: 2 rounds of 3 s, fewer repetitions")
    p.add_argument("--loadgen", choices=["auto", "wrk", "python"], default="auto")
    p.add_argument("--out", default=str(HERE / "results.json"))
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra environment for every estat-ingest server (tuning experiments), repeatable")
    p.add_argument("--no-aiohttp", dest="aio", action="store_false",
                   help="skip the HTTP_FRONT=aiohttp variant in sections 1 and 3")
    p.add_argument("--only", default="", help="comma list of sections to run: collect,ndjson,half,rss,encoder,dlq,v1")
    p.add_argument("--v1-bin", default=os.environ.get("V1_BIN") or None, metavar="PATH",
                   help="the Go original's binary for section 8 (default: $V1_BIN; see ../shared/bench/README.md)")
    p.add_argument("--v1-rounds", type=int, default=None, help="rounds of section 8 (default 5, 2 with --quick)")
    p.add_argument("--v1-env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra environment for every v1 server in section 8, repeatable")
    cfg = p.parse_args()
    cfg.rounds = 2 if cfg.quick else 3
    cfg.duration = 3.0 if cfg.quick else 10.0
    cfg.rss_duration = 4.0 if cfg.quick else 15.0
    cfg.warmup = 0.5 if cfg.quick else 1.0
    only = set(filter(None, cfg.only.split(",")))
    WARMUP_S = cfg.warmup
    for item in cfg.env:
        name, _, value = item.partition("=")
        EXTRA_ENV[name] = value

    def want(s: str) -> bool:
        return not only or s in only

    PIN = shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
    WRK = shutil.which("wrk") if cfg.loadgen != "python" else None
    if cfg.loadgen == "wrk" and WRK is None:
        say("wrk is not installed: `apt-get install wrk` (Debian/Ubuntu) or build it from its sources.")
        return 2
    if WRK is None and cfg.loadgen == "auto":
        say("note: wrk not found — install it with `apt-get install wrk` (Debian/Ubuntu); falling back to "
            "bench/loadgen.py (Python). Its own CPU is shown per run; near 100% it, not the server, is the limit.")
    if not PIN:
        say("note: taskset or a second core is missing: server and generator are NOT pinned; figures mix both.")

    results: dict[str, Any] = {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "make bench" + (" (--quick)" if cfg.quick else ""),
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
                    "pinning": f"server core {SERVER_CORE}, generator core {GEN_CORE}" if PIN else "none",
                    "loadgen": "wrk" if WRK else "bench/loadgen.py", "loadavg_start": loadavg()},
        "code": code_under_test(),
        "settings": {"extra_env": EXTRA_ENV, "rounds": cfg.rounds, "duration_s": cfg.duration, "rss_duration_s": cfg.rss_duration,
                     "connections": 64},
    }
    say(f"estat-ingest bench — {'quick' if cfg.quick else 'full'} · {os.cpu_count()} cpus · "
        f"pinning: {results['machine']['pinning']} · generator: {results['machine']['loadgen']} · "
        f"load average at start {loadavg()}" + (f" · extra env {EXTRA_ENV}" if EXTRA_ENV else ""))
    t_start = time.monotonic()
    with workdir() as work:
        WORK = work
        b300, b16k, bnd = work / "e300.json", work / "e16k.json", work / "nd100.ndjson"
        b300.write_bytes(event_body(7, 300))
        b16k.write_bytes(event_body(7, 16000))
        bnd.write_bytes(ndjson_body(100, 300))

        if want("collect"):
            say(f"\n1. single-event POST /collect, 300 B, keep-alive, 64 conns, {cfg.rounds}x{cfg.duration:g}s "
                "each, A B C alternation (bare aiohttp+uvloop vs estat-ingest serve with the full pipeline, file sink, gzip 1: "
                "full = the default front (fast), aio = HTTP_FRONT=aiohttp)")
            results["collect"] = section_collect(cfg, work, b300)
        if want("ndjson"):
            say(f"\n2. NDJSON, 100 events of 300 B per request (MAX_BODY_SIZE=64KiB), {cfg.rounds}x{cfg.duration:g}s")
            results["ndjson"] = section_ndjson(cfg, work, bnd, 100)
        if want("half"):
            maxima: dict[str, float] = {}
            for kind in ("full", "bare", "aio") if cfg.aio else ("full", "bare"):
                m = results.get("collect", {}).get(kind, {}).get("rps", {}).get("median")
                if m is None or m != m:
                    with Server(kind, work) as srv:
                        m = run_load(srv, b300, duration=cfg.duration)["ok_rps"]
                maxima[kind] = m
            say(f"\n3. latency at a constant offered load of half the maximum, each server at half of its own "
                f"({', '.join(f'{k} {v / 2:,.0f}/s' for k, v in maxima.items())}; open loop, bench/loadgen.py, "
                "latency from the due time; alternating)")
            half = section_half_load(cfg, work, b300, maxima)
            results["half_load"] = half["full"]
            results["half_load_bare"] = half["bare"]
            if "aio" in half:
                results["half_load_aio"] = half["aio"]
        if want("rss"):
            say(f"\n4. peak RSS under sustained overload (256 conns, {cfg.rss_duration:g}s, "
                f"{'settings: ' + str(EXTRA_ENV) if EXTRA_ENV else 'default settings'})")
            results["rss"] = section_rss(cfg, work, {"300": b300, "16k": b16k})
        if want("encoder"):
            say("\n5. encoder: a 5000-event batch of 300 B events (join + compress) vs raw compressors, "
                "A B alternation")
            e = micro("encoder", "--reps", "10" if cfg.quick else "30")
            results["encoder"] = e
            mb = e["mb_per_s"]
            say(f"  gzip-1: encoder {fmt(mb['encoder_gzip1'], ' MB/s')}  raw zlib.compress(1) "
                f"{fmt(mb['raw_zlib1'], ' MB/s')}  ratio {fmt(e['ratio_gzip'], '', 2)}")
            say(f"  zstd-3: encoder {fmt(mb['encoder_zstd3'], ' MB/s')}  raw zstd {fmt(mb['raw_zstd3'], ' MB/s')}  "
                f"ratio {fmt(e['ratio_zstd'], '', 2)}")
            c = micro("collect", "--reps", "3" if cfg.quick else "10")
            results["collect_fn"] = c
            say(f"  (for the profile) Collector.handle alone, per single-event request: "
                f"{fmt(c['us_per_request'], ' µs', 2)}")
        if want("dlq"):
            sizes = "1000,10000,100000"
            say(f"\n6. DLQ scan pass (limit 1000 entries) with {sizes.replace(',', ', ')} files (+ .meta.json)")
            d = micro("dlq", "--sizes", sizes, "--reps", "10" if cfg.quick else "30")
            results["dlq"] = d
            say(f"  measured: {d['source']}")
            for n, s in d["sizes"].items():
                cold = f"  first-sight pass {fmt(s['cold_pass_ms'], ' ms', 2)}" if s.get("cold_pass_ms") else ""
                say(f"  {int(n):>7,} files: pass {fmt(s['pass_ms'], ' ms', 2)}{cold}  "
                    f"(full listing {fmt(s['full_listing_ms'], ' ms', 1)})")
        if want("v1"):
            say("\n8. v1 comparison: the Go original and estat-ingest serve, S3 sink (moto), each server restarted "
                "per run, same run and pinning")
            results["v1"] = v1.section(v1.Opts(
                work=work, v1_bin=cfg.v1_bin, wrk=WRK, pin=PIN,
                rounds=cfg.v1_rounds or (2 if cfg.quick else 5), duration=cfg.duration, warmup=cfg.warmup,
                rss_duration=cfg.rss_duration, estat_env=dict(EXTRA_ENV),
                v1_env=dict(item.partition("=")[::2] for item in cfg.v1_env), say=say))
    results["machine"]["loadavg_end"] = loadavg()
    results["elapsed_s"] = time.monotonic() - t_start
    results["summary"] = summarize(results)
    Path(cfg.out).write_text(json.dumps(results, indent=1, default=str) + "\n")
    say(f"\nfigures written to {cfg.out} · elapsed {results['elapsed_s']:.0f}s · "
        f"load average at end {loadavg()}")
    return 0


def summarize(res: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def row(name: str, value: float, target: float, higher_better: bool, text: str) -> None:
        ok = None if value != value else value >= target if higher_better else value <= target  # NaN: not measured
        rows.append({"target": name, "value": value, "limit": target, "met": ok, "text": text})

    if "collect" in res:
        c = res["collect"]
        # Both readings get a verdict: req/s is what the issue names; per CPU-second is the one that
        # survives other load stealing the server's core unevenly between the alternating runs.
        row("serve / bare aiohttp, req/s", c["ratio"]["median"], TARGETS["collect_ratio"], True,
            f"{fmt(c['ratio'], '', 2)} (full {fmt(c['full']['rps'], '/s')} vs bare {fmt(c['bare']['rps'], '/s')})")
        row("serve / bare, per server CPU-s", c["ratio_full_per_cpu"]["median"], TARGETS["collect_ratio"], True,
            f"{fmt(c['ratio_full_per_cpu'], '', 2)} (full {fmt(c['full']['per_cpu_s'], '/CPU-s')} vs bare "
            f"{fmt(c['bare']['per_cpu_s'], '/CPU-s')})")
        if "aio" in c:
            row("  HTTP_FRONT=aiohttp / bare, req/s", c["ratio_aio"]["median"], TARGETS["collect_ratio"], True,
                f"{fmt(c['ratio_aio'], '', 2)} (aiohttp front {fmt(c['aio']['rps'], '/s')})")
            row("  HTTP_FRONT=aiohttp / bare, CPU-s", c["ratio_aio_per_cpu"]["median"], TARGETS["collect_ratio"],
                True, f"{fmt(c['ratio_aio_per_cpu'], '', 2)} (aiohttp front {fmt(c['aio']['per_cpu_s'], '/CPU-s')})")
    if "ndjson" in res:
        n = res["ndjson"]["events_per_s"]
        row("NDJSON events/s", n["median"], TARGETS["ndjson_events_per_s"], True, fmt(n, "/s"))
    for key, name in (("half_load", "p99 at half load (ms)"),
                      ("half_load_bare", "  same-run reference: bare aiohttp p99"),
                      ("half_load_aio", "  HTTP_FRONT=aiohttp p99, its half load")):
        if key in res:
            h = res[key]
            row(name, h["p99_ms"]["median"], TARGETS["half_load_p99_ms"], False,
                f"{fmt(h['p99_ms'], ' ms', 2)} at {h['rate']:,}/s (half of its own maximum; p50 "
                f"{fmt(h['p50_ms'], ' ms', 2)}, p999 {fmt(h['p999_ms'], ' ms', 2)})")
    if "rss" in res:
        r = res["rss"]
        row("peak RSS 300 B (MB)", r["300B"]["peak_rss_mb"], TARGETS["rss_300b_mb"], False,
            f"{r['300B']['peak_rss_mb']:.0f} MB")
        row("peak RSS 16 KB (MB)", r["16KB"]["peak_rss_mb"], TARGETS["rss_16k_mb"], False,
            f"{r['16KB']['peak_rss_mb']:.0f} MB")
        row("peak RSS 300 B sink down (MB)", r["300B_sink_down"]["peak_rss_mb"], TARGETS["rss_300b_mb"], False,
            f"{r['300B_sink_down']['peak_rss_mb']:.0f} MB")
    if "encoder" in res:
        e = res["encoder"]
        row("encoder gzip-1 / raw zlib-1", e["ratio_gzip"]["median"], TARGETS["encoder_ratio"], True,
            fmt(e["ratio_gzip"], "", 2))
    if "dlq" in res:
        s = res["dlq"]["sizes"]
        if "1000" in s and "100000" in s:
            ratio = s["100000"]["pass_ms"]["median"] / s["1000"]["pass_ms"]["median"]
            row("DLQ pass 100k / 1k", ratio, TARGETS["dlq_100k_over_1k"], False,
                f"{ratio:.2f}x ({s['100000']['pass_ms']['median']:.2f} ms vs {s['1000']['pass_ms']['median']:.2f} ms)")
    if "v1" in res:
        v1.summary_rows(res["v1"], row)
    say("\n" + "=" * 100)
    say(f"{'target':34} {'limit':>10}  {'result':7}  measured (median [min-max])")
    for r in rows:
        say(f"{r['target']:34} {r['limit']:>10,g}  {verdict(r['met']):7}  {r['text']}")
    say("=" * 100)
    return rows


PIN = False
WARMUP_S = 1.0
EXTRA_ENV: dict[str, str] = {}
WRK: str | None = None
WORK = Path(tempfile.gettempdir())

if __name__ == "__main__":
    raise SystemExit(main())

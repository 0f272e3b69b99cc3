"""A process that serves settles the cyclic GC once it listens (runtime.settle_gc): what start-up
built is frozen, and gen-0 collections wait for GC_GEN0 net allocations; code that only embeds
`serve` (the tests' own process) keeps CPython's defaults. Observed from outside the server: a
`sitecustomize` on PYTHONPATH writes each process's GC state when it exits."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

import orjson

from estat_ingest.runtime import GC_GEN0
from tests.helpers import ServerProcess, file_objects, records_of

PROBE = '''
import atexit, gc, json, os, sys
def _gc_state():
    with open(os.environ["GC_STATE_FILE"], "a") as f:
        f.write(json.dumps({"pid": os.getpid(), "argv": sys.argv[1:], "threshold": gc.get_threshold(),
                            "frozen": gc.get_freeze_count()}) + "\\n")
atexit.register(_gc_state)
'''


def probed(tmp_path: Path, args: tuple[str, ...] = ()) -> tuple[ServerProcess, Path]:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(PROBE)
    state = tmp_path / "gc-state.jsonl"
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    srv = ServerProcess({"SINKS": "file", "FILE_SINK_DIR": str(tmp_path / "data"), "DLQ_DIR": str(tmp_path / "dlq"),
                         "PYTHONPATH": path, "GC_STATE_FILE": str(state)}, tmp_path, args)
    return srv, state


def states(path: Path) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in path.read_text().splitlines()]


def test_serve_freezes_start_up_and_raises_the_gen0_threshold(tmp_path: Path) -> None:
    srv, state = probed(tmp_path)
    srv.start()
    try:
        body = b"\n".join(orjson.dumps({"n": i}) for i in range(50))
        for _ in range(20):
            assert srv.post(body, {"Content-Type": "application/x-ndjson"})[0] == 200
    finally:
        assert srv.stop(30) == 0, srv.log()
    (one,) = states(state)
    assert one["threshold"][0] == GC_GEN0  # type: ignore[index]
    assert one["frozen"] > 10_000  # type: ignore[operator]  # the start-up's objects (imports, settings, sinks)
    # and serving went on normally after it: every event is in the sink, once
    got = sorted(orjson.loads(r["body"])["n"] for _, r in records_of(file_objects(tmp_path / "data")))
    assert got == sorted(list(range(50)) * 20)


def test_each_worker_settles_its_gc_and_the_parent_does_not(tmp_path: Path) -> None:
    srv, state = probed(tmp_path, ("--workers", "2"))
    srv.start()
    assert srv.stop(60) == 0, srv.log()
    got = states(state)
    pid = srv.proc.pid  # type: ignore[union-attr]
    # the parent, its two spawned workers, and multiprocessing's resource tracker (`python -c`)
    settled = [s for s in got if s["threshold"][0] == GC_GEN0]  # type: ignore[index]
    assert len(settled) == 2 and all(s["frozen"] > 10_000 and s["pid"] != pid for s in settled), got  # type: ignore[operator]
    assert [s["threshold"][0] for s in got if s["pid"] == pid] == [700], got  # type: ignore[index]


def test_settle_gc_itself() -> None:
    code = ("import gc; from estat_ingest.runtime import settle_gc, GC_GEN0; before = gc.get_threshold();"
            "settle_gc(); t = gc.get_threshold();"
            "print(t[0] == GC_GEN0, t[1:] == before[1:], gc.get_freeze_count() > 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.split() == ["True", "True", "True"]
    assert gc.get_threshold()[0] != GC_GEN0  # the tests' own process is not settled by importing it

"""README promise: `make run` on a fresh clone sets itself up, serves /health, writes gzip JSONL to ./data."""

from __future__ import annotations

import gzip
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import orjson
import pytest

from tests.helpers import REPO, free_port, http


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_make_run_on_a_fresh_clone(tmp_path: Path) -> None:
    if not (REPO / ".git").exists() or shutil.which("make") is None:
        pytest.skip("needs a git checkout and make")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True, timeout=60)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH"))}
    env.update({"HTTP_ADDR": f"127.0.0.1:{port}", "FLUSH_INTERVAL": "1s"})
    log = open(tmp_path / "make.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(["make", "run"], cwd=clone, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 540
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "make.log").read_text()
            try:
                if http("GET", f"http://127.0.0.1:{port}/health", timeout=1)[0] == 200:
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("make run never served /health:\n" + (tmp_path / "make.log").read_text()[-3000:])
        status, _, body = http("GET", f"http://127.0.0.1:{port}/health")
        assert (status, body) == (200, b"ok")
        assert http("POST", f"http://127.0.0.1:{port}/collect", b'{"hello":"make run"}')[0] == 200
    finally:
        # signal the server itself, as an orchestrator would (make exits with the server's code)
        children = _children(proc.pid)
        for pid in children or [proc.pid]:
            os.kill(pid, signal.SIGTERM)
        code = proc.wait(120)
        log.close()
    assert code == 0, (tmp_path / "make.log").read_text()[-3000:]
    files = list((clone / "data" / "raw").rglob("*.jsonl.gz"))
    assert len(files) == 1, files
    [rec] = [orjson.loads(x) for x in gzip.decompress(files[0].read_bytes()).splitlines()]
    assert rec["body"] == '{"hello":"make run"}'
    assert (clone / "data" / "dlq").is_dir()  # DLQ under ./data/dlq, as the README says

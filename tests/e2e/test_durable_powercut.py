"""A power cut under ACK_MODE=durable: the DLQ (and its spool) on LazyFS, a FUSE file system that
keeps written data in its own cache until fsync and drops every unsynced byte on command
(dsrhaslab/lazyfs; ../shared/tools/build-lazyfs.sh builds it outside the project).

Traffic, kill -9, drop the unsynced bytes, restart: every event answered 2xx is in S3 exactly
once — with S3 up during the traffic, and with S3 down (the batches go to the DLQ). Skipped with
a message when /dev/fuse, root or the lazyfs binary (LAZYFS_BIN, default
/tmp/lazyfs-build/src/lazyfs/build/lazyfs) is missing.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.durable_util import Load, assert_exactly_once, stored_markers
from tests.helpers import ServerProcess, free_port, s3_objects

LAZYFS = os.environ.get("LAZYFS_BIN", "/tmp/lazyfs-build/src/lazyfs/build/lazyfs")


class LazyFs:
    def __init__(self, base: Path) -> None:
        self.root, self.mnt = base / "root", base / "mnt"
        self.fifo, self.done = base / "faults.fifo", base / "faults_done.fifo"
        for d in (self.root, self.mnt):
            d.mkdir(parents=True)
        os.mkfifo(self.fifo)
        os.mkfifo(self.done)
        self.cfg = base / "lazyfs.toml"
        self.cfg.write_text(
            f'[faults]\nfifo_path="{self.fifo}"\nfifo_path_completed="{self.done}"\n'
            '[cache]\napply_eviction=false\n[cache.simple]\ncustom_size="256mb"\nblocks_per_page=1\n'
            f'[filesystem]\nlog_all_operations=false\nlogfile="{base / "lazyfs.log"}"\n')
        self.proc: subprocess.Popen[bytes] | None = None

    def mount(self) -> None:
        self.out = open(self.cfg.with_suffix(".out"), "wb")  # noqa: SIM115 - closed in unmount()
        self.proc = subprocess.Popen(
            [LAZYFS, str(self.mnt), "--config-path", str(self.cfg), "-o", "allow_other", "-o", "modules=subdir",
             "-o", f"subdir={self.root}", "-f"], stdout=self.out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while not os.path.ismount(self.mnt):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("lazyfs did not mount: " + self.cfg.with_suffix(".out").read_text()[-2000:])
            time.sleep(0.02)

    def power_cut(self) -> None:
        """Drop every byte not fsynced (LazyFS answers on the second fifo when it is done)."""
        answer: list[bytes] = []

        def read() -> None:
            with open(self.done, "rb") as f:
                answer.append(f.readline())

        t = threading.Thread(target=read, daemon=True)
        t.start()
        time.sleep(0.05)
        with open(self.fifo, "wb") as f:
            f.write(b"lazyfs::clear-cache\n")
        t.join(30)
        assert answer and b"finished" in answer[0], answer

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.mnt)], capture_output=True)
        if self.proc is not None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
            self.out.close()


@pytest.fixture
def lazyfs(tmp_path: Path) -> Iterator[LazyFs]:
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse on this machine: the power-cut test needs FUSE")
    if os.geteuid() != 0:
        pytest.skip("the power-cut test mounts LazyFS and needs root")
    if not os.access(LAZYFS, os.X_OK):
        pytest.skip(f"lazyfs not built at {LAZYFS} (build it with ../shared/tools/build-lazyfs.sh, "
                    "or set LAZYFS_BIN)")
    # LazyFS's argument parser misreads any path containing "-o" (pytest's /tmp/pytest-of-root/…):
    # its files live in a directory of their own
    base = Path(tempfile.mkdtemp(prefix="lazyfs", dir="/tmp"))
    fs = LazyFs(base)
    fs.mount()
    try:
        yield fs
    finally:
        fs.unmount()
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("s3_during_traffic", ["up", "down"])
def test_a_power_cut_loses_no_acknowledged_event(tmp_path: Path, lazyfs: LazyFs, moto: Any, bucket: str,
                                                 s3: Any, s3_during_traffic: str) -> None:
    dlq = lazyfs.mnt / "dlq"
    env = {"RAW_BUCKET": bucket, "AWS_REGION": "us-east-1", "DLQ_DIR": str(dlq), "ACK_MODE": "durable",
           "BATCH_SIZE": "200", "FLUSH_INTERVAL": "1s", "S3_APP_RETRIES": "0", "S3_TIMEOUT": "1s",
           "LOG_LEVEL": "warning"}
    endpoint = moto.endpoint if s3_during_traffic == "up" else f"http://127.0.0.1:{free_port()}"
    srv = ServerProcess({**env, "S3_ENDPOINT_URL": endpoint}, tmp_path).start()
    load = Load(srv.port, clients=6).start()
    try:
        deadline = time.monotonic() + 60
        while len(load) < 1500 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        srv.signal(signal.SIGKILL)  # the process dies first, then the machine loses its page cache
        srv.wait(10)
        load.stop()
    assert len(load) >= 1500, srv.log()[-2000:]
    lazyfs.power_cut()
    srv = ServerProcess({**env, "S3_ENDPOINT_URL": moto.endpoint}, tmp_path).start()
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            seen, _ = stored_markers(s3_objects(s3, bucket))
            if all(seen[m] for m in load.acked):
                break
            time.sleep(0.2)
    finally:
        assert srv.stop() == 0, srv.log()[-3000:]
    print(assert_exactly_once(load.acked, load.sent, s3_objects(s3, bucket), f"power cut, S3 {s3_during_traffic}"))

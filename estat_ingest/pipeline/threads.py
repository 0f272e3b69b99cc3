"""The thread pool that compresses batches, at a lower CPU priority than the event loop.

zlib and zstandard release the GIL, so a batch compressed in a thread costs the loop no Python
time, but on one core the two threads still share the CPU: at the default niceness the scheduler
gives each half, and a 5,000-event batch (≈ 10 ms of gzip) delays every request answered during
it. A higher nice value for the compression threads only (Linux keeps niceness per thread) lets
the loop preempt them and keeps request latency flat, while compression still gets the idle time
and a share of the core under overload (with nice 5 the weights are 1024 : 335, so about a
quarter), so deliveries never starve. Where the call is not allowed or not per-thread, the threads
keep the default priority.
"""

from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor

ENCODE_NICE = 5


def _lower_priority(nice: int) -> None:
    """Thread initializer: `nice` more than the thread that created it (relative, capped at 19)."""
    with contextlib.suppress(OSError, AttributeError):
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))


def encode_pool(max_workers: int, nice: int = ENCODE_NICE) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="encode",
                              initializer=_lower_priority, initargs=(nice,))

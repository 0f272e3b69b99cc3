"""The compression threads run at a lower CPU priority than the event loop (pipeline/threads.py)."""

from __future__ import annotations

import os
import threading

from estat_ingest.pipeline.threads import ENCODE_NICE, encode_pool


def _nice() -> tuple[str, int]:
    return threading.current_thread().name, os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def test_encode_threads_are_nicer_than_the_caller_and_the_caller_is_untouched() -> None:
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    pool = encode_pool(2)
    try:
        results = [pool.submit(_nice).result() for _ in range(4)]
    finally:
        pool.shutdown(wait=True)
    assert all(name.startswith("encode") for name, _ in results)
    assert {nice for _, nice in results} == {min(19, mine + ENCODE_NICE)}
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine  # per thread, not process

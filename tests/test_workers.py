"""Worker pools share one malloc arena (``potluck.workers``): glibc's own report is the
reference (``malloc_stats`` lists one ``Arena N`` per arena in use)."""

from __future__ import annotations

import subprocess
import sys

import pytest

_SCRIPT = """
import ctypes, sys, threading
from concurrent.futures import ThreadPoolExecutor
from potluck import workers
barrier = threading.Barrier(4)
def work(_):
    barrier.wait()  # all four allocate at once: each would take an arena of its own
    data = [bytearray(1 << 16) for _ in range(64)]
    barrier.wait()
    return len(data)
pool = workers.pool(4, "t") if sys.argv[1] == "shared" else ThreadPoolExecutor(4)
with pool:
    list(pool.map(work, range(4)))
sys.stderr.flush()
ctypes.CDLL(None).malloc_stats()
"""


def _arenas(kind: str) -> int:
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, kind], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return sum(line.startswith("Arena ") for line in proc.stderr.splitlines())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_worker_threads_share_one_arena() -> None:
    assert _arenas("default") > 1  # the allocator's default: an arena per busy thread
    assert _arenas("shared") == 1

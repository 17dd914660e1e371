"""Peak memory of a call as tracemalloc sees it (Python objects and numpy buffers)."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable


def traced_peak(fn: Callable[[], object], *, warm_up: bool = False) -> int:
    """Peak bytes traced while ``fn`` runs; with ``warm_up``, after one untraced call (caches,
    pools and lazy imports made then are not counted)."""
    if warm_up:
        fn()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

"""Worker thread pools, made one way.

Each thread that allocates gets its own glibc malloc arena (up to 8 per core), and an arena
keeps the memory its thread freed: a decode pool's 4 MiB chunk buffers then stay resident in
every worker's arena, and a checkout's RSS grows to several times what it holds at any moment
(a bf16 GPT-2 checkout: 154 MB peak with the default arenas, 100 MB with one). ``pool`` makes
the threads share the main arena first (``M_ARENA_MAX`` 1, where glibc's ``mallopt`` exists);
their allocations are few and large (chunk buffers, arrays), so sharing one lock costs nothing
measurable.
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

__all__ = ["pool", "release_free_memory", "share_one_arena"]

_M_ARENA_MAX = -8  # glibc's malloc.h
_shared = False


def share_one_arena() -> None:
    """Limit glibc to one malloc arena for the rest of the process (once; a no-op elsewhere)."""
    global _shared
    if _shared or not sys.platform.startswith("linux"):
        return
    _shared = True
    try:
        import ctypes

        mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
        if mallopt is not None:
            mallopt(_M_ARENA_MAX, 1)
    except OSError:  # no C library to load: keep the allocator's defaults
        pass


def pool(workers: int, name: str) -> ThreadPoolExecutor:
    """A thread pool of ``workers`` threads named ``name-N``, sharing one malloc arena."""
    share_one_arena()
    return ThreadPoolExecutor(workers, thread_name_prefix=name)


def release_free_memory() -> bool:
    """Give the memory glibc keeps free back to the system (``malloc_trim``: also the free
    pages inside the heap, which plain ``free`` never returns). Called once a file is cleaned
    or smudged: what the file's chunk buffers left behind is then not counted in this process's
    RSS while git (or the textconv notes' git commands) goes on. True when it ran; a no-op
    without glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    except OSError:
        return False
    if trim is None:
        return False
    trim(0)
    return True

"""Rendered pages kept in memory, keyed by URL and the index's generation.

A page is a function of the index (and of the immutable objects it names), so it can be served
again until the index changes: every ``reindex`` writes a new generation, which this cache reads
at most once per ``ttl_s`` seconds (a reindex by another process shows within that time).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from potluck.hub import index as ix

Key = tuple[str, str, str]  # (kind, path, query)


class PageCache:
    """An LRU of response bodies bounded by ``max_bytes``, dropped when the generation moves."""

    def __init__(self, engine: Engine, max_bytes: int = 64 << 20, ttl_s: float = 1.0) -> None:
        self.engine = engine
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._pages: OrderedDict[Key, tuple[bytes, str]] = OrderedDict()
        self._bytes = 0
        self._gen: str | None = None
        self._checked = -1.0

    def _generation(self) -> str:
        with self.engine.connect() as c:
            got = c.execute(
                sa.select(ix.STATE.c.value).where(
                    ix.STATE.c.repo == "", ix.STATE.c.key == "generation"
                )
            ).scalar()
        return str(got or "")

    def due(self) -> bool:
        """Whether ``refresh`` would read the generation now."""
        return time.monotonic() - self._checked >= self.ttl_s

    def refresh(self) -> None:
        """Re-read the generation when ``ttl_s`` has passed; forget every page if it moved."""
        now = time.monotonic()
        if now - self._checked < self.ttl_s:
            return
        gen = self._generation()
        with self._lock:
            self._checked = now
            if gen != self._gen:
                self._gen = gen
                self._pages.clear()
                self._bytes = 0

    def get(self, key: Key) -> tuple[bytes, str] | None:
        """The cached (body, media type) of ``key``."""
        with self._lock:
            hit = self._pages.get(key)
            if hit is not None:
                self._pages.move_to_end(key)
            return hit

    def put(self, key: Key, body: bytes, media_type: str) -> None:
        """Keep a page (the least recently used ones go when over ``max_bytes``)."""
        if len(body) > self.max_bytes // 8:
            return
        with self._lock:
            old = self._pages.pop(key, None)
            self._bytes -= len(old[0]) if old else 0
            self._pages[key] = (body, media_type)
            self._bytes += len(body)
            while self._bytes > self.max_bytes:
                _, (b, _m) = self._pages.popitem(last=False)
                self._bytes -= len(b)

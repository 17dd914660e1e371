"""An in-memory object store (tests, scratch work)."""

from __future__ import annotations

import io
import time
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import BinaryIO

from potluck.store.base import Quarantined, missing, validate_oid


class MemoryStore:
    """Dict-backed ``ObjectStore``; ``writer`` buffers and publishes on success."""

    def __init__(self) -> None:
        self._objects: dict[str, bytes] = {}
        self._times: dict[str, float] = {}
        self._quarantine: list[tuple[Quarantined, bytes]] = []

    def has(self, oid: str) -> bool:
        """Whether ``oid`` is stored."""
        return validate_oid(oid) in self._objects

    def _get(self, oid: str) -> bytes:
        try:
            return self._objects[validate_oid(oid)]
        except KeyError:
            raise missing(oid) from None

    def open(self, oid: str) -> BinaryIO:
        """A read-only-by-convention copy of the stored bytes."""
        return io.BytesIO(self._get(oid))

    def stored_size(self, oid: str) -> int:
        """Length of the stored bytes."""
        return len(self._get(oid))

    def writer(self, oid: str, durable: bool = True) -> AbstractContextManager[BinaryIO]:
        """Buffer writes; publish under ``oid`` when the block succeeds (first write wins)."""
        return self._writer(validate_oid(oid))

    @contextmanager
    def _writer(self, oid: str) -> Iterator[BinaryIO]:
        buf = io.BytesIO()
        yield buf
        if oid not in self._objects:
            self._objects[oid] = buf.getvalue()
            self._times[oid] = time.time()

    def has_many(self, oids: Iterable[str]) -> set[str]:
        """The ``oids`` that are stored."""
        return {oid for oid in oids if self.has(oid)}

    def write_many(self, objects: Iterable[tuple[str, bytes]], durable: bool = True) -> None:
        """Publish each object (first write wins)."""
        for oid, data in objects:
            with self.writer(oid, durable) as f:
                f.write(data)

    def delete(self, oid: str) -> bool:
        """Remove ``oid``; return whether it was there."""
        self._times.pop(validate_oid(oid), None)
        return self._objects.pop(oid, None) is not None

    def delete_many(self, oids: Iterable[str], keep_newer_than: float | None = None) -> list[str]:
        """Remove every one of ``oids`` not freshened after ``keep_newer_than``."""
        out = []
        for oid in oids:
            t = self._times.get(validate_oid(oid))
            if t is None or (keep_newer_than is not None and t > keep_newer_than):
                continue
            self.delete(oid)
            out.append(oid)
        return sorted(out)

    def batch(self) -> AbstractContextManager[None]:
        """Nothing to make durable in memory."""
        return nullcontext()

    def iter_oids(self) -> Iterator[str]:
        """Every stored oid (a snapshot, so deleting while iterating is safe)."""
        return iter(list(self._objects))

    def mtime(self, oid: str) -> float:
        """When the object was written or last freshened."""
        self._get(oid)
        return self._times[oid]

    def freshen(self, oid: str) -> bool:
        """Set the object's time to now; return whether it was there."""
        if validate_oid(oid) not in self._objects:
            return False
        self._times[oid] = time.time()
        return True

    def quarantine(self, oid: str, reason: str) -> str | None:
        """Move the object into the in-memory quarantine list."""
        data = self._objects.pop(validate_oid(oid), None)
        if data is None:
            return None
        self._times.pop(oid, None)
        entry = Quarantined(oid, f"memory:quarantine/{len(self._quarantine)}", reason, time.time())
        self._quarantine.append((entry, data))
        return entry.location

    def quarantined(self) -> list[Quarantined]:
        """Every quarantined object, oldest first."""
        return [q for q, _ in self._quarantine]

    def restore(self, q: Quarantined) -> bool:
        """Put a quarantined object back (unless the id is stored again meanwhile)."""
        for i, (entry, data) in enumerate(self._quarantine):
            if entry == q and q.oid not in self._objects:
                del self._quarantine[i]
                self._objects[q.oid] = data
                self._times[q.oid] = time.time()
                return True
        return False

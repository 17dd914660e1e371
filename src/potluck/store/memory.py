"""An in-memory object store (tests, scratch work)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import BinaryIO

from potluck.store.base import missing, validate_oid


class MemoryStore:
    """Dict-backed ``ObjectStore``; ``writer`` buffers and publishes on success."""

    def __init__(self) -> None:
        self._objects: dict[str, bytes] = {}

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
        self._objects.setdefault(oid, buf.getvalue())

    def delete(self, oid: str) -> bool:
        """Remove ``oid``; return whether it was there."""
        return self._objects.pop(validate_oid(oid), None) is not None

    def iter_oids(self) -> Iterator[str]:
        """Every stored oid (a snapshot, so deleting while iterating is safe)."""
        return iter(list(self._objects))

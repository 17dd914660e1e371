"""The object store interface: opaque object files addressed by their id (oid).

A store knows nothing about encodings or tensors; it keeps bytes under 64-hex-digit ids.
Verifying that an object's logical bytes hash to its id is done by the caller (``ops``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import BinaryIO, Protocol, cast, runtime_checkable

from potluck.errors import MissingObjectError, UserError

_OID = re.compile(r"[0-9a-f]{64}")
MISSING_HINT = (
    "the object is not in this store: fetch it from a remote that has it, "
    "or run `potluck fsck` to list what is missing"
)


def validate_oid(oid: object) -> str:
    """Return ``oid`` if it is a 64-character lowercase hex sha256 id, else raise ``UserError``."""
    if not isinstance(oid, str) or not _OID.fullmatch(oid):
        raise UserError(
            f"invalid object id {oid!r}",
            hint="object ids are 64 lowercase hex digits (a sha256)",
            oid=oid,
        )
    return oid


def raw_oids(oids: Iterable[object]) -> tuple[list[str], list[bytes]]:
    """(the ``oids``, each checked as ``validate_oid`` does; their raw 32-byte digests): one
    conversion of all of them when they are well formed (no pattern match, no call per id),
    else ``validate_oid`` of each, which names the first bad one."""
    out = list(oids)
    strings = cast(list[str], out)
    if set(map(type, out)) <= {str} and set(map(len, strings)) <= {64}:
        joined = "".join(strings)
        if joined.isascii() and not _has_upper(joined):
            try:
                raw = bytes.fromhex(joined)
            except ValueError:
                raw = b""
            if len(raw) * 2 == len(joined):  # no whitespace skipped: every id is 64 hex digits
                return strings, [raw[i : i + 32] for i in range(0, len(raw), 32)]
    valid = [validate_oid(o) for o in out]
    return valid, [bytes.fromhex(o) for o in valid]


def _has_upper(text: str) -> bool:
    """Whether ``text`` has an upper-case hex letter (which ``bytes.fromhex`` would accept)."""
    return any(c in text for c in "ABCDEF")


def missing(oid: str) -> MissingObjectError:
    """The error raised when ``oid`` is asked for but not stored."""
    return MissingObjectError(f"object {oid} is missing", hint=MISSING_HINT, oid=oid)


@dataclass(frozen=True)
class Quarantined:
    """An object moved aside: its id, where it is, why, and when (seconds since the epoch)."""

    oid: str
    location: str
    reason: str
    when: float


@runtime_checkable
class ObjectStore(Protocol):
    """Content-addressed object files.

    ``writer`` is atomic: the bytes become visible under ``oid`` only when its ``with`` block
    exits without an exception; on an exception nothing is left behind. Writing an ``oid`` that
    already exists keeps the existing object and discards the new bytes. Every method rejects a
    malformed ``oid`` with ``UserError``.
    """

    def has(self, oid: str) -> bool:
        """Whether ``oid`` is stored."""
        ...

    def open(self, oid: str) -> BinaryIO:
        """Open the stored bytes for reading; ``MissingObjectError`` if absent."""
        ...

    def stored_size(self, oid: str) -> int:
        """Size in bytes of the stored object file; ``MissingObjectError`` if absent."""
        ...

    def writer(self, oid: str, durable: bool = True) -> AbstractContextManager[BinaryIO]:
        """A binary file to write ``oid`` into, published atomically on success.

        With ``durable`` False the store may skip flushing to stable storage (for objects
        that can be fetched again; a torn object after a crash fails its hash check on read).
        """
        ...

    def has_many(self, oids: Iterable[str]) -> set[str]:
        """The ``oids`` that are stored (as ``has`` of each, at the cost of a few lookups)."""
        ...

    def write_many(self, objects: Iterable[tuple[str, bytes]], durable: bool = True) -> None:
        """Write each ``(oid, bytes)`` as ``writer`` would (inside ``batch()`` with ``durable``
        False: into the batch at once); an oid already stored keeps its bytes."""
        ...

    def delete(self, oid: str) -> bool:
        """Remove ``oid``; return whether it was there."""
        ...

    def delete_many(self, oids: Iterable[str], keep_newer_than: float | None = None) -> list[str]:
        """Remove every one of ``oids`` at once (gc); with ``keep_newer_than`` (seconds since
        the epoch), objects written or freshened after it stay. Return the oids removed."""
        ...

    def batch(self) -> AbstractContextManager[None]:
        """A block whose objects written with ``durable=False`` the store makes durable
        together when it exits (``LocalStore``: one pack file); nestable."""
        ...

    def iter_oids(self) -> Iterator[str]:
        """Every stored oid, in no particular order."""
        ...

    def mtime(self, oid: str) -> float:
        """When ``oid`` was written or last ``freshen``-ed (seconds since the epoch; gc keeps
        unreferenced objects younger than its grace period); ``MissingObjectError`` if absent."""
        ...

    def freshen(self, oid: str) -> bool:
        """Set ``oid``'s time to now (a writer re-using an existing object does this, so gc's
        grace period covers it until it is referenced); return whether it was there."""
        ...

    def quarantine(self, oid: str, reason: str) -> str | None:
        """Move ``oid`` aside (never deleted: kept for inspection) so that it reads as absent
        and can be written again; return where it went, or None when it was not there."""
        ...

    def quarantined(self) -> list[Quarantined]:
        """Every object moved aside by ``quarantine``, oldest first."""
        ...

    def restore(self, q: Quarantined) -> bool:
        """Put a quarantined object back under its id (the caller verifies it next); False when
        the id is stored already or the quarantined copy is gone."""
        ...

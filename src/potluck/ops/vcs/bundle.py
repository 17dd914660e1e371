"""Bundles: many small stored objects sent as one wire object, so a push of a checkpoint makes
a few requests for its biases, norms and small matrices instead of two per tensor (an LFS
upload and its verify).

A push sends each standalone object (no delta base) of at most ``BUNDLE_MEMBER_MAX`` bytes as
its stored file, the bytes already in the local store: nothing is decoded to send it, and a
receiver stores it as it came (decoding it once to check it). The files are laid end to end,
in the order the checkpoint lists them, in bundles of at most ``BUNDLE_BYTES``. Each member
gets a wire index entry with its span in the bundle (``ops.vcs.wire``); the bundle is named by
the sha256 of all its bytes, like any LFS object. Larger objects keep travelling one by one as
plain bytes: for them the request is cheap next to the bytes, and a receiver of plain bytes
only hashes them (a stored file must be decoded, and written to the store besides the
checkout's copy; measured on GPT-2, sending every tensor in bundles cost a clone 1.7 s of
CPU more on average for a push 0.4 s faster: docs/benchmarks.md, session 8).

A receiver that needs one member downloads the whole bundle (at most ``BUNDLE_BYTES``); members
of one file sit together, so a checkout of one file rarely downloads another file's tensors.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from potluck import workers
from potluck.errors import CorruptObjectError, PotluckError
from potluck.objects.encoding import decode_object, read_header
from potluck.ops.vcs.odb import ObjectDB, copy_range
from potluck.ops.vcs.wire import WireEntry, check_header, copy_exact, store_encoded
from potluck.remote import ObjectRef

__all__ = [
    "BUNDLE_BYTES",
    "BUNDLE_MEMBER_MAX",
    "BUNDLE_MIN_OBJECTS",
    "Bundle",
    "ChunkReader",
    "bundle_entries",
    "group_by_wire",
    "open_bundle",
    "plan_bundles",
    "seal_bundles",
    "store_member_fresh",
    "store_wire",
]

#: the largest bundle
BUNDLE_BYTES = 64 << 20
#: the largest object (logical bytes) sent in a bundle
BUNDLE_MEMBER_MAX = 4 << 20
#: a push bundles its standalone objects only when it sends at least this many (fewer cost
#: few requests, and bundling means a wire index to publish)
BUNDLE_MIN_OBJECTS = 32
_PIECE = 8 << 20


@dataclass(frozen=True)
class Bundle:
    """Objects sent together: each logical object and the size of its stored file."""

    members: tuple[tuple[ObjectRef, int], ...]

    @property
    def size(self) -> int:
        """Bytes of the bundle: its members' stored files end to end."""
        return sum(n for _, n in self.members)


def plan_bundles(odb: ObjectDB, refs: Sequence[ObjectRef]) -> list[Bundle]:
    """Bundles of the stored files of ``refs`` (objects to upload, in checkpoint order), each
    at most ``BUNDLE_BYTES`` (or one file). Delta objects are left out: their stored file
    needs a base the receiver may lack."""
    bundles: list[Bundle] = []
    current: list[tuple[ObjectRef, int]] = []
    filled = 0
    for ref in refs:
        if odb.header(ref.oid).base_oid is not None:
            continue
        stored = odb.store.stored_size(ref.oid)
        if current and filled + stored > BUNDLE_BYTES:
            bundles.append(Bundle(tuple(current)))
            current, filled = [], 0
        current.append((ref, stored))
        filled += stored
    if current:
        bundles.append(Bundle(tuple(current)))
    return bundles


def seal_bundles(odb: ObjectDB, bundles: Sequence[Bundle]) -> list[ObjectRef]:
    """The wire object of each bundle: its bytes hashed (on the object database's worker
    count of threads, at most one per bundle: sha256 and file reads release the GIL)."""
    if not bundles:
        return []
    with workers.pool(max(1, min(odb.workers, len(bundles))), "potluck-bundle") as pool:
        digests = list(pool.map(lambda b: _digest(odb, b), bundles))
    return [ObjectRef(d, b.size) for b, d in zip(bundles, digests, strict=True)]


def bundle_entries(bundle: Bundle, wire: ObjectRef) -> list[WireEntry]:
    """The wire index entries of ``bundle`` sent as ``wire``: a lone member as a plain
    encoded entry, the others with their spans."""
    if len(bundle.members) == 1:
        return [WireEntry(bundle.members[0][0].oid, wire, None)]
    entries, offset = [], 0
    for ref, stored in bundle.members:
        entries.append(WireEntry(ref.oid, wire, None, (offset, stored)))
        offset += stored
    return entries


def _digest(odb: ObjectDB, bundle: Bundle) -> str:
    h = hashlib.sha256()
    for piece in pieces(odb, bundle):
        h.update(piece)
    return h.hexdigest()


def pieces(odb: ObjectDB, bundle: Bundle) -> Iterator[bytes]:
    """The bundle's bytes: each member's stored file, checked to have the size planned."""
    for ref, stored in bundle.members:
        with odb.store.open(ref.oid) as f:
            try:
                yield from copy_range(f, 0, stored, _PIECE)
                whole = not f.read(1)
            except EOFError:
                whole = False
            if not whole:
                raise CorruptObjectError(
                    f"local object {ref.oid[:12]} changed size while it was being sent",
                    hint="run the push again; `potluck fsck` checks the store",
                    oid=ref.oid,
                )


class _Span:
    """``length`` bytes of ``f`` from its current position, as a read-only stream."""

    def __init__(self, f: BinaryIO, length: int) -> None:
        self._f, self._left = f, length

    def read(self, n: int = -1) -> bytes:
        if self._left <= 0:
            return b""
        buf = self._f.read(self._left if n < 0 else min(n, self._left))
        self._left -= len(buf)
        return buf


def store_member_fresh(odb: ObjectDB, entry: WireEntry, size: int, path: Path, dest: Path) -> None:
    """A downloaded standalone encoded object (``entry``, in the wire file ``path``): decode
    it into ``dest`` (its logical bytes, for a checkout to use at once) while hashing, and,
    when it yields exactly ``entry.oid``, put its encoded file into the store unchanged (no
    re-encoding). On a mismatch nothing stays and ``CorruptObjectError`` names the object."""
    offset = entry.span[0] if entry.span else 0
    tmp = dest.with_name(dest.name + ".part")
    h, n = hashlib.sha256(), 0
    try:
        with open(path, "rb") as f, open(tmp, "wb") as out:
            f.seek(offset)
            check_header(entry, read_header(f), size)
            f.seek(offset)
            for chunk in decode_object(_Span(f, entry.length), _no_base):  # type: ignore[arg-type]
                h.update(chunk)
                out.write(chunk)
                n += len(chunk)
        if n != size or h.hexdigest() != entry.oid:
            raise CorruptObjectError(
                f"wire object {entry.wire.oid[:12]} gives {n} bytes hashing to "
                f"{h.hexdigest()[:12]}, not object {entry.oid[:12]}",
                hint="the remote's wire index is wrong; push the object again",
                oid=entry.oid,
            )
        with open(path, "rb") as f, odb.store.writer(entry.oid, durable=False) as w:
            copy_exact(f, w, offset, entry.length)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _no_base(oid: str) -> Iterator[bytes]:
    raise CorruptObjectError(
        f"a bundle member refers to delta base {oid[:12]}",
        hint="the remote's wire index is wrong; push the object again",
        oid=oid,
    )


class ChunkReader:
    """A read-only stream over an iterator of byte chunks. ``read(n)`` hands out a whole chunk
    as it came when it fits (no copy), else the next ``n`` bytes of it."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self.hashed: str | None = None  # see ``remote.transfer.read_exact``
        self._chunks = chunks
        self._buf = b""
        self._pos = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (fewer at a chunk's end; ``b""`` at the end of the stream)."""
        while self._pos >= len(self._buf):
            nxt = next(self._chunks, None)
            if nxt is None:
                return b""
            self._buf, self._pos = nxt, 0
        if self._pos == 0 and (n < 0 or n >= len(self._buf)):
            out, self._buf = self._buf, b""
            return out
        end = len(self._buf) if n < 0 else self._pos + n
        out = self._buf[self._pos : end]
        self._pos += len(out)
        return out

    def close(self) -> None:
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()


@contextmanager
def open_bundle(odb: ObjectDB, bundle: Bundle, wire: ObjectRef) -> Iterator[BinaryIO]:
    """A read-only stream of a bundle's bytes (called again when the upload is retried)."""
    stream = ChunkReader(pieces(odb, bundle))
    stream.hashed = wire.oid  # seal_bundles hashed these same files: the upload checks sizes
    try:
        yield stream  # type: ignore[misc]  # read(n) is all the remote layer calls
    finally:
        stream.close()


WireLevel = Mapping[ObjectRef, list[tuple[ObjectRef, WireEntry]]]


def group_by_wire(
    pairs: Iterable[tuple[ObjectRef, WireEntry]],
) -> dict[ObjectRef, list[tuple[ObjectRef, WireEntry]]]:
    """Wire object → the (object, entry) pairs it carries (several for a bundle)."""
    out: dict[ObjectRef, list[tuple[ObjectRef, WireEntry]]] = {}
    for ref, entry in pairs:
        out.setdefault(entry.wire, []).append((ref, entry))
    return out


def store_wire(
    odb: ObjectDB,
    fresh_dir: Path,
    keep: dict[str, Path] | None,
    bases: set[str | None],
    by_wire: WireLevel,
    w: ObjectRef,
    path: Path,
) -> None:
    """Store the objects one downloaded wire object carries; any failure names the index
    entry (logical id and wire object) so that the fetch can fall back to the plain bytes.
    With ``keep``, a standalone object no other one decodes through is also left decoded in
    ``fresh_dir`` (its encoded file goes into the store as it came)."""
    for ref, entry in by_wire[w]:
        try:
            if keep is not None and entry.base is None and ref.oid not in bases:
                dest = fresh_dir / ref.oid
                store_member_fresh(odb, entry, ref.size, path, dest)
                keep[ref.oid] = dest
            else:
                store_encoded(odb, entry, ref.size, path)
        except PotluckError as e:
            raise CorruptObjectError(
                f"wire object {w.oid[:12]} does not give object {ref.oid[:12]}: {e.message}",
                hint="the remote's wire index is wrong; push the object again from a clone "
                "that has it (`potluck push --verify`)",
                oid=ref.oid,
                wire=w.oid,
            ) from e

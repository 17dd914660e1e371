"""Encoded objects on the wire: send a stored object's file (an XOR delta against an older
version, or zstd-compressed bytes) instead of its plain bytes when that is much smaller.

A remote object must be named by the sha256 of its content (that is what makes it a genuine
Git LFS object), so an encoded object travels under the hash of its *encoded* bytes, and a
**wire index** maps each logical object id to it::

    potluck wire index v1
    <logical oid> <wire oid> <wire size> <base oid or ->

The index is published next to the commits (``git.wireindex`` keeps it in a git ref) only
after every object it names has been uploaded. A receiver downloads the base chain first,
checks each encoded object's header against the index, stores it, then decodes it once to
verify that it yields exactly the logical bytes its id promises.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from potluck.errors import CorruptObjectError, FormatError, UserError
from potluck.objects.encoding import ObjectHeader, read_header
from potluck.ops.vcs.odb import ObjectDB
from potluck.remote import ObjectRef
from potluck.store.base import validate_oid

INDEX_MAGIC = b"potluck wire index v1\n"
#: send the encoded form only when it is at most this fraction of the plain bytes
ENCODED_RATIO = 0.5


@dataclass(frozen=True)
class WireEntry:
    """One encoded object on a remote: logical id, the wire object, and its delta base."""

    oid: str
    wire: ObjectRef
    base: str | None

    def line(self) -> str:
        """The index line of this entry."""
        return f"{self.oid} {self.wire.oid} {self.wire.size} {self.base or '-'}"


def parse_index(data: bytes) -> dict[str, WireEntry]:
    """Entries of one index blob; ``FormatError`` on anything malformed."""
    if not data.startswith(INDEX_MAGIC):
        raise FormatError("not a potluck wire index", hint="the remote's index ref is damaged")
    out: dict[str, WireEntry] = {}
    for n, line in enumerate(data[len(INDEX_MAGIC) :].decode("ascii", "replace").splitlines()):
        fields = line.split(" ")
        try:
            oid, wire, size, base = fields
            entry = WireEntry(
                validate_oid(oid),
                ObjectRef(validate_oid(wire), int(size)),
                None if base == "-" else validate_oid(base),
            )
        except (ValueError, UserError) as e:
            raise FormatError(
                f"wire index line {n + 2} is malformed: {line[:120]!r}",
                hint="the remote's index ref is damaged; objects are still checked on download",
            ) from e
        out[entry.oid] = entry
    return out


def dump_index(entries: Iterable[WireEntry]) -> bytes:
    """Canonical index text: sorted by logical id."""
    lines = sorted({e.oid: e.line() for e in entries}.items())
    return INDEX_MAGIC + "".join(line + "\n" for _, line in lines).encode("ascii")


def encoded_candidate(
    odb: ObjectDB, ref: ObjectRef, base_available: Callable[[str], bool]
) -> WireEntry | None:
    """The wire entry for sending ``ref`` encoded, or None when plain bytes are better: the
    stored file must be at most ``ENCODED_RATIO`` of the plain size and its delta base (if
    any) must be on the remote once this push is done."""
    if ref.size == 0:
        return None
    stored = odb.store.stored_size(ref.oid)
    if stored > ENCODED_RATIO * ref.size:
        return None
    head = odb.header(ref.oid)
    if head.base_oid is not None and not base_available(head.base_oid):
        return None
    h = hashlib.sha256()
    with odb.store.open(ref.oid) as f:
        while buf := f.read(1 << 20):
            h.update(buf)
    return WireEntry(ref.oid, ObjectRef(h.hexdigest(), stored), head.base_oid)


def check_header(entry: WireEntry, head: ObjectHeader, size: int) -> None:
    """An encoded object must be what the index says: same size and same base."""
    if head.size != size or head.base_oid != entry.base:
        raise CorruptObjectError(
            f"encoded object {entry.wire.oid[:12]} for {entry.oid[:12]} does not match the wire "
            f"index (size {head.size} vs {size}, base {head.base_oid} vs {entry.base})",
            hint="the remote's index is wrong; push the object again from a clone that has it",
            oid=entry.oid,
        )


def store_encoded(odb: ObjectDB, entry: WireEntry, size: int, path: Path) -> None:
    """Put a downloaded encoded object into the store as ``entry.oid``, then decode it once
    (its base must be here) to prove it yields the logical bytes; on failure nothing stays."""
    with open(path, "rb") as f:
        check_header(entry, read_header(f), size)
        f.seek(0)
        with odb.store.writer(entry.oid, durable=False) as out:  # can be fetched again
            while buf := f.read(1 << 20):
                out.write(buf)
    try:
        odb.verify(entry.oid)
    except Exception:
        odb.store.delete(entry.oid)
        raise


def plan_fetch(
    lacking: Iterable[ObjectRef], index: Mapping[str, WireEntry], have: Callable[[str], bool]
) -> tuple[list[ObjectRef], list[list[tuple[ObjectRef, WireEntry]]]]:
    """Split what to download into plain objects and encoded ones in dependency levels (each
    level's bases are local or in an earlier level). Bases not asked for are added."""
    plain: dict[ObjectRef, None] = {}
    level_of: dict[str, int] = {}
    encoded: dict[str, tuple[ObjectRef, WireEntry]] = {}

    def visit(ref: ObjectRef, seen: frozenset[str]) -> int:
        if have(ref.oid) or ref in plain:
            return 0
        if ref.oid in level_of:
            return level_of[ref.oid]
        entry = index.get(ref.oid)
        if entry is None or ref.oid in seen:
            plain[ref] = None
            return 0
        depth = 0
        if entry.base is not None:
            depth = visit(ObjectRef(entry.base, ref.size), seen | {ref.oid})
        level_of[ref.oid] = depth + 1
        encoded[ref.oid] = (ref, entry)
        return depth + 1

    for ref in lacking:
        visit(ref, frozenset())
    n_levels = max(level_of.values(), default=0)
    levels: list[list[tuple[ObjectRef, WireEntry]]] = [[] for _ in range(n_levels)]
    for oid, (ref, entry) in sorted(encoded.items()):
        levels[level_of[oid] - 1].append((ref, entry))
    return list(plain), levels

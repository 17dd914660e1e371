"""Encoded objects on the wire: send a stored object's file (an XOR delta against an older
version, or zstd-compressed bytes) instead of its plain bytes when that is much smaller.

A remote object must be named by the sha256 of its content (that is what makes it a genuine
Git LFS object), so an encoded object travels under the hash of its *encoded* bytes, and a
**wire index** maps each logical object id to it::

    potluck wire index v1
    <logical oid> <wire oid> <wire size> <base oid or ->

A **bundle** (``ops.vcs.bundle``) is one wire object holding the stored files of many
standalone objects end to end, so a push of a whole checkpoint makes a few requests instead of
two per tensor; its members' lines (format v2) add where each one's file lies in it::

    potluck wire index v2
    <logical oid> <wire oid> <wire size> <base oid or -> [<offset> <length>]

An index without bundle members is written as v1, byte for byte as before.

The index is published next to the commits (``git.wireindex`` keeps it in a git ref) only
after every object it names has been uploaded. A receiver downloads the base chain first,
checks each encoded object's header against the index, stores it, then decodes it once to
verify that it yields exactly the logical bytes its id promises.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO

from potluck.config import MAX_DELTA_DEPTH
from potluck.errors import CorruptObjectError, FormatError, UserError
from potluck.objects.encoding import HEADER_SIZE, ObjectHeader, read_header
from potluck.objects.encoding import _write_header as write_header
from potluck.ops.vcs.odb import ObjectDB, copy_range
from potluck.remote import ObjectRef, ObjectRemote
from potluck.store.base import validate_oid

INDEX_MAGIC = b"potluck wire index v1\n"
#: an index with bundle members (lines with an offset and a length into their wire object)
INDEX_MAGIC_V2 = b"potluck wire index v2\n"
#: send the encoded form only when it is at most this fraction of the plain bytes
ENCODED_RATIO = 0.5
#: ... and a delta only when it is at most this fraction: a receiver without the delta base (a
#: fresh clone, when the base is an older version nothing current uses) downloads the base
#: too, up to 1 + DELTA_RATIO times the plain bytes, and decodes the chain
DELTA_RATIO = 0.25
#: a push sends encoded objects (and publishes a wire index for them) only when together they
#: save at least this fraction of the bytes it would send plain; less is not worth a ref
#: update on the remote and a decode on every receiver (a first push whose only compressible
#: objects are a few KiB of zero biases or a file's JSON header sends everything plain)
ENCODED_MIN_GAIN = 0.01
#: the deepest delta chain an index may make a receiver fetch (a sender's own chains are never
#: deeper than ``max_delta_depth``, at most ``MAX_DELTA_DEPTH``)
MAX_CHAIN = MAX_DELTA_DEPTH
#: the deepest delta chain a received object may decode through in the local store
MAX_STORED_DEPTH = 2 * MAX_DELTA_DEPTH


@dataclass(frozen=True)
class WireEntry:
    """One encoded object on a remote: logical id, the wire object, and its delta base;
    ``span`` (offset, length) when the object's file is one member of a bundle."""

    oid: str
    wire: ObjectRef
    base: str | None
    span: tuple[int, int] | None = None

    def line(self) -> str:
        """The index line of this entry."""
        text = f"{self.oid} {self.wire.oid} {self.wire.size} {self.base or '-'}"
        return text if self.span is None else f"{text} {self.span[0]} {self.span[1]}"

    @property
    def length(self) -> int:
        """Bytes of this object's encoded file (the whole wire object, or its span)."""
        return self.wire.size if self.span is None else self.span[1]


def parse_index(data: bytes) -> dict[str, WireEntry]:
    """Entries of one index blob (v1, or v2 with bundle members); ``FormatError`` on anything
    malformed, a member's span outside its wire object included."""
    v2 = data.startswith(INDEX_MAGIC_V2)
    if not (v2 or data.startswith(INDEX_MAGIC)):
        raise FormatError("not a potluck wire index", hint="the remote's index ref is damaged")
    out: dict[str, WireEntry] = {}
    for n, line in enumerate(data[len(INDEX_MAGIC) :].decode("ascii", "replace").splitlines()):
        fields = line.split(" ")
        try:
            entry = _parse_line(fields, v2)
        except (ValueError, UserError) as e:
            raise FormatError(
                f"wire index line {n + 2} is malformed: {line[:120]!r}",
                hint="the remote's index ref is damaged; objects are still checked on download",
            ) from e
        out[entry.oid] = entry
    return out


def _parse_line(fields: Sequence[str], v2: bool) -> WireEntry:
    """One index line's entry; ``ValueError`` / ``UserError`` when malformed."""
    if len(fields) not in ((4, 6) if v2 else (4,)):
        raise ValueError(f"{len(fields)} fields")
    oid, wire, size, base = fields[:4]
    ref = ObjectRef(validate_oid(wire), int(size))
    span = None
    if len(fields) == 6:
        offset, length = int(fields[4]), int(fields[5])
        if offset < 0 or length < HEADER_SIZE or offset + length > ref.size:
            raise ValueError(f"span {offset}+{length} outside a wire object of {ref.size} bytes")
        span = (offset, length)
    return WireEntry(validate_oid(oid), ref, None if base == "-" else validate_oid(base), span)


def dump_index(entries: Iterable[WireEntry]) -> bytes:
    """Canonical index text: sorted by logical id; v1 unless some entry is a bundle member."""
    unique = {e.oid: e for e in entries}
    magic = INDEX_MAGIC_V2 if any(e.span for e in unique.values()) else INDEX_MAGIC
    lines = sorted((oid, e.line()) for oid, e in unique.items())
    return magic + "".join(line + "\n" for _, line in lines).encode("ascii")


def encoded_candidate(
    odb: ObjectDB, ref: ObjectRef, base_available: Callable[[str], bool]
) -> WireEntry | None:
    """The wire entry for sending ``ref`` encoded, or None when plain bytes are better: the
    stored file must be at most ``ENCODED_RATIO`` of the plain size (``DELTA_RATIO`` for a
    delta) and its delta base (if any) must be on the remote once this push is done."""
    if ref.size == 0:
        return None
    stored = odb.store.stored_size(ref.oid)
    if stored > ENCODED_RATIO * ref.size:
        return None
    head = odb.header(ref.oid)
    if head.base_oid is not None and stored > DELTA_RATIO * ref.size:
        return None
    if head.base_oid is not None and not base_available(head.base_oid):
        return None
    h = hashlib.sha256()
    with odb.store.open(ref.oid) as f:
        while buf := f.read(1 << 20):
            h.update(buf)
    return WireEntry(ref.oid, ObjectRef(h.hexdigest(), stored), head.base_oid)


def worth_encoding(entries: Iterable[tuple[ObjectRef, WireEntry]], plain_bytes: int) -> bool:
    """Whether sending ``entries`` (object, wire entry) encoded saves at least
    ``ENCODED_MIN_GAIN`` of ``plain_bytes``, what the push would send with every object plain."""
    saved = sum(ref.size - entry.wire.size for ref, entry in entries)
    return saved > 0 and saved >= ENCODED_MIN_GAIN * plain_bytes


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
    """Put a downloaded encoded object (the wire file at ``path``, or ``entry.span`` of it)
    into the store as ``entry.oid``, then decode it once (its base must be here) to prove it
    yields the logical bytes; on failure nothing stays.

    Its delta chain in this store must not be deeper than ``MAX_STORED_DEPTH``; the header
    records the chain's real depth here (a sender's base may be stored differently)."""
    offset = entry.span[0] if entry.span else 0
    with open(path, "rb") as f:
        f.seek(offset)
        head = read_header(f)
        check_header(entry, head, size)
        depth = _depth_on(odb, entry)
        skip = 0 if depth == head.depth else HEADER_SIZE
        with odb.store.writer(entry.oid, durable=False) as out:  # can be fetched again
            if skip:
                write_header(out, replace(head, depth=depth))
            copy_exact(f, out, offset + skip, entry.length - skip)
    try:
        odb.verify(entry.oid)
    except Exception:
        odb.store.delete(entry.oid)
        raise


def copy_exact(src: BinaryIO, out: BinaryIO, offset: int, n: int) -> None:
    """Copy ``n`` bytes of the wire file ``src`` from ``offset`` to ``out``;
    ``CorruptObjectError`` if it ends first."""
    try:
        for buf in copy_range(src, offset, n, 1 << 20):
            out.write(buf)
    except EOFError as e:
        raise CorruptObjectError(
            f"the wire object is short: {e}",
            hint="the remote's wire index is wrong; push the object again",
        ) from e


def _depth_on(odb: ObjectDB, entry: WireEntry) -> int:
    """The delta depth ``entry``'s object gets in ``odb``: its base's chain, walked header by
    header (never recursively), plus one; refused beyond ``MAX_STORED_DEPTH``."""
    depth, base = 0, entry.base
    while base is not None:
        depth += 1
        if depth > MAX_STORED_DEPTH:
            raise CorruptObjectError(
                f"encoded object {entry.wire.oid[:12]} for {entry.oid[:12]} would decode "
                f"through more than {MAX_STORED_DEPTH} delta bases",
                hint="the remote's wire index is damaged; the plain object is fetched instead",
                oid=entry.oid,
            )
        base = odb.header(base).base_oid
    return depth


def plan_fetch(
    lacking: Iterable[ObjectRef],
    index: Mapping[str, WireEntry],
    have: Callable[[str], bool],
    max_chain: int = MAX_CHAIN,
) -> tuple[list[ObjectRef], list[list[tuple[ObjectRef, WireEntry]]]]:
    """Split what to download into plain objects and encoded ones in dependency levels (each
    level's bases are local or in an earlier level). Bases not asked for are added.

    Chains are walked iteratively and never deeper than ``max_chain`` levels: where an index
    chain loops or would go deeper, that object is fetched as plain bytes instead.
    """
    plain: dict[ObjectRef, None] = {}
    level_of: dict[str, int] = {}
    encoded: dict[str, tuple[ObjectRef, WireEntry]] = {}
    for ref in lacking:
        path, below = _chain_to_fetch(ref, index, have, plain, level_of, max_chain)
        for depth, (r, entry) in enumerate(reversed(path), start=below + 1):
            level_of[r.oid] = depth
            encoded[r.oid] = (r, entry)
    n_levels = max(level_of.values(), default=0)
    levels: list[list[tuple[ObjectRef, WireEntry]]] = [[] for _ in range(n_levels)]
    for oid, (ref, entry) in sorted(encoded.items()):
        levels[level_of[oid] - 1].append((ref, entry))
    return list(plain), levels


def _chain_to_fetch(
    ref: ObjectRef,
    index: Mapping[str, WireEntry],
    have: Callable[[str], bool],
    plain: dict[ObjectRef, None],
    level_of: Mapping[str, int],
    max_chain: int,
) -> tuple[list[tuple[ObjectRef, WireEntry]], int]:
    """The encoded objects to fetch for ``ref`` (newest first) and the level they sit on;
    the plain object the chain ends on, if any, is added to ``plain``."""
    path: list[tuple[ObjectRef, WireEntry]] = []
    seen: dict[str, int] = {}
    cur = ref
    while not have(cur.oid) and cur not in plain:
        if cur.oid in level_of:
            below = level_of[cur.oid]
            if below + len(path) <= max_chain:
                return path, below
            plain[path[-1][0]] = None  # too deep on top of that chain: cut it here
            return path[:-1], 0
        entry = index.get(cur.oid)
        if cur.oid in seen:  # the index loops: fetch this one plain
            path = path[: seen[cur.oid]]
            entry = None
        if entry is None or len(path) >= max_chain:
            plain[cur] = None
            break
        seen[cur.oid] = len(path)
        path.append((cur, entry))
        if entry.base is None:
            break
        cur = ObjectRef(entry.base, ref.size)
    return path, 0


@dataclass
class RemoteView:
    """What a remote really holds for some logical objects, checked on the remote itself (an
    index entry alone proves nothing: the store may have been replaced or emptied).

    ``present``: logical ids it can serve, as plain bytes or through a usable index entry;
    ``usable``: index entries whose wire object and whole base chain are there; ``stale``:
    logical ids whose index entry is not usable (wire object gone, chain broken or too deep).
    """

    present: set[str] = field(default_factory=set)
    usable: dict[str, WireEntry] = field(default_factory=dict)
    stale: set[str] = field(default_factory=set)


def verify_remote(
    remote: ObjectRemote, refs: Sequence[ObjectRef], index: Mapping[str, WireEntry]
) -> RemoteView:
    """Ask ``remote`` (one existence check: LFS batch, fsspec ``info``) for ``refs``, the
    wire objects of their index entries and those entries' delta bases (``MAX_CHAIN`` deep)."""
    members: dict[str, ObjectRef] = {}
    for ref in refs:
        cur: ObjectRef | None = ref
        for _ in range(MAX_CHAIN + 1):
            if cur is None or cur.oid in members:
                break
            members[cur.oid] = cur
            entry = index.get(cur.oid)
            cur = ObjectRef(entry.base, ref.size) if entry and entry.base else None
    asked = {r.oid: r for r in members.values()}
    for oid in members:
        if oid in index:
            asked.setdefault(index[oid].wire.oid, index[oid].wire)
    absent = {r.oid for r in remote.missing(list(asked.values()))} if asked else set()
    view = RemoteView()
    decided: dict[str, bool] = {}
    for oid in members:
        entry_ok = _entry_usable(oid, index, members, absent, decided)
        if oid in index and entry_ok:
            view.usable[oid] = index[oid]
        elif oid in index:
            view.stale.add(oid)
        if entry_ok or oid not in absent:
            view.present.add(oid)
    return view


def _entry_usable(
    oid: str,
    index: Mapping[str, WireEntry],
    members: Mapping[str, ObjectRef],
    absent: set[str],
    decided: dict[str, bool],
) -> bool:
    """Whether ``oid``'s index entry can be fetched and decoded from the remote: its wire
    object is there and its base is too (plain, or through a usable entry). Walked
    iteratively; ``decided`` memoises the answer for every entry on the way."""
    path: list[str] = []
    cur = oid
    while True:
        if cur in decided:
            result = decided[cur]
            break
        entry = index.get(cur)
        if entry is None or entry.wire.oid in absent or cur not in members or cur in path:
            result = False
            break
        path.append(cur)
        base = entry.base
        if base is None or (base in members and base not in absent):
            result = True  # standalone, or its base's plain bytes are there
            break
        cur = base  # the base must come through its own entry
    for step in path:
        decided[step] = result
    return decided.get(oid, False)

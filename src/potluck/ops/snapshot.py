"""Snapshot (git's *clean*): checkpoint file → objects in the store + a manifest.

The file is scanned by its format plugin (structure only), then read once segment by segment:
each segment is hashed; only segments whose hash is new are encoded and stored (a second read of
that range, from the page cache). A tensor with an earlier version under the same name in
``previous`` may be stored as a delta against it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from potluck.formats import scan_stream
from potluck.formats.base import Layout, RawSegment, Segment, TensorSegment
from potluck.objects.manifest import Entry, Manifest, RawEntry, TensorEntry, ViewEntry
from potluck.ops.odb import ObjectDB, copy_range
from potluck.tensors.dtypes import itemsize

PIECE = 1 << 22


@dataclass
class SnapshotStats:
    """Counts of what a snapshot stored."""

    segments: int = 0
    new_objects: int = 0
    logical_bytes: int = 0
    stored_bytes: int = 0


def hash_range(f: BinaryIO, offset: int, length: int) -> str:
    """sha256 of ``length`` bytes of ``f`` from ``offset``."""
    h = hashlib.sha256()
    for buf in copy_range(f, offset, length, PIECE):
        h.update(buf)
    return h.hexdigest()


def _element_size(seg: Segment) -> int:
    if isinstance(seg, TensorSegment):
        size = itemsize(seg.dtype)
        return size if size in (1, 2, 4, 8) else 1
    return 1


def _store_segment(
    f: BinaryIO, seg: Segment, odb: ObjectDB, base_oid: str | None, stats: SnapshotStats
) -> str:
    oid = hash_range(f, seg.offset, seg.length)
    res = odb.put(
        oid,
        lambda: copy_range(f, seg.offset, seg.length, PIECE),
        size=seg.length,
        itemsize=_element_size(seg),
        base_oid=base_oid,
    )
    stats.segments += 1
    stats.logical_bytes += seg.length
    if res.new:
        stats.new_objects += 1
        stats.stored_bytes += res.stored
    return oid


def layout_to_manifest(layout: Layout, oids: list[str]) -> Manifest:
    """Combine a scanned layout with the object id of each of its segments."""
    entries: list[Entry] = []
    for seg, oid in zip(layout.segments, oids, strict=True):
        if isinstance(seg, RawSegment):
            entries.append(RawEntry(oid, seg.length))
        else:
            entries.append(TensorEntry(seg.name, seg.dtype, seg.shape, oid, seg.length))
    views = tuple(
        ViewEntry(v.name, v.storage, v.dtype, v.shape, v.stride, v.offset) for v in layout.views
    )
    return Manifest(layout.format, layout.size, tuple(entries), views, dict(layout.metadata))


def snapshot(
    f: BinaryIO,
    size: int,
    odb: ObjectDB,
    previous: Manifest | None = None,
    *,
    name: str = "<stdin>",
    on_segment: Callable[[int], None] | None = None,
) -> tuple[Manifest, SnapshotStats]:
    """Store the checkpoint in the seekable file ``f`` and return its manifest.

    Nothing is stored when the file is malformed: it is scanned completely first.
    """
    layout = scan_stream(f, size, name=name)
    prev = previous.tensors() if previous else {}
    stats = SnapshotStats()
    oids: list[str] = []
    for seg in layout.segments:
        base = None
        if isinstance(seg, TensorSegment) and seg.name in prev:
            base = prev[seg.name].oid
        oids.append(_store_segment(f, seg, odb, base, stats))
        if on_segment is not None:
            on_segment(seg.length)
    return layout_to_manifest(layout, oids), stats


def scan_manifest(f: BinaryIO, size: int, *, name: str = "<stdin>") -> Manifest:
    """The manifest a file would get, computing hashes only (nothing is stored)."""
    layout = scan_stream(f, size, name=name)
    oids = [hash_range(f, s.offset, s.length) for s in layout.segments]
    return layout_to_manifest(layout, oids)

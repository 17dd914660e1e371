"""Snapshot (git's *clean*): checkpoint file → objects in the store + a manifest.

The file is scanned by its format plugin (structure only), then read once segment by segment:
each segment is hashed; only segments whose hash is new are encoded and stored (a second read of
that range, from the page cache). A tensor with an earlier version under the same name in
``previous`` may be stored as a delta against it. The small objects of one file are written in
one store batch (``ObjectStore.batch``: one pack file, synced once) that ends before the
manifest is returned.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import repeat
from operator import methodcaller
from pathlib import Path
from typing import BinaryIO, Protocol, cast

from potluck.errors import FormatError
from potluck.formats import HEAD_SIZE, detect, scan_stream
from potluck.formats.base import Layout, RawSegment, Segment, StreamableFormat, TensorSegment
from potluck.objects.manifest import Entry, Manifest, RawEntry, TensorEntry
from potluck.ops.vcs.odb import ObjectDB, PutResult, SmallObject, copy_range
from potluck.tensors.dtypes import grouping_size

PIECE = 1 << 22
#: New objects smaller than this are not flushed one by one (two fsyncs each: 20k tensors took
#: a minute): they go into the store's batch (one pack file, one fsync) that ends before the
#: file's manifest is returned.
BATCH_DURABLE_BELOW = 4 << 20
#: Consecutive segments of at most ``SMALL_SEGMENT`` bytes are read, hashed, encoded and stored
#: together, up to ``SMALL_BATCH`` bytes at a time (a file of 20k small tensors: no Python
#: round trip per tensor through the object database).
SMALL_SEGMENT = 256 << 10
SMALL_BATCH = 8 << 20


@dataclass
class SnapshotStats:
    """Counts of what a snapshot stored."""

    segments: int = 0
    new_objects: int = 0
    logical_bytes: int = 0
    stored_bytes: int = 0
    batched: int = 0  # new objects made durable by the store's batch, not one by one
    unsynced: int = 0  # new objects not durable when the snapshot returns (none: see ``batched``)


def hash_range(f: BinaryIO, offset: int, length: int) -> str:
    """sha256 of ``length`` bytes of ``f`` from ``offset``."""
    h = hashlib.sha256()
    for buf in copy_range(f, offset, length, PIECE):
        h.update(buf)
    return h.hexdigest()


def read_range(path: str | Path, offset: int, length: int) -> Iterator[bytes]:
    """``length`` bytes of the file at ``path`` from ``offset``, in pieces (opened lazily,
    closed at the end)."""
    with open(path, "rb") as f:
        yield from copy_range(f, offset, length, PIECE)


def _element_size(seg: Segment) -> int:
    return grouping_size(seg.dtype) if isinstance(seg, TensorSegment) else 1


def _store_segment(
    f: BinaryIO, seg: Segment, odb: ObjectDB, base_oid: str | None, stats: SnapshotStats
) -> str:
    return _put(f, seg.offset, seg, odb, base_oid, stats)[0]


def layout_to_manifest(layout: Layout, oids: list[str]) -> Manifest:
    """Combine a scanned layout with the object id of each of its segments."""
    entries: list[Entry] = []
    for seg, oid in zip(layout.segments, oids, strict=True):
        if isinstance(seg, RawSegment):
            entries.append(RawEntry(oid, seg.length))
        else:
            entries.append(TensorEntry(seg.name, seg.dtype, seg.shape, oid, seg.length))
    return Manifest(layout.format, layout.size, tuple(entries), layout.views, dict(layout.metadata))


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
    with odb.store.batch():
        for seg in layout.segments:
            base = None
            if isinstance(seg, TensorSegment) and seg.name in prev:
                base = prev[seg.name].oid
            oids.append(_store_segment(f, seg, odb, base, stats))
            if on_segment is not None:
                on_segment(seg.length)
    return layout_to_manifest(layout, oids), stats


STREAM_BUFFER = 32 << 20  # segments up to this size are held in memory while streaming


class Readable(Protocol):
    """Anything with ``read(n)`` returning bytes (a pipe, a file, a git packet reader)."""

    def read(self, n: int = -1, /) -> bytes:
        """Up to ``n`` bytes; empty at the end."""
        ...


def _read_exact(src: Readable, n: int) -> bytes:
    parts: list[bytes] = []
    left = n
    while left > 0:
        b = src.read(left)
        if not b:
            break
        parts.append(b)
        left -= len(b)
    return b"".join(parts)


class Chain:
    """Bytes already read, then the rest of a stream."""

    def __init__(self, first: bytes, rest: Readable) -> None:
        self.first = first
        self.rest = rest

    def read(self, n: int = -1, /) -> bytes:
        """Up to ``n`` bytes (everything left when negative)."""
        if not self.first:
            return self.rest.read(n)
        if n < 0:
            out, self.first = self.first + self.rest.read(), b""
            return out
        out, self.first = self.first[:n], self.first[n:]
        return out

    def readinto(self, out: memoryview) -> int:
        """Fill ``out`` (less only where the stream ends); return how many bytes came. A stream
        with ``readinto`` (a git packet reader, a file) fills it directly: one copy."""
        got = min(len(self.first), len(out))
        out[:got] = self.first[:got]
        self.first = self.first[got:]
        fill = getattr(self.rest, "readinto", None)  # ``Readable`` needs only ``read``
        while got < len(out):
            if fill is not None:
                n = fill(out[got:])
            else:
                piece = self.rest.read(len(out) - got)
                n = len(piece)
                out[got : got + n] = piece
            if not n:
                break
            got += n
        return got


def snapshot_stream(
    src: Readable,
    odb: ObjectDB,
    previous: Manifest | None,
    *,
    name: str,
    spill_dir: Path,
) -> tuple[Manifest, SnapshotStats]:
    """Snapshot a checkpoint read once from a stream (git's pipe).

    Streamable formats (safetensors) are hashed and stored segment by segment as the bytes
    arrive; others are spilled to a temporary file first. If the file turns out to be malformed
    (e.g. truncated), every object this call created is removed again.
    """
    with cycles_uncollected():
        return _snapshot_stream(src, odb, previous, name, spill_dir)


def _snapshot_stream(
    src: Readable, odb: ObjectDB, previous: Manifest | None, name: str, spill_dir: Path
) -> tuple[Manifest, SnapshotStats]:
    head = _read_exact(src, HEAD_SIZE)
    fmt = detect(head, sys.maxsize)
    if fmt is not None and not fmt.needs_random_access and hasattr(fmt, "scan_prefix"):
        sfmt = cast(StreamableFormat, fmt)
        need = sfmt.prefix_length(head)
        prefix = head[:need] + _read_exact(src, need - len(head)) if need > len(head) else head
        if len(prefix) >= need:
            layout = sfmt.scan_prefix(prefix[:need])
            return _stream_segments(
                Chain(prefix[need:], src), layout, prefix[:need], odb, previous, name, spill_dir
            )
        head = prefix
    with tempfile.TemporaryFile(dir=spill_dir) as spill:
        spill.write(head)
        while piece := src.read(PIECE):
            spill.write(piece)
        size = spill.tell()
        return snapshot(spill, size, odb, previous, name=name)


def _stream_segments(
    data: Chain,
    layout: Layout,
    prefix: bytes,
    odb: ObjectDB,
    previous: Manifest | None,
    name: str,
    spill_dir: Path,
) -> tuple[Manifest, SnapshotStats]:
    prev = previous.tensors() if previous else {}
    stats = SnapshotStats()
    created: list[str] = []
    oids: list[str] = []
    segments = layout.segments
    with odb.store.batch():  # an exception discards the batch (LocalStore: its pack)
        try:
            i = 0
            while i < len(segments):
                run = _small_run(segments, i, len(prefix), odb.config.chunk_bytes)
                if len(run) > 1:
                    done = _stream_small(data, run, odb, prev, stats, name)
                else:
                    seg = segments[i]
                    key = _named(seg)
                    base = prev[key].oid if key is not None and key in prev else None
                    done = [_stream_one(data, seg, prefix, odb, base, stats, name, spill_dir)]
                for oid, new in done:
                    oids.append(oid)
                    if new:
                        created.append(oid)
                i += len(run) or 1
            if data.read(1):
                raise FormatError(
                    f"{name}: the file continues past the {layout.size} bytes its header describes",
                    hint="the file is malformed (trailing data)",
                )
        except BaseException:
            odb.store.delete_many(created)
            raise
    return layout_to_manifest(layout, oids), stats


def _stream_one(
    data: Chain,
    seg: Segment,
    prefix: bytes,
    odb: ObjectDB,
    base: str | None,
    stats: SnapshotStats,
    name: str,
    spill_dir: Path,
) -> tuple[str, bool]:
    """Hash and store one segment read from the stream; returns (oid, created)."""
    if seg.offset < len(prefix):
        return _put_buffer(prefix[seg.offset : seg.offset + seg.length], seg, odb, base, stats)
    if seg.length <= STREAM_BUFFER:
        buf = _read_exact(data, seg.length)
        _check_length(buf, seg, name)
        return _put_buffer(buf, seg, odb, base, stats)
    with tempfile.TemporaryFile(dir=spill_dir) as spill:
        left = seg.length
        while left > 0:
            piece = data.read(min(PIECE, left))
            if not piece:
                break
            spill.write(piece)
            left -= len(piece)
        _check_length(b"" if left else b"x", seg, name, short=left)
        return _put(spill, 0, seg, odb, base, stats)


@contextlib.contextmanager
def cycles_uncollected() -> Iterator[None]:
    """Pause Python's cycle collector for a block that creates many acyclic objects (a segment,
    an entry and an object record per tensor): with 20k tensors its passes over the growing
    heap cost a tenth of the whole add. Reference counting still frees everything."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _small_run(segments: Sequence[Segment], start: int, after: int, chunk: int) -> list[Segment]:
    """The segments from ``start`` on that are stored together (``_stream_small``): each past
    the first ``after`` bytes, non-empty and at most ``SMALL_SEGMENT`` (and one chunk) long, up
    to ``SMALL_BATCH`` bytes in all."""
    run: list[Segment] = []
    total, most = 0, min(SMALL_SEGMENT, chunk)
    for seg in segments[start:]:
        if seg.offset < after or not 0 < seg.length <= most or total + seg.length > SMALL_BATCH:
            break
        run.append(seg)
        total += seg.length
    return run


def _stream_small(
    data: Chain,
    run: list[Segment],
    odb: ObjectDB,
    prev: dict[str, TensorEntry],
    stats: SnapshotStats,
    name: str,
) -> list[tuple[str, bool]]:
    """Read a run of small consecutive segments at once, hash each and store them together
    (``ObjectDB.put_small_many``); returns (oid, created) of each."""
    total = sum(seg.length for seg in run)
    buf = bytearray(total)
    del buf[data.readinto(memoryview(buf)) :]  # what the stream had
    if len(buf) < total:
        for seg in run:  # name the segment the stream ends in
            _check_length(buf[seg.offset - run[0].offset :][: seg.length], seg, name)
    view, start = memoryview(buf), run[0].offset
    pieces = [view[seg.offset - start : seg.offset - start + seg.length] for seg in run]
    oids = list(map(_hexdigest, map(hashlib.sha256, pieces)))
    items = list(map(SmallObject, oids, pieces, _element_sizes(run), _bases(run, prev)))
    results = odb.put_small_many(items, durable=False)
    new = [res for res in results if res.new]  # ``_record`` of each, summed
    stats.segments += len(run)
    stats.logical_bytes += total
    stats.new_objects += len(new)
    stats.stored_bytes += sum(res.stored for res in new)
    stats.batched += len(new)  # each is at most SMALL_SEGMENT < BATCH_DURABLE_BELOW bytes
    return [(res.oid, res.new) for res in results]


_hexdigest = methodcaller("hexdigest")


def _element_sizes(run: list[Segment]) -> list[int]:
    """``_element_size`` of each segment of ``run`` (looked up once per dtype)."""
    sizes: dict[str | None, int] = {}
    out = []
    for seg in run:
        dtype = seg.dtype if isinstance(seg, TensorSegment) else None
        size = sizes.get(dtype)
        if size is None:
            size = sizes[dtype] = _element_size(seg)
        out.append(size)
    return out


def _bases(run: list[Segment], prev: dict[str, TensorEntry]) -> Iterable[str | None]:
    """The delta base of each segment of ``run``: the object of the tensor of the same name in
    the previous version (None for raw bytes, a new name, or no previous version)."""
    if not prev:
        return repeat(None, len(run))
    return [prev[key].oid if (key := _named(seg)) in prev else None for seg in run]


def _named(seg: Segment) -> str | None:
    """The tensor name of a segment (None for raw bytes)."""
    return seg.name if isinstance(seg, TensorSegment) else None


def _check_length(
    buf: bytes | bytearray, seg: Segment, name: str, short: int | None = None
) -> None:
    missing = short if short is not None else seg.length - len(buf)
    if missing:
        what = f"tensor {seg.name!r}" if isinstance(seg, TensorSegment) else "the header"
        raise FormatError(
            f"{name}: the file ends {missing} bytes short inside {what}",
            hint="the file is truncated (an interrupted write or download?)",
        )


def _put_buffer(
    buf: bytes, seg: Segment, odb: ObjectDB, base: str | None, stats: SnapshotStats
) -> tuple[str, bool]:
    """Like ``_put`` for a segment held in memory (no copies for hashing or chunking)."""
    view = memoryview(buf)
    pieces = lambda: (view[i : i + PIECE] for i in range(0, len(view), PIECE))  # noqa: E731
    return _record(
        odb.put(
            hashlib.sha256(view).hexdigest(),
            pieces,
            size=seg.length,
            itemsize=_element_size(seg),
            base_oid=base,
            durable=seg.length >= BATCH_DURABLE_BELOW,
            dtype=seg.dtype if isinstance(seg, TensorSegment) else None,
            shape=seg.shape if isinstance(seg, TensorSegment) else None,
        ),
        seg,
        stats,
    )


def _record(res: PutResult, seg: Segment, stats: SnapshotStats) -> tuple[str, bool]:
    stats.segments += 1
    stats.logical_bytes += seg.length
    if res.new:
        stats.new_objects += 1
        stats.stored_bytes += res.stored
        stats.batched += seg.length < BATCH_DURABLE_BELOW
    return res.oid, res.new


def _put(
    f: BinaryIO,
    offset: int,
    seg: Segment,
    odb: ObjectDB,
    base: str | None,
    stats: SnapshotStats,
) -> tuple[str, bool]:
    """Hash ``seg.length`` bytes of ``f`` from ``offset`` and store them if new."""
    oid = hash_range(f, offset, seg.length)
    res = odb.put(
        oid,
        lambda: copy_range(f, offset, seg.length, PIECE),
        size=seg.length,
        itemsize=_element_size(seg),
        base_oid=base,
        durable=seg.length >= BATCH_DURABLE_BELOW,
        dtype=seg.dtype if isinstance(seg, TensorSegment) else None,
        shape=seg.shape if isinstance(seg, TensorSegment) else None,
    )
    return _record(res, seg, stats)


def scan_structure(f: BinaryIO, size: int, *, name: str = "<stdin>") -> Manifest:
    """The manifest a file would get but with empty object ids: its structure only (names,
    dtypes, shapes, sizes, views), read without hashing the tensors (for listings)."""
    layout = scan_stream(f, size, name=name)
    return layout_to_manifest(layout, [""] * len(layout.segments))


def scan_manifest(f: BinaryIO, size: int, *, name: str = "<stdin>") -> Manifest:
    """The manifest a file would get, computing hashes only (nothing is stored)."""
    layout = scan_stream(f, size, name=name)
    oids = [hash_range(f, s.offset, s.length) for s in layout.segments]
    return layout_to_manifest(layout, oids)

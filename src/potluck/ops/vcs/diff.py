"""Tensor-level diff of two manifests, with change statistics streamed in blocks."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from potluck.objects.manifest import Manifest, TensorEntry
from potluck.tensors.dtypes import to_numpy
from potluck.tensors.stats import Chunk, DeltaStats, stream_delta_stats
from potluck.tensors.views import View, view_array

#: ``read(name)``: the bytes of the manifest's tensor entry ``name`` (a tensor or a storage), in
#: pieces of any size; the whole tensor is never needed at once.
Reader = Callable[[str], Iterable[Chunk]]

#: A view that is not one contiguous run of its storage is copied out of it in memory, when
#: the storage range it spans and the view itself are at most this big; larger ones get no stats.
VIEW_COPY_LIMIT = 64 << 20


@dataclass(frozen=True)
class TensorChange:
    """One tensor that differs: ``status`` is added, removed, changed, reshaped or retyped."""

    name: str
    status: str
    old: str | None  # "F32[768,768]"
    new: str | None
    stats: DeltaStats | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON output."""
        d: dict[str, Any] = {
            "name": self.name,
            "status": self.status,
            "old": self.old,
            "new": self.new,
        }
        d["stats"] = self.stats.to_dict() if self.stats else None
        return d


def _sig(dtype: str, shape: tuple[int, ...]) -> str:
    return f"{dtype}[{','.join(map(str, shape))}]"


Described = dict[str, tuple[str, tuple[int, ...], str]]


def _described(m: Manifest, tensors: dict[str, TensorEntry] | None = None) -> Described:
    """name → (dtype, shape, identity key) for tensors and views."""
    t = m.tensors() if tensors is None else tensors
    out = {n: (e.dtype, e.shape, e.oid) for n, e in t.items()}
    for v in m.views:
        st = t.get(v.storage)
        key = f"{st.oid if st else '?'}:{v.offset}:{v.stride}"
        out[v.name] = (v.dtype, v.shape, key)
    return out


class _Side:
    """One manifest with its lookups built once, and a reader of its tensor bytes."""

    def __init__(self, m: Manifest | None, read: Reader | None) -> None:
        self.tensors = m.tensors() if m else {}
        self.views = {v.name: v for v in m.views} if m else {}
        self.described = _described(m, self.tensors) if m else {}
        self.read = read

    def chunks(self, name: str) -> Iterable[Chunk] | None:
        """The bytes of tensor or view ``name`` (None: a view too scattered to stream)."""
        if self.read is None:
            return None
        if name in self.tensors:
            return self.read(name)
        v = self.views[name]
        st = self.tensors.get(v.storage)
        if st is None:
            return None
        return _view_chunks(v, st, self.read)


def diff_manifests(
    old: Manifest | None,
    new: Manifest | None,
    read_old: Reader | None = None,
    read_new: Reader | None = None,
) -> list[TensorChange]:
    """Tensors added, removed or changed from ``old`` to ``new`` (sorted by name).

    With readers, changed tensors of equal shape get ``DeltaStats``, computed in blocks from
    the streamed bytes of both versions (memory does not grow with the tensor's size).
    """
    a, b = _Side(old, read_old), _Side(new, read_new)
    changes: list[TensorChange] = []
    for name in sorted(set(a.described) | set(b.described)):
        if name not in b.described:
            changes.append(TensorChange(name, "removed", _sig(*a.described[name][:2]), None))
        elif name not in a.described:
            changes.append(TensorChange(name, "added", None, _sig(*b.described[name][:2])))
        elif a.described[name] != b.described[name]:
            changes.append(_changed(name, a, b))
    return changes


def _changed(name: str, a: _Side, b: _Side) -> TensorChange:
    (da, sa, _), (db, sb, _) = a.described[name], b.described[name]
    status = "changed"
    if sa != sb:
        status = "reshaped"
    elif da != db:
        status = "retyped"
    stats = None
    if sa == sb:
        old, new = a.chunks(name), b.chunks(name)
        if old is not None and new is not None:
            numel = int(np.prod(sa, dtype=np.int64))
            stats = stream_delta_stats(old, new, to_numpy(da), to_numpy(db), numel, name=name)
    return TensorChange(name, status, _sig(da, sa), _sig(db, sb), stats)


def byte_range(pieces: Iterable[Chunk], start: int, stop: int) -> Iterator[memoryview]:
    """Bytes ``[start, stop)`` of a stream of pieces; the rest of the stream is still read
    (a verifying reader checks its hash at the end)."""
    pos = 0
    for piece in pieces:
        view = memoryview(piece).cast("B")
        lo, hi = max(start - pos, 0), min(stop - pos, len(view))
        if lo < hi:
            yield view[lo:hi]
        pos += len(view)


def _c_contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    expect = 1
    for d, s in zip(reversed(shape), reversed(stride), strict=True):
        if d != 1 and s != expect:
            return False
        expect *= d
    return True


def _view_chunks(v: View, storage: TensorEntry, read: Reader) -> Iterable[Chunk] | None:
    """A view's bytes: a contiguous view is a byte range of its storage, streamed; a strided
    one is copied out of the storage range it spans when that is small enough."""
    item = to_numpy(v.dtype).itemsize
    numel = int(np.prod(v.shape, dtype=np.int64))
    if numel == 0:
        return []
    if v.offset >= 0 and _c_contiguous(v.shape, v.stride):
        start, stop = v.offset * item, (v.offset + numel) * item
        return byte_range(read(storage.name), start, stop) if stop <= storage.size else None
    if any(s < 0 for s in v.stride) or v.offset < 0:
        return None
    need = v.offset + sum((d - 1) * s for d, s in zip(v.shape, v.stride, strict=True)) + 1
    if need * item > min(storage.size, VIEW_COPY_LIMIT) or numel * item > VIEW_COPY_LIMIT:
        return None
    data = bytearray(need * item)
    pos = 0
    for piece in byte_range(read(storage.name), 0, need * item):
        data[pos : pos + len(piece)] = piece
        pos += len(piece)
    flat = np.frombuffer(data, dtype=to_numpy(v.dtype))
    return [view_array(flat, v.name, v.storage, v.shape, v.stride, v.offset).tobytes()]


def unchanged_count(old: Manifest | None, new: Manifest | None) -> int:
    """Number of tensors identical on both sides."""
    if old is None or new is None:
        return 0
    a, b = _described(old), _described(new)
    return sum(1 for n in a if n in b and a[n] == b[n])


__all__ = ["Reader", "TensorChange", "byte_range", "diff_manifests", "unchanged_count"]

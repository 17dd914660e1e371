"""Summary statistics of a change between two arrays (pure numpy), computed in blocks.

The statistics are sums and maxima over elements, so they are accumulated over blocks of
``BLOCK_ELEMENTS`` elements: memory is a few blocks whatever the tensor's size, and the same
code serves arrays in memory (``delta_stats``) and tensors streamed as bytes from a store or a
file (``stream_delta_stats``).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from potluck.errors import FormatError

#: Elements per block: the float64 temporaries of one block are 4 MiB each (8 for complex).
BLOCK_ELEMENTS = 1 << 19

Chunk = bytes | bytearray | memoryview


@dataclass(frozen=True)
class DeltaStats:
    """How ``new`` differs from ``old`` (same shape): norms are of float64 copies."""

    l2: float  # ‖new − old‖₂
    rel: float  # ‖new − old‖₂ / ‖old‖₂ (inf when old is zero and the change is not)
    frac_changed: float  # fraction of entries whose bit pattern changed
    max_abs: float  # max |new − old|
    numel: int

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON output."""
        return asdict(self)


def _as_float(a: np.ndarray) -> np.ndarray:
    """float64 copy (complex tensors keep their complex values as complex128)."""
    return a.astype(np.complex128 if a.dtype.kind == "c" else np.float64)


def _bits(a: np.ndarray) -> np.ndarray:
    """The elements' bit patterns as one unsigned integer each (rows of bytes for 16-byte
    elements)."""
    size = a.dtype.itemsize
    if size in (1, 2, 4, 8):
        return a.view(np.dtype(f"<u{size}"))
    return a.view(np.uint8).reshape(-1, size)


def _fsum(parts: list[float]) -> float:
    """Exact sum of the block partial sums (plain sum when one is inf or NaN)."""
    if all(math.isfinite(p) for p in parts):
        return math.fsum(parts)
    return float(sum(parts))


class DeltaAccumulator:
    """Running ``DeltaStats`` of ``new - old`` fed block by block (1-D arrays of equal length).

    Bit-pattern changes are counted when both dtypes are equal, value changes otherwise; the
    squared norms are summed per block in float64 and the block sums added exactly.
    """

    def __init__(self, old_dtype: np.dtype, new_dtype: np.dtype) -> None:
        self.same = np.dtype(old_dtype) == np.dtype(new_dtype)
        self.numel = 0
        self.changed = 0
        self.sq_delta: list[float] = []
        self.sq_old: list[float] = []
        self.max_abs = np.float64(0.0)

    def add(self, old: np.ndarray, new: np.ndarray) -> None:
        """Account for one block (``old`` and ``new`` are 1-D and equally long)."""
        if old.shape != new.shape or old.ndim != 1:
            raise ValueError(f"blocks must be 1-D of equal length, got {old.shape}, {new.shape}")
        if old.size == 0:
            return
        self.numel += int(old.size)
        fo, fn = _as_float(old), _as_float(new)
        if self.same:
            ob, nb = _bits(old), _bits(new)
            diff = ob != nb
            self.changed += int(np.count_nonzero(diff if diff.ndim == 1 else diff.any(axis=1)))
        else:
            self.changed += int(np.count_nonzero(fo != fn))
        with np.errstate(invalid="ignore", over="ignore"):
            # the copies are ours: computed in place (unless only the old one is complex)
            d = np.subtract(fn, fo, out=fn) if fn.dtype == np.result_type(fn, fo) else fn - fo
            if d.dtype.kind == "c":
                d, fo = np.abs(d), np.abs(fo)
                top = np.max(d)
            else:  # |x| is exact for reals: max |d| = max(max d, -min d), |x|² = x²
                top = np.maximum(np.max(d), -np.min(d))
            self.max_abs = np.maximum(self.max_abs, top)  # NaN wins, as in np.max
            self.sq_delta.append(float(np.sum(np.square(d, out=d))))
            self.sq_old.append(float(np.sum(np.square(fo, out=fo))))

    def result(self) -> DeltaStats:
        """The statistics of everything added so far."""
        n = self.numel
        if n == 0:
            return DeltaStats(0.0, 0.0, 0.0, 0.0, 0)
        l2 = math.sqrt(_fsum(self.sq_delta))
        base = math.sqrt(_fsum(self.sq_old))
        rel = l2 / base if base > 0 else (0.0 if l2 == 0 else float("inf"))
        return DeltaStats(l2, rel, self.changed / n, float(self.max_abs), n)


def delta_stats(old: np.ndarray, new: np.ndarray, block: int = BLOCK_ELEMENTS) -> DeltaStats:
    """Statistics of ``new - old``; both must have the same shape (dtype may differ)."""
    if old.shape != new.shape:
        raise ValueError(f"shape mismatch {old.shape} vs {new.shape}")
    acc = DeltaAccumulator(old.dtype, new.dtype)
    a, b = old.reshape(-1), new.reshape(-1)
    for start in range(0, a.size, block):
        acc.add(a[start : start + block], b[start : start + block])
    return acc.result()


class _ElementReader:
    """Blocks of whole elements out of a stream of byte pieces cut anywhere."""

    def __init__(self, pieces: Iterable[Chunk], dtype: np.dtype, what: str) -> None:
        self.pieces: Iterator[Chunk] = iter(pieces)
        self.dtype = np.dtype(dtype)
        self.what = what
        self.pending: deque[memoryview] = deque()
        self.buffered = 0

    def take(self, count: int) -> np.ndarray:
        """The next ``count`` elements (a fresh array)."""
        want = count * self.dtype.itemsize
        while self.buffered < want:
            piece = next(self.pieces, None)
            if piece is None:
                raise FormatError(
                    f"{self.what} ends {want - self.buffered} bytes early",
                    hint="the file or object is truncated; run `potluck fsck`",
                )
            view = memoryview(piece).cast("B")
            if len(view):
                self.pending.append(view)
                self.buffered += len(view)
        out = bytearray(want)
        pos = 0
        while pos < want:
            view = self.pending.popleft()
            n = min(len(view), want - pos)
            out[pos : pos + n] = view[:n]
            if n < len(view):
                self.pending.appendleft(view[n:])
            pos += n
        self.buffered -= want
        return np.frombuffer(out, dtype=self.dtype)

    def finish(self) -> None:
        """Check that nothing is left (drains the stream, so a verifying reader verifies)."""
        extra = self.buffered + sum(len(memoryview(p).cast("B")) for p in self.pieces)
        if extra:
            raise FormatError(
                f"{self.what} holds {extra} bytes more than its shape needs",
                hint="the file or object is inconsistent; run `potluck fsck`",
            )


def stream_delta_stats(
    old: Iterable[Chunk],
    new: Iterable[Chunk],
    old_dtype: np.dtype,
    new_dtype: np.dtype,
    numel: int,
    *,
    block: int = BLOCK_ELEMENTS,
    name: str = "tensor",
) -> DeltaStats:
    """``delta_stats`` of two tensors of ``numel`` elements given as little-endian C-order
    bytes cut into pieces anywhere (a store's chunks, a file's reads); at most a few blocks of
    ``block`` elements are in memory. A stream of the wrong length raises ``FormatError``."""
    acc = DeltaAccumulator(old_dtype, new_dtype)
    a = _ElementReader(old, old_dtype, f"the old version of {name!r}")
    b = _ElementReader(new, new_dtype, f"the new version of {name!r}")
    left = numel
    while left > 0:
        k = min(block, left)
        acc.add(a.take(k), b.take(k))
        left -= k
    a.finish()
    b.finish()
    return acc.result()

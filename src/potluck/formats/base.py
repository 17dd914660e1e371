"""The checkpoint-format plugin interface.

A format never loads tensor data. It reads a file's small structural parts (headers, zip
directories, pickles) and describes the whole file as an ordered list of byte *segments* that
exactly tile it: ``RawSegment`` (structure: headers, padding, pickles; stored verbatim) and
``TensorSegment`` (the little-endian bytes of one tensor or storage). Concatenating the segments'
bytes in order gives the file back byte for byte, which is how potluck reproduces checkpoints
exactly. ``View`` records describe tensors that live inside a shared storage (PyTorch views,
tied weights).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import BinaryIO, Protocol

from potluck.errors import FormatError, PotluckError
from potluck.tensors.views import View


@dataclass(frozen=True)
class RawSegment:
    """Bytes ``[offset, offset+length)`` of the file, kept verbatim."""

    offset: int
    length: int


@dataclass(frozen=True, init=False)
class TensorSegment:
    """Bytes ``[offset, offset+length)`` hold the tensor ``name`` (little-endian, C order)."""

    offset: int
    length: int
    name: str
    dtype: str  # canonical name, see potluck.tensors.dtypes
    shape: tuple[int, ...]

    def __init__(self, offset: int, length: int, name: str, dtype: str, shape: tuple[int, ...]):
        # Fields set through ``__dict__``: a frozen dataclass's own ``__init__`` calls
        # ``object.__setattr__`` once per field, which costs a file of 20k tensors ~15 ms.
        d = self.__dict__
        d["offset"], d["length"], d["name"], d["dtype"], d["shape"] = (
            offset, length, name, dtype, shape
        )  # fmt: skip


Segment = RawSegment | TensorSegment


@dataclass(frozen=True)
class Layout:
    """What a format found in a file: its name, total size, segments and views."""

    format: str
    size: int
    segments: tuple[Segment, ...]
    views: tuple[View, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)

    def tensor_segments(self) -> list[TensorSegment]:
        """Only the tensor segments, in file order."""
        return [s for s in self.segments if isinstance(s, TensorSegment)]


class StreamableFormat(Protocol):
    """A format whose structure is a prefix of the file, followed by its segments in order.

    Such files are snapshotted straight from a stream (git's pipe) with no spill to disk.
    """

    def prefix_length(self, head: bytes) -> int:
        """How many bytes from the start ``scan_prefix`` needs, judged from ``head``."""
        ...

    def scan_prefix(self, prefix: bytes) -> Layout:
        """``scan`` from the prefix alone; ``Layout.size`` is the size the prefix implies."""
        ...


class CheckpointFormat(Protocol):
    """A checkpoint file format (safetensors, PyTorch zip, npz, …)."""

    name: str
    #: True when ``scan`` needs to seek anywhere in the file (zip central directory at the end);
    #: False when it reads only a prefix and tensor data follows in segment order (safetensors).
    needs_random_access: bool

    def sniff(self, head: bytes, size: int) -> bool:
        """True if a file starting with ``head`` (first ≤ 4096 bytes) and of ``size`` bytes is
        in this format. Must be cheap and must not raise."""
        ...

    def scan(self, f: BinaryIO, size: int) -> Layout:
        """Describe the file open as ``f`` (positioned at 0) of ``size`` bytes.

        Raises ``FormatError`` with a precise message on anything malformed: truncated data,
        header lengths past the end, overlapping or out-of-order tensors, unknown dtypes,
        pickles that would need code execution. Must not read tensor data when
        ``needs_random_access`` is False (it reads only up to the first tensor's offset).
        """
        ...


def naming(error: PotluckError, source: str) -> PotluckError:
    """``error`` with its message prefixed by ``source`` (a file), unless it names it already.

    Same class, hint and data (``source`` added).
    """
    if source in error.message:
        return error
    data = {**error.data, "source": source}
    try:
        renamed = type(error)(f"{source}: {error.message}", hint=error.hint, **data)
    except TypeError:  # a subclass with its own constructor
        renamed = PotluckError(f"{source}: {error.message}", hint=error.hint, **data)
    return renamed


def brief(value: object, limit: int = 60) -> str:
    """A short description of a value read from a file, for error messages.

    Never the full ``repr`` of an untrusted value: that can be huge, nested too deeply to
    print, or (a shared list nested 40 times) take exponential time.
    """
    if value is None or isinstance(value, (bool, float, complex)):
        return repr(value)
    if isinstance(value, int):
        return repr(value) if value.bit_length() <= 64 else f"<{value.bit_length()}-bit integer>"
    if isinstance(value, (str, bytes)):
        text = repr(value[:limit])
        return text if len(value) <= limit else f"{text}… ({len(value)} long)"
    if isinstance(value, (list, tuple)) and len(value) <= 8 and all(map(_small, value)):
        return repr(value)
    if isinstance(value, (list, tuple, dict, set, frozenset)):
        return f"<{type(value).__name__} of {len(value)} items>"
    return f"<{type(value).__name__}>"


def _small(x: object) -> bool:
    if isinstance(x, int):
        return x.bit_length() <= 64
    return x is None or isinstance(x, float) or (isinstance(x, str) and len(x) <= 24)


def check_shape(fmt: str, name: str, shape: tuple[int, ...]) -> None:
    """Refuse a shape numpy cannot represent (empty tensors with absurd dimensions included)."""
    n = 1
    for d in shape:
        n *= max(d, 1)
        if n > MAX_ELEMENTS:
            raise FormatError(
                f"{fmt}: tensor {brief(name)} has an impossible shape "
                f"({len(shape)} dimensions, more than 2**56 elements)",
                hint="the file is corrupt or was crafted",
            )


#: Most elements (product of the dimensions, zeros counted as 1) a tensor may have.
MAX_ELEMENTS = 1 << 56


def check_tiling(fmt: str, size: int, segments: list[Segment]) -> tuple[Segment, ...]:
    """Validate that ``segments`` tile ``[0, size)`` exactly, in order; merge adjacent raw ones.

    Zero-length raw segments are dropped. Raises ``FormatError`` on a gap or an overlap.
    """
    out: list[Segment] = []
    pos = 0
    for seg in segments:
        if seg.offset != pos:
            kind = "overlaps" if seg.offset < pos else "leaves a gap before"
            raise FormatError(
                f"{fmt}: segment at byte {seg.offset} {kind} byte {pos}",
                hint="the file is malformed (overlapping or out-of-range offsets)",
            )
        if seg.length < 0:
            raise FormatError(f"{fmt}: negative length at byte {seg.offset}")
        pos += seg.length
        if isinstance(seg, RawSegment):
            if seg.length == 0:
                continue
            if out and isinstance(out[-1], RawSegment):
                prev = out.pop()
                seg = RawSegment(prev.offset, prev.length + seg.length)
        out.append(seg)
    if pos != size:
        raise FormatError(
            f"{fmt}: segments end at byte {pos} but the file has {size} bytes",
            hint="the file is truncated or has trailing data the format does not describe",
        )
    return tuple(out)


__all__ = [
    "MAX_ELEMENTS",
    "CheckpointFormat",
    "Layout",
    "RawSegment",
    "Segment",
    "StreamableFormat",
    "TensorSegment",
    "View",
    "brief",
    "check_shape",
    "check_tiling",
    "naming",
]

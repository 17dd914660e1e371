"""Physical encoding of stored objects (object file formats v1 to v4).

An object's id is the sha256 of its *logical* bytes; this module decides only how those bytes
are laid out on disk. Decoding always yields the logical bytes back bit for bit.

File layout (all integers little-endian)::

    offset size  field
    0      4     magic b"PLKO"
    4      1     u8  version: 1; 2 with a model section; 3 and 4 are 1 and 2 whose chunks
                     may also be of kind 5
    5      1     u8  itemsize: element width used for byte grouping (1, 2, 4 or 8)
    6      1     u8  depth: 0 = standalone, n = length of the delta chain below this object
    7      1     u8  reserved, 0
    8      8     u64 logical size in bytes (a multiple of itemsize)
    16     4     u32 chunk_size: logical bytes per chunk (a multiple of itemsize)
    20     32    base oid as a raw sha256 digest (all zero when depth == 0)
    52     ...   versions 2 and 4: u32 length L, then L bytes of model (``objects.structured``)
    ...    ...   one record per chunk: u8 kind, u32 payload length, payload

Chunk ``i`` holds logical bytes ``[i * chunk_size, min(size, (i + 1) * chunk_size))``, so the
boundaries depend only on ``size`` and ``chunk_size``: a base and a delta of equal size line up
chunk by chunk. Chunk kinds:

* 0 ``KIND_RAW``: the logical bytes verbatim.
* 1 ``KIND_GROUPED``: bytes grouped by position inside the element (byte 0 of every element,
  then byte 1, …), then one zstd frame.
* 2 ``KIND_XOR``: XOR with the same chunk of the base object's logical bytes, grouped, zstd.
* 3 ``KIND_SAME``: identical to the base chunk; the payload is empty.
* 4 ``KIND_MODEL`` (versions 2 and 4): the residual of the chunk against the model's
  reconstruction from the same chunk of the base (``structured.residual``), grouped, zstd.
* 5 ``KIND_DIFF`` (versions 3 and 4, itemsize 2 or 4): the zigzagged integer difference of
  the elements' bit patterns and the base's, one stream per byte plane, each zstd or verbatim
  (``objects.streams``).

Version 2 objects are written only for a matrix whose update a low-rank or scale model
describes (``structdetect.best_model``) and only when that is smaller. A delta chunk is stored
as a difference (kind 5) instead of an XOR (kind 2) only when a sample of the chunk says it is
smaller (the whole chunk when it is small); an object with such a chunk gets version 3 (or 4
with a model), written over the header once the chunks are out. Every other object is version
1 or 2, byte for byte as before (readers that know only those read all of them and refuse the
others as an unsupported version).

zstd frames carry their content size and a checksum. Nothing here holds more than a couple of
chunks in memory, whatever the object size or the depth of the delta chain.
"""

from __future__ import annotations

import hashlib
import struct
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass, replace
from operator import itemgetter, methodcaller
from typing import Any, BinaryIO

import zstandard

from potluck.errors import CorruptObjectError
from potluck.objects import streams
from potluck.objects.structured import HEAD_SIZE as MODEL_HEAD_SIZE
from potluck.objects.structured import (
    Model,
    add_residual,
    parse_model,
    reconstruct_array,
    residual,
    section_length,
)

MAGIC = b"PLKO"
VERSION = 1
VERSION_MODEL = 2
VERSION_DIFF = 3
VERSION_MODEL_DIFF = 4
VERSIONS = (VERSION, VERSION_MODEL, VERSION_DIFF, VERSION_MODEL_DIFF)
KIND_RAW = 0
KIND_GROUPED = 1
KIND_XOR = 2
KIND_SAME = 3
KIND_MODEL = 4
KIND_DIFF = 5
_BASE_KINDS = (KIND_XOR, KIND_SAME, KIND_MODEL, KIND_DIFF)
ITEMSIZES = (1, 2, 4, 8)
MAX_DEPTH = 255

_HEADER = struct.Struct("<4sBBBBQI32s")
_CHUNK = struct.Struct("<BI")
_SECTION = struct.Struct("<I")
HEADER_SIZE = _HEADER.size
CHUNK_HEADER_SIZE = _CHUNK.size
_ZERO_DIGEST = bytes(32)
_FSCK_HINT = "run `potluck fsck` to find damaged objects and restore them from a remote"
# Keep a standalone candidate only when zstd saves more than 2%; stop trying once XOR saves half.
_RAW_RATIO = 0.98
_XOR_GOOD_ENOUGH = 0.5
_MODEL_GOOD_ENOUGH = 0.25
# Between those, a compressed sample of the chunk decides whether a full standalone try can pay.
_SAMPLE_BYTES = 256 * 1024
_SAMPLE_MARGIN = 0.05
# XOR or difference: _DIFF_SPANS spans of a chunk compressed both ways decide (the whole chunk,
# when it is under twice that); a difference must be this much smaller to be chosen.
_DIFF_SPAN = 32 * 1024
_DIFF_SPANS = 4
_DIFF_MARGIN = 0.99
# A standalone chunk of at most TINY_CHUNK bytes (a bias, a norm, the tail of a tensor) is
# compressed at zstd's fast level TINY_LEVEL whatever the configured level: for a few KiB the
# frame's set-up costs more CPU than the ratio it buys (all-MiniLM-L6-v2's 65 tensors under 16 KiB:
# level 1 stores 89.1 % of their bytes, level -1 92.6 %, at a quarter of the CPU time), and a
# file of many thousand small tensors is added about a tenth faster.
TINY_CHUNK = 16 * 1024
TINY_LEVEL = -1
# A batch of at least SMALL_SAMPLE_MIN small objects (``encode_small_many``) is first compressed
# at every k-th of them, SMALL_SAMPLES in all: when not one of those saves more than 2 %, the
# whole batch is stored raw without compressing the rest. Random-looking tensors then cost no
# zstd work (it was a fifth of the CPU of adding 20k of them); a compressible object the sample
# misses in such a batch is stored raw (with no sampled hit, fewer than about 3/64 of the batch
# are compressible at 95 % confidence).
SMALL_SAMPLES = 64
SMALL_SAMPLE_MIN = 4 * SMALL_SAMPLES

Chunk = bytes | bytearray | memoryview
OpenBase = Callable[[str], Iterator[bytes]]


@dataclass(frozen=True)
class ObjectHeader:
    """Fixed-size header of an object file."""

    version: int
    itemsize: int
    depth: int
    size: int
    chunk_size: int
    base_oid: str | None

    @property
    def n_chunks(self) -> int:
        """Number of chunk records that follow the header."""
        return -(-self.size // self.chunk_size)

    def chunk_length(self, index: int) -> int:
        """Logical length of chunk ``index`` (only the last one may be shorter)."""
        return min(self.chunk_size, self.size - index * self.chunk_size)


@dataclass(frozen=True)
class EncodeStats:
    """What ``encode_object`` wrote: sizes, resulting delta depth and chunk counts per kind."""

    size: int
    stored_size: int
    depth: int
    base_oid: str | None
    raw_chunks: int
    grouped_chunks: int
    xor_chunks: int
    same_chunks: int
    model_chunks: int = 0
    model: str | None = None  # ``Model.kind`` of a version 2 or 4 object
    diff_chunks: int = 0

    @property
    def chunks(self) -> int:
        """Total number of chunks."""
        return (
            self.raw_chunks
            + self.grouped_chunks
            + self.xor_chunks
            + self.same_chunks
            + self.model_chunks
            + self.diff_chunks
        )


def has_model(version: int) -> bool:
    """Whether objects of this format version carry a model section (versions 2 and 4)."""
    return version in (VERSION_MODEL, VERSION_MODEL_DIFF)


def chunk_kinds(version: int) -> tuple[int, ...]:
    """The chunk kinds an object of this format version may hold."""
    kinds = [KIND_RAW, KIND_GROUPED, KIND_XOR, KIND_SAME]
    if has_model(version):
        kinds.append(KIND_MODEL)
    if version in (VERSION_DIFF, VERSION_MODEL_DIFF):
        kinds.append(KIND_DIFF)
    return tuple(kinds)


# --- pure helpers -------------------------------------------------------------------------------


def byte_group(buf: Chunk, itemsize: int) -> bytes:
    """Transpose ``buf`` so byte 0 of every element comes first, then byte 1, and so on."""
    if itemsize == 1:
        return bytes(buf)
    import numpy as np  # here: a filter that only adds small tensors never needs it

    return np.frombuffer(buf, np.uint8).reshape(-1, itemsize).T.tobytes()


def byte_ungroup(buf: Chunk, itemsize: int) -> bytes:
    """Inverse of ``byte_group``."""
    if itemsize == 1:
        return bytes(buf)
    out = _ungrouped(buf, itemsize)
    del buf  # a temporary argument is freed before the copy out
    return bytes(out.tobytes())


def _ungrouped(buf: Chunk, itemsize: int) -> Any:
    """``byte_ungroup`` as a new writable uint8 array (itemsize 2 to 8), not yet copied out."""
    import numpy as np

    planes = np.frombuffer(buf, np.uint8).reshape(itemsize, -1)
    out = np.empty((planes.shape[1], itemsize), np.uint8)
    for i in range(itemsize):  # one strided copy per plane beats a transposed tobytes()
        out[:, i] = planes[i]
    return out.reshape(-1)


def _xor_into(out: Any, other: Chunk) -> None:
    """``out`` (a writable uint8 array) ^= ``other`` (as long), eight bytes at a time."""
    import numpy as np

    y = np.frombuffer(other, np.uint8)
    n8 = len(out) // 8 * 8
    np.bitwise_xor(out[:n8].view(np.uint64), y[:n8].view(np.uint64), out=out[:n8].view(np.uint64))
    np.bitwise_xor(out[n8:], y[n8:], out=out[n8:])


def _ungroup_xor(grouped: bytes, itemsize: int, base: Chunk | None) -> bytes:
    """``byte_ungroup(grouped)``, XORed with ``base`` when given: the XOR is done in the
    ungrouped work array, so a decoded chunk costs one work array and its bytes, not four
    chunk-sized buffers (the same bits as ``xor_bytes(byte_ungroup(...), base)``)."""
    if itemsize == 1:
        return grouped if base is None else xor_bytes(grouped, base)
    out = _ungrouped(grouped, itemsize)
    del grouped  # the caller passed its only reference: freed before the copy out
    if base is not None:
        if len(base) != len(out):
            raise ValueError(f"xor_bytes needs equal lengths, got {len(out)} and {len(base)}")
        _xor_into(out, base)
    return bytes(out.tobytes())


def xor_bytes(a: Chunk, b: Chunk) -> bytes:
    """Bytewise XOR of two equally long buffers."""
    if len(a) != len(b):
        raise ValueError(f"xor_bytes needs equal lengths, got {len(a)} and {len(b)}")
    import numpy as np

    x = np.frombuffer(a, np.uint8)
    y = np.frombuffer(b, np.uint8)
    n8 = len(x) // 8 * 8
    out = np.empty(len(x), np.uint8)
    np.bitwise_xor(x[:n8].view(np.uint64), y[:n8].view(np.uint64), out=out[:n8].view(np.uint64))
    np.bitwise_xor(x[n8:], y[n8:], out=out[n8:])
    return out.tobytes()


def grouped_xor(a: Chunk, b: Chunk, itemsize: int) -> Any:
    """``byte_group(xor_bytes(a, b), itemsize)`` as one buffer (a uint8 array for itemsize 2 to
    8): the XOR is written grouped, so one chunk-sized buffer is made instead of three."""
    if itemsize == 1:
        return xor_bytes(a, b)
    if len(a) != len(b):
        raise ValueError(f"xor_bytes needs equal lengths, got {len(a)} and {len(b)}")
    import numpy as np

    x = np.frombuffer(a, np.uint8).reshape(-1, itemsize).T
    y = np.frombuffer(b, np.uint8).reshape(-1, itemsize).T
    out = np.empty(x.shape, np.uint8)
    np.bitwise_xor(x, y, out=out)
    return out.reshape(-1)


def rechunk(pieces: Iterable[Chunk], chunk_size: int) -> Iterator[bytes]:
    """Re-cut arbitrary byte pieces into ``chunk_size`` chunks (the last one may be shorter).

    Pieces that already are whole chunks pass through without a copy.
    """
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    pending = bytearray()
    held: Chunk | None = None  # a short first piece, not copied until another one comes
    for piece in pieces:
        if held is not None:
            pending += memoryview(held).cast("B")
            held = None
        if isinstance(piece, bytes) and not pending and len(piece) == chunk_size:
            yield piece
            continue
        if not pending and 0 < len(piece) < chunk_size:
            held = piece
            continue
        view = memoryview(piece).cast("B")
        if pending:
            take = chunk_size - len(pending)
            pending += view[:take]
            view = view[take:]
            if len(pending) < chunk_size:
                continue
            yield bytes(pending)
            pending.clear()
        whole = len(view) // chunk_size * chunk_size
        for off in range(0, whole, chunk_size):
            yield bytes(view[off : off + chunk_size])
        pending += view[whole:]
    if held is not None:
        yield held if isinstance(held, bytes) else bytes(held)
    elif pending:
        yield bytes(pending)


def sha256_of_chunks(chunks: Iterable[Chunk]) -> str:
    """Lowercase hex sha256 of the concatenation of ``chunks`` (streamed)."""
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def _digest(oid: str) -> bytes:
    if len(oid) != 64:
        raise ValueError(f"not a sha256 hex oid: {oid!r}")
    return bytes.fromhex(oid)


# --- encoding -----------------------------------------------------------------------------------


class _ChunkEncoder:
    """Chooses the cheapest representation of one chunk, compressing as little as possible."""

    def __init__(self, itemsize: int, level: int, quick: float | None = None) -> None:
        self.itemsize = itemsize
        self.quick = quick
        self.cctx = _compressor(level)
        self.tiny = _compressor(TINY_LEVEL)

    def standalone(self, chunk: bytes) -> tuple[int, bytes]:
        """Best of verbatim and grouped-zstd (verbatim at once, in quick mode, when a sample
        of the chunk does not compress below the ``quick`` ratio)."""
        if self.quick is not None and len(chunk) >= 4 * _SAMPLE_BYTES:
            sample = byte_group(chunk[:_SAMPLE_BYTES], self.itemsize)
            if len(self.cctx.compress(sample)) > self.quick * _SAMPLE_BYTES:
                return KIND_RAW, chunk
        cctx = self.tiny if len(chunk) <= TINY_CHUNK else self.cctx
        packed = cctx.compress(byte_group(chunk, self.itemsize))
        if len(packed) >= _RAW_RATIO * len(chunk):
            return KIND_RAW, chunk
        return KIND_GROUPED, packed

    def standalone_looks_worse(self, chunk: bytes, xor_ratio: float) -> bool:
        """Whether compressing a sample of ``chunk`` predicts no gain over ``xor_ratio``."""
        if len(chunk) < 4 * _SAMPLE_BYTES:
            return False
        sample = byte_group(chunk[:_SAMPLE_BYTES], self.itemsize)
        return len(self.cctx.compress(sample)) > (xor_ratio + _SAMPLE_MARGIN) * _SAMPLE_BYTES

    def xor(self, chunk: Chunk, base: Chunk) -> bytes:
        """The XOR-delta payload (kind 2)."""
        return self.cctx.compress(grouped_xor(chunk, base, self.itemsize))

    def delta(self, chunk: bytes, base: bytes, diff: bool) -> tuple[int, bytes]:
        """The XOR delta, or with ``diff`` (itemsize 2 or 4) the difference streams when they
        are smaller: measured on the whole chunk when it is short, else on spans of it."""
        if not diff or self.itemsize not in streams.ITEMSIZES:
            return KIND_XOR, self.xor(chunk, base)
        if len(chunk) < _DIFF_SPANS * _DIFF_SPAN * 2:
            x, d = self.xor(chunk, base), streams.encode(chunk, base, self.itemsize, self.cctx)
            return (KIND_DIFF, d) if len(d) < _DIFF_MARGIN * len(x) else (KIND_XOR, x)
        xs = ds = 0
        step = (len(chunk) - _DIFF_SPAN) // (_DIFF_SPANS - 1) // self.itemsize * self.itemsize
        for at in range(0, _DIFF_SPANS * step, step):
            c, b = chunk[at : at + _DIFF_SPAN], base[at : at + _DIFF_SPAN]
            xs += len(self.xor(c, b))
            ds += len(streams.encode(c, b, self.itemsize, self.cctx))
        if ds < _DIFF_MARGIN * xs:
            return KIND_DIFF, streams.encode(chunk, base, self.itemsize, self.cctx)
        return KIND_XOR, self.xor(chunk, base)

    def against(self, chunk: bytes, base: bytes, diff: bool = False) -> tuple[int, bytes]:
        """Best of identical, delta (XOR, or with ``diff`` possibly difference streams) and the
        standalone kinds."""
        if chunk == base:
            return KIND_SAME, b""
        delta, packed = self.delta(chunk, base, diff)
        if len(packed) <= _XOR_GOOD_ENOUGH * len(chunk):
            return delta, packed
        if self.standalone_looks_worse(chunk, len(packed) / len(chunk)):
            kind, payload = KIND_RAW, chunk
        else:
            kind, payload = self.standalone(chunk)
        if len(packed) < len(payload) and len(packed) < _RAW_RATIO * len(chunk):
            return delta, packed
        return kind, payload

    def with_model(
        self, chunk: bytes, base: bytes, model: Model, start: int, diff: bool = False
    ) -> tuple[int, bytes]:
        """The residual against ``model``'s reconstruction when it is small (a quarter of the
        chunk: no other kind comes near), else the smaller of it and ``against``."""
        if chunk == base:
            return KIND_SAME, b""
        res = residual(chunk, reconstruct_array(model, base, start), self.itemsize)
        packed = self.cctx.compress(byte_group(res, self.itemsize))
        if len(packed) <= _MODEL_GOOD_ENOUGH * len(chunk):
            return KIND_MODEL, packed
        kind, payload = self.against(chunk, base, diff)
        return (KIND_MODEL, packed) if len(packed) < len(payload) else (kind, payload)


def _check_params(size: int, itemsize: int, chunk_size: int) -> None:
    if itemsize not in ITEMSIZES:
        raise ValueError(f"itemsize must be one of {ITEMSIZES}, got {itemsize}")
    if not 0 < chunk_size < 2**32 or chunk_size % itemsize:
        raise ValueError(f"chunk_size {chunk_size} must be in (0, 2**32) and divisible by itemsize")
    if size < 0 or size % itemsize:
        raise ValueError(f"size {size} must be a non-negative multiple of itemsize {itemsize}")


def _write_header(out: BinaryIO, h: ObjectHeader) -> None:
    digest = _digest(h.base_oid) if h.base_oid else _ZERO_DIGEST
    out.write(_HEADER.pack(MAGIC, h.version, h.itemsize, h.depth, 0, h.size, h.chunk_size, digest))


def _compressor(level: int) -> zstandard.ZstdCompressor:
    """The zstd context of every compressed payload: the frame declares its size and carries a
    checksum."""
    return zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=True)


_ENCODERS = threading.local()


def _thread_encoder(itemsize: int, level: int, quick: float | None) -> _ChunkEncoder:
    """This thread's encoder for these parameters (a zstd context is costly to create and
    cannot be shared between threads; re-using one does not change its output)."""
    cache: dict[tuple[int, int, float | None], _ChunkEncoder] | None
    cache = getattr(_ENCODERS, "cache", None)
    if cache is None:
        cache = _ENCODERS.cache = {}
    enc = cache.get((itemsize, level, quick))
    if enc is None:
        enc = cache[itemsize, level, quick] = _ChunkEncoder(itemsize, level, quick)
    return enc


class _EncoderPool:
    """One ``_ChunkEncoder`` per thread (zstd contexts are not shareable between threads)."""

    def __init__(
        self,
        itemsize: int,
        level: int,
        quick: float | None = None,
        model: Model | None = None,
        diff: bool = False,
    ) -> None:
        self.itemsize = itemsize
        self.level = level
        self.quick = quick
        self.model = model
        self.diff = diff

    def get(self) -> _ChunkEncoder:
        return _thread_encoder(self.itemsize, self.level, self.quick)

    def encode(self, chunk: bytes, base_chunk: bytes | None, start: int = 0) -> tuple[int, bytes]:
        """The record of one chunk whose first element is element ``start`` of the object."""
        enc = self.get()
        if base_chunk is None:
            return enc.standalone(chunk)
        if self.model is not None:
            return enc.with_model(chunk, base_chunk, self.model, start, self.diff)
        return enc.against(chunk, base_chunk, self.diff)


def _paired(
    chunks: Iterator[bytes], header: ObjectHeader, base_chunks: Iterator[bytes] | None
) -> Iterator[tuple[bytes, bytes | None]]:
    """(chunk, base chunk or None) pairs, checking lengths against the header."""
    seen = 0
    for i, chunk in enumerate(chunks):
        if i >= header.n_chunks or len(chunk) != header.chunk_length(i):
            raise ValueError(f"chunks hold more than the declared size {header.size}")
        seen += len(chunk)
        base_chunk = None
        if base_chunks is not None:
            base_chunk = next(base_chunks, b"")
            if len(base_chunk) != len(chunk):
                raise ValueError(f"base chunk {i} has length {len(base_chunk)}, not {len(chunk)}")
        yield chunk, base_chunk
    if seen != header.size:
        raise ValueError(f"chunks hold {seen} bytes, declared size is {header.size}")


def _write_chunks(
    out: BinaryIO,
    chunks: Iterator[bytes],
    header: ObjectHeader,
    pool: _EncoderPool,
    base_chunks: Iterator[bytes] | None,
    executor: Executor | None = None,
    window: int = 4,
    prefix: int = HEADER_SIZE,
) -> tuple[list[int], int]:
    """Write one record per chunk, in order; return the count per kind and the bytes written.

    With an ``executor``, up to ``window`` chunks are encoded concurrently (zstd and numpy
    release the GIL); output order and bytes are the same as without one. ``prefix``: the
    bytes already written (header and model section).
    """
    counts = [0] * (KIND_DIFF + 1)
    stored = prefix
    per = header.chunk_size // header.itemsize
    pending: deque[Future[tuple[int, bytes]]] = deque()

    def emit(kind: int, payload: bytes) -> None:
        nonlocal stored
        out.write(_CHUNK.pack(kind, len(payload)))
        out.write(payload)
        counts[kind] += 1
        stored += CHUNK_HEADER_SIZE + len(payload)

    try:
        for i, (chunk, base_chunk) in enumerate(_paired(chunks, header, base_chunks)):
            if executor is None:
                emit(*pool.encode(chunk, base_chunk, i * per))
                continue
            pending.append(executor.submit(pool.encode, chunk, base_chunk, i * per))
            if len(pending) >= window:
                emit(*pending.popleft().result())
        while pending:
            emit(*pending.popleft().result())
    finally:
        for fut in pending:
            fut.cancel()
    return counts, stored


def encode_object(
    chunks: Iterable[Chunk],
    *,
    size: int,
    itemsize: int,
    chunk_size: int,
    level: int,
    out: BinaryIO,
    base: Iterator[bytes] | None = None,
    base_oid: str | None = None,
    base_depth: int = 0,
    executor: Executor | None = None,
    quick: float | None = None,
    model: Model | None = None,
    diff: bool = True,
) -> EncodeStats:
    """Write the object whose logical bytes are ``chunks`` to ``out`` and return what it cost.

    ``chunks`` should be cut at ``chunk_size`` boundaries (other cuts are re-cut). With ``base``
    (the logical bytes of an object of the same ``size``, id ``base_oid``, itself at delta depth
    ``base_depth``) each chunk may be stored as a delta. If no chunk ends up using the base and
    ``out`` is seekable, the header is rewritten to depth 0 so the object stands alone.
    An ``executor`` (thread pool) encodes several chunks at once; the bytes do not change.
    With ``quick`` (a ratio), a standalone chunk whose 256 KiB sample does not compress below
    it is stored verbatim without compressing the whole chunk (used for downloaded objects,
    where the time matters more than a few percent of disk).
    With a ``model`` (a structured update of the base: ``structdetect.best_model``) and a base,
    the object is written in version 2 and each chunk may be a residual against the model.
    With ``diff`` (the default), a delta chunk of 2- or 4-byte elements may be stored as
    difference streams when they are smaller (``out`` must be seekable: the header then gets
    version 3, or 4 with a model); without it the object is what versions 1 and 2 wrote.
    """
    _check_params(size, itemsize, chunk_size)
    if base is not None and base_oid is None:
        raise ValueError("a base needs its base_oid")
    use_base = base is not None and size > 0
    depth = base_depth + 1 if use_base else 0
    if depth > MAX_DEPTH:
        raise ValueError(f"delta depth {depth} exceeds {MAX_DEPTH}")
    model = model if use_base else None
    if model is not None and (model.itemsize != itemsize or model.m * model.n * itemsize != size):
        raise ValueError(f"a {model.m}x{model.n} {model.dtype} model does not fit {size} bytes")
    header = ObjectHeader(
        VERSION if model is None else VERSION_MODEL,
        itemsize,
        depth,
        size,
        chunk_size,
        base_oid if use_base else None,
    )
    if not use_base and 0 < size <= chunk_size and executor is None:
        return _encode_one_chunk(chunks, header, level, out, quick)
    start = out.tell() if out.seekable() else None
    _write_header(out, header)
    section = model.to_bytes() if model is not None else b""
    out.write(section)
    diff = diff and use_base and itemsize in streams.ITEMSIZES and start is not None
    pool = _EncoderPool(itemsize, level, quick, model, diff)
    base_chunks = rechunk(base, chunk_size) if use_base and base is not None else None
    counts, stored = _write_chunks(
        out,
        rechunk(chunks, chunk_size),
        header,
        pool,
        base_chunks,
        executor,
        prefix=HEADER_SIZE + len(section),
    )
    used = sum(counts[k] for k in _BASE_KINDS)
    final = header
    if use_base and model is None and used == 0:  # stands alone after all
        final = ObjectHeader(VERSION, itemsize, 0, size, chunk_size, None)
    elif counts[KIND_DIFF]:
        final = replace(header, version=VERSION_DIFF if model is None else VERSION_MODEL_DIFF)
    if final != header and start is not None:  # (difference chunks imply a seekable ``out``)
        end = out.tell()
        out.seek(start)
        _write_header(out, final)
        out.seek(end)
        header = final
    kind = model.kind if model is not None else None
    raw, grouped, xor, same, modeled, diffs = counts
    return EncodeStats(
        size, stored, header.depth, header.base_oid, raw, grouped, xor, same, modeled, kind, diffs
    )


def _encode_one_chunk(
    chunks: Iterable[Chunk], header: ObjectHeader, level: int, out: BinaryIO, quick: float | None
) -> EncodeStats:
    """``encode_object`` of a standalone object of one chunk (most tensors of a model with many
    small ones): the same bytes, without the per-chunk machinery."""
    parts = [c if isinstance(c, bytes) else bytes(c) for c in chunks]
    data = parts[0] if len(parts) == 1 else b"".join(parts)
    if not data:  # the messages of ``_paired``
        raise ValueError(f"chunks hold 0 bytes, declared size is {header.size}")
    if len(data) != header.size:
        raise ValueError(f"chunks hold more than the declared size {header.size}")
    kind, payload = _thread_encoder(header.itemsize, level, quick).standalone(data)
    record = _HEADER.pack(
        MAGIC, header.version, header.itemsize, 0, 0, header.size, header.chunk_size, _ZERO_DIGEST
    )
    out.write(record + _CHUNK.pack(kind, len(payload)))
    out.write(payload)
    counts = [0, 0, 0, 0]
    counts[kind] = 1
    stored = HEADER_SIZE + CHUNK_HEADER_SIZE + len(payload)
    return EncodeStats(header.size, stored, 0, None, counts[0], counts[1], counts[2], counts[3])


def encode_small_many(
    datas: Sequence[Chunk], *, itemsize: int, chunk_size: int, level: int
) -> list[bytes]:
    """The object files of many small standalone objects at once: element ``i`` is exactly what
    ``encode_object`` writes for ``datas[i]`` alone (one chunk each: every length must be
    positive, a multiple of ``itemsize`` and at most ``chunk_size``).

    All are compressed by zstd's batch call (C threads, no Python per object), which is what
    makes a file of many thousand small tensors cheap to add; nothing here imports numpy.
    One exception to "exactly": in a batch of at least ``SMALL_SAMPLE_MIN`` objects of which no
    sampled one compresses (``_compress_sampled``), every object is written raw.
    """
    lengths = list(map(len, datas))
    _check_small(lengths, itemsize, chunk_size)
    packed = _compress_sampled(datas, lengths, itemsize, level)
    heads = {
        n: _HEADER.pack(MAGIC, VERSION, itemsize, 0, 0, n, chunk_size, _ZERO_DIGEST)
        for n in set(lengths)
    }
    raw_heads = {n: head + _CHUNK.pack(KIND_RAW, n) for n, head in heads.items()}
    group, record = KIND_GROUPED, _CHUNK.pack
    return [
        raw_heads[n] + data
        if payload is None or len(payload) >= _RAW_RATIO * n
        else b"".join((heads[n], record(group, len(payload)), payload))
        for data, n, payload in zip(datas, lengths, packed, strict=True)
    ]


def _compress_sampled(
    datas: Sequence[Chunk], lengths: list[int], itemsize: int, level: int
) -> list[bytes] | list[None]:
    """``_compress_grouped`` of all ``datas``, or (None: store raw) of none when the batch has
    at least ``SMALL_SAMPLE_MIN`` objects and not one of ``SMALL_SAMPLES`` evenly spaced ones
    saves more than ``1 - _RAW_RATIO`` of its bytes."""
    count = len(datas)
    if count < SMALL_SAMPLE_MIN:
        return _compress_grouped(datas, lengths, itemsize, level)
    step = count // SMALL_SAMPLES
    picks = range(0, count, step)
    sample = _compress_grouped(
        [datas[k] for k in picks], [lengths[k] for k in picks], itemsize, level
    )
    if all(len(p) >= _RAW_RATIO * lengths[k] for k, p in zip(picks, sample, strict=True)):
        return [None] * count
    rest = [k for k in range(count) if k % step]  # the sampled ones are compressed already
    out: list[bytes] = [b""] * count
    for k, payload in zip(picks, sample, strict=True):
        out[k] = payload
    others = _compress_grouped(
        [datas[k] for k in rest], [lengths[k] for k in rest], itemsize, level
    )
    for k, payload in zip(rest, others, strict=True):
        out[k] = payload
    return out


def _check_small(lengths: list[int], itemsize: int, chunk_size: int) -> None:
    """Refuse a length that is not a positive multiple of ``itemsize`` of at most one chunk."""
    sizes = set(lengths)
    if all(0 < n <= chunk_size and n % itemsize == 0 for n in sizes):
        return
    for i, n in enumerate(lengths):
        if not 0 < n <= chunk_size or n % itemsize:
            raise ValueError(
                f"object {i}: length {n} is not a positive multiple of {itemsize} "
                f"of at most one chunk ({chunk_size})"
            )


def _compress_grouped(
    datas: Sequence[Chunk], lengths: list[int], itemsize: int, level: int
) -> list[bytes]:
    """The grouped-zstd payload of each of ``datas`` (``_ChunkEncoder.standalone``'s): tiny
    ones at ``TINY_LEVEL``, the others at ``level``, each kind in one batch call."""
    grouped = _grouped_all(datas, itemsize)
    if max(lengths, default=0) <= TINY_CHUNK:  # (a file of many small tensors)
        return _compress_all(_compressor(TINY_LEVEL), grouped)
    tiny = [k for k, n in enumerate(lengths) if n <= TINY_CHUNK]
    rest = [k for k, n in enumerate(lengths) if n > TINY_CHUNK]
    out: list[bytes] = [b""] * len(datas)
    for members, lvl in ((tiny, TINY_LEVEL), (rest, level)):
        payloads = _compress_all(_compressor(lvl), [grouped[k] for k in members])
        for k, payload in zip(members, payloads, strict=True):
            out[k] = payload
    return out


def _grouped_all(datas: Sequence[Chunk], itemsize: int) -> list[bytes]:
    """``byte_group`` of each of ``datas`` by slicing, in C-level maps (no Python frame per
    item; as fast as numpy for small buffers, and numpy-free)."""
    if itemsize == 1:
        return list(map(bytes, datas))
    planes = itemgetter(*[slice(i, None, itemsize) for i in range(itemsize)])
    return list(map(b"".join, map(planes, map(bytes, datas))))


def _compress_all(cctx: zstandard.ZstdCompressor, items: list[bytes]) -> list[bytes]:
    """``cctx.compress`` of each item, through zstd's batch API where the backend has it."""
    if not items:
        return []
    multi = getattr(cctx, "multi_compress_to_buffer", None)
    if multi is None:
        return [cctx.compress(x) for x in items]
    return list(map(_tobytes, multi(items, threads=-1)))


_tobytes = methodcaller("tobytes")


# --- decoding -----------------------------------------------------------------------------------


def _corrupt(message: str) -> CorruptObjectError:
    return CorruptObjectError(f"corrupt object: {message}", hint=_FSCK_HINT)


def _read_exact(f: BinaryIO, n: int, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise _corrupt(f"truncated {what} (wanted {n} bytes, got {len(data)})")
    return data


def read_header(f: BinaryIO) -> ObjectHeader:
    """Parse and validate the header at the current position of ``f``."""
    raw = _read_exact(f, HEADER_SIZE, "header")
    magic, version, itemsize, depth, reserved, size, chunk_size, digest = _HEADER.unpack(raw)
    if magic != MAGIC:
        raise _corrupt(f"bad magic {magic!r} (expected {MAGIC!r})")
    if version not in VERSIONS:
        raise _corrupt(f"unsupported format version {version}")
    if itemsize not in ITEMSIZES or reserved != 0:
        raise _corrupt(f"bad itemsize {itemsize} or reserved byte {reserved}")
    if chunk_size == 0 or chunk_size % itemsize or size % itemsize:
        raise _corrupt(f"size {size} / chunk_size {chunk_size} do not fit itemsize {itemsize}")
    if (depth == 0) != (digest == _ZERO_DIGEST) or (version != VERSION and depth == 0):
        raise _corrupt(f"depth {depth} does not match the base id")
    base_oid = digest.hex() if depth else None
    return ObjectHeader(version, itemsize, depth, size, chunk_size, base_oid)


def read_model(f: BinaryIO, header: ObjectHeader) -> Model | None:
    """The model section that follows a version 2 or 4 header (None for versions 1 and 3);
    ``f`` must be just after the header."""
    if not has_model(header.version):
        return None
    (length,) = _SECTION.unpack(_read_exact(f, _SECTION.size, "model section length"))
    head = _read_exact(f, min(length, MODEL_HEAD_SIZE), "model section")
    want = section_length(head, header.size, header.itemsize)
    if length != want:
        raise _corrupt(f"model section length {length} is not {want}")
    rest = _read_exact(f, length - len(head), "model section")
    return parse_model(head + rest, header.size, header.itemsize)


def describe(f: BinaryIO) -> str:
    """How the object in ``f`` is stored, for listings: ``standalone``, ``delta``,
    ``delta+<model kind>`` (e.g. ``delta+lowrank8``), with ``+diff`` when some chunks are
    difference streams (``delta+diff``, ``delta+lowrank8+diff``)."""
    header = read_header(f)
    model = read_model(f, header)
    if header.base_oid is None:
        return "standalone"
    how = "delta" if model is None else f"delta+{model.kind}"
    return how + "+diff" if KIND_DIFF in chunk_kinds(header.version) else how


def check_layout(f: BinaryIO, file_size: int) -> ObjectHeader:
    """Check that the object file in ``f`` (``file_size`` bytes) is whole: a valid header, then
    exactly the chunk records it declares, ending at the end of the file. Reads only the
    5-byte record headers (cheap, no decompression, no hash): it catches a torn or truncated
    file, not a flipped bit (``decode_object`` plus the hash does)."""
    header = read_header(f)
    pos = at = HEADER_SIZE  # where the next record starts; where ``f`` is
    kinds = chunk_kinds(header.version)
    if has_model(header.version):
        raw = _read_exact(f, _SECTION.size, "model section length")
        pos = at = HEADER_SIZE + _SECTION.size + _SECTION.unpack(raw)[0]
        if pos > file_size:
            raise _corrupt(f"torn: the file ends at byte {file_size}, inside the model section")
        f.seek(pos)
    for i in range(header.n_chunks):
        if pos + CHUNK_HEADER_SIZE > file_size:
            raise _corrupt(f"torn: the file ends at byte {file_size}, before chunk {i}")
        if at != pos:
            f.seek(pos)
        raw = f.read(CHUNK_HEADER_SIZE)
        if len(raw) != CHUNK_HEADER_SIZE:  # the file changed under us
            raise _corrupt(f"torn: the file ends before chunk {i} header")
        at = pos + CHUNK_HEADER_SIZE
        kind, n = _CHUNK.unpack(raw)
        if kind not in kinds:
            raise _corrupt(f"chunk {i} has unknown kind {kind}")
        if (kind == KIND_SAME and n) or (kind == KIND_RAW and n != header.chunk_length(i)):
            raise _corrupt(f"chunk {i} of kind {kind} has bad length {n}")
        pos = at + n
        if pos > file_size:
            raise _corrupt(f"torn: the file ends at byte {file_size}, inside chunk {i}")
    if pos != file_size:
        raise _corrupt(f"{file_size - pos} trailing bytes after the last chunk")
    return header


class _BaseCursor:
    """Pulls base chunks in lockstep with the delta, opening the base only when first needed."""

    def __init__(self, header: ObjectHeader, open_base: OpenBase) -> None:
        self.header = header
        self.open_base = open_base
        self.chunks: Iterator[bytes] | None = None
        self.pos = 0

    def chunk(self, index: int) -> bytes:
        """The base's logical chunk ``index`` (indices must not go backwards)."""
        if self.header.base_oid is None:
            raise _corrupt(f"chunk {index} refers to a base but the object has none")
        if self.chunks is None:
            self.chunks = rechunk(self.open_base(self.header.base_oid), self.header.chunk_size)
        data = b""
        while self.pos <= index:
            data = next(self.chunks, b"")
            self.pos += 1
        if len(data) != self.header.chunk_length(index):
            raise _corrupt(f"base {self.header.base_oid} is shorter than its delta")
        return data


_DCTX = threading.local()


def _decode_chunk(
    kind: int,
    payload: bytes,
    length: int,
    i: int,
    k: int,
    base_chunk: bytes | None,
    model: Model | None = None,
    per: int = 0,
) -> bytes:
    """Logical bytes of one chunk record (``base_chunk`` given for XOR/SAME/MODEL/DIFF kinds;
    a MODEL chunk ``i`` starts at element ``i * per``)."""
    if kind == KIND_RAW:
        if len(payload) != length:
            raise _corrupt(f"raw chunk {i} has {len(payload)} bytes, not {length}")
        return payload
    if kind == KIND_SAME and base_chunk is not None:
        return base_chunk
    dctx = getattr(_DCTX, "dctx", None)
    if dctx is None:
        dctx = _DCTX.dctx = zstandard.ZstdDecompressor()
    if kind == KIND_DIFF and base_chunk is not None:
        return streams.decode(payload, base_chunk, k, dctx)
    if kind == KIND_MODEL and model is not None and base_chunk is not None:
        return add_residual(  # temporaries: each is freed as soon as it is used up
            byte_ungroup(streams.decompress_exact(dctx, payload, length, f"chunk {i}"), k),
            reconstruct_array(model, base_chunk, i * per),
            k,
        )
    # passed on as a temporary: ``_ungroup_xor`` holds the only reference and frees it early
    return _ungroup_xor(
        streams.decompress_exact(dctx, payload, length, f"chunk {i}"), k, base_chunk
    )


def _records(
    f: BinaryIO, header: ObjectHeader, cursor: _BaseCursor
) -> Iterator[tuple[int, bytes, int, int, bytes | None]]:
    """(kind, payload, length, index, base chunk) per chunk record, validated (``f`` just
    after the header and model section)."""
    kinds = chunk_kinds(header.version)
    for i in range(header.n_chunks):
        length = header.chunk_length(i)
        kind, n = _CHUNK.unpack(_read_exact(f, CHUNK_HEADER_SIZE, f"chunk {i} header"))
        payload = _read_exact(f, n, f"chunk {i} payload")
        if kind not in kinds or (kind == KIND_SAME and n != 0):
            raise _corrupt(f"chunk {i} has unknown kind {kind} or bad length {n}")
        base_chunk = cursor.chunk(i) if kind in _BASE_KINDS else None
        yield kind, payload, length, i, base_chunk
    if f.read(1):
        raise _corrupt("trailing bytes after the last chunk")


def decode_object(
    f: BinaryIO, open_base: OpenBase, executor: Executor | None = None, window: int = 4
) -> Iterator[bytes]:
    """Yield the logical chunks of the object in ``f``.

    Delta chunks pull the same chunk from ``open_base(base_oid)`` (an iterator over the base's
    logical bytes, typically another ``decode_object``), so memory stays bounded by a couple of
    chunks per chain level. With an ``executor``, up to ``window`` chunks are decoded at once
    (workers never wait on other work, so a shared pool cannot deadlock). Damage raises
    ``CorruptObjectError``.
    """
    header = read_header(f)
    model = read_model(f, header)
    cursor = _BaseCursor(header, open_base)
    k = header.itemsize
    per = header.chunk_size // k
    if executor is None:
        for kind, payload, length, i, base_chunk in _records(f, header, cursor):
            yield _decode_chunk(kind, payload, length, i, k, base_chunk, model, per)
        return
    pending: deque[Future[bytes]] = deque()
    try:
        for kind, payload, length, i, base_chunk in _records(f, header, cursor):
            pending.append(
                executor.submit(_decode_chunk, kind, payload, length, i, k, base_chunk, model, per)
            )
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for fut in pending:
            fut.cancel()

"""Difference streams: chunk kind 5 (``KIND_DIFF``) of object formats v3 and v4.

A dense fine-tune moves nearly every weight by a small amount. The XOR of the two bit patterns
(kind 2) pays for every carry that crosses a bit boundary and for every exponent step; the
integer difference of the patterns does not. This kind stores, per element of ``itemsize``
2 or 4 bytes (``w = 8 * itemsize`` bits)::

    d = new - base              modulo 2**w, the bit patterns as unsigned integers
    z = (d << 1) ^ (d >> (w - 1))   d taken as signed (arithmetic shift): zigzag, so a small
                                    |d| of either sign is a small z

then splits ``z`` into its ``itemsize`` byte planes (byte 0 of every element, then byte 1, ...)
and stores each plane on its own: as a zstd frame, or verbatim when zstd does not make it
smaller (the low planes of a dense update are noise, and a verbatim plane decodes at memcpy
speed). The transform is a bijection on bit patterns (NaNs, infinities and integers
included), so decoding is exact whatever the data.

Payload layout (little-endian)::

    u8  transform: 0 (the one above; other values are reserved)
    itemsize times: u8 method (0 verbatim, 1 zstd frame), u32 length
    the planes' bytes, in plane order

A verbatim plane has exactly ``chunk length / itemsize`` bytes; a zstd frame declares that
content size and carries a checksum.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any

from potluck.errors import CorruptObjectError

if TYPE_CHECKING:
    import zstandard

TRANSFORM_DIFF = 0
METHOD_RAW = 0
METHOD_ZSTD = 1
ITEMSIZES = (2, 4)
_PLANE = struct.Struct("<BI")
_UINT = {2: "<u2", 4: "<u4"}
_INT = {2: "<i2", 4: "<i4"}


def _corrupt(message: str) -> CorruptObjectError:
    return CorruptObjectError(
        f"corrupt object: {message}",
        hint="run `potluck fsck` to find damaged objects and restore them from a remote",
    )


def zigzag_diff(new: bytes | memoryview, base: bytes | memoryview, itemsize: int) -> Any:
    """``z`` of the module docstring: one unsigned integer per element (a new array)."""
    import numpy as np

    if itemsize not in ITEMSIZES:
        raise ValueError(f"difference streams need itemsize 2 or 4, got {itemsize}")
    d = np.subtract(np.frombuffer(new, _UINT[itemsize]), np.frombuffer(base, _UINT[itemsize]))
    s = d.view(_INT[itemsize])
    sign = s >> (8 * itemsize - 1)
    np.left_shift(s, 1, out=s)
    np.bitwise_xor(s, sign, out=s)
    return d


def undo_zigzag_diff(z: Any, base: bytes | memoryview, itemsize: int) -> bytes:
    """Inverse of ``zigzag_diff``: the new bit patterns (``z``, unsigned, is overwritten)."""
    import numpy as np

    low = z & z.dtype.type(1)
    np.right_shift(z, 1, out=z)
    np.negative(low, out=low)  # 0 or all ones, modulo 2**w
    np.bitwise_xor(z, low, out=z)  # d
    del low  # before the copy out: a decoded chunk then holds two chunk-sized buffers, not three
    np.add(z, np.frombuffer(base, _UINT[itemsize]), out=z)
    return bytes(z.tobytes())


def encode(
    new: bytes | memoryview,
    base: bytes | memoryview,
    itemsize: int,
    cctx: zstandard.ZstdCompressor,
) -> bytes:
    """The payload of ``new`` against ``base`` (equal lengths, a multiple of ``itemsize``)."""
    import numpy as np

    if len(new) != len(base) or len(new) % itemsize:
        raise ValueError(f"need equal lengths divisible by {itemsize}, got {len(new)}, {len(base)}")
    z = zigzag_diff(new, base, itemsize)
    planes = np.ascontiguousarray(z.view(np.uint8).reshape(-1, itemsize).T)
    del z  # freed before the planes are compressed (one chunk-sized buffer less at a time)
    heads = [bytes([TRANSFORM_DIFF])]
    bodies: list[bytes | memoryview] = []
    for plane in planes:
        raw = memoryview(plane)
        packed = cctx.compress(raw)
        if len(packed) < len(raw):
            heads.append(_PLANE.pack(METHOD_ZSTD, len(packed)))
            bodies.append(packed)
        else:
            heads.append(_PLANE.pack(METHOD_RAW, len(raw)))
            bodies.append(raw)
    return b"".join([*heads, *bodies])


def _plane(body: bytes, method: int, count: int, i: int, dctx: zstandard.ZstdDecompressor) -> bytes:
    """The ``count`` bytes of plane ``i`` from its stored ``body``."""
    if method == METHOD_RAW and len(body) == count:
        return body
    if method != METHOD_ZSTD:
        raise _corrupt(f"difference chunk plane {i} has method {method}, length {len(body)}")
    return decompress_exact(dctx, body, count, f"difference chunk plane {i}")


def decompress_exact(
    dctx: zstandard.ZstdDecompressor, frame: bytes, length: int, what: str
) -> bytes:
    """The ``length`` bytes the zstd ``frame`` of ``what`` (a chunk, a plane) holds; a frame
    that declares another size, does not decompress or yields another length is corrupt."""
    import zstandard

    try:
        if zstandard.frame_content_size(frame) != length:
            raise _corrupt(f"{what} frame does not declare {length} bytes")
        data = dctx.decompress(frame, max_output_size=length)
    except zstandard.ZstdError as e:
        raise _corrupt(f"{what} does not decompress: {e}") from e
    if len(data) != length:
        raise _corrupt(f"{what} decompresses to {len(data)} bytes, not {length}")
    return data


def decode(
    payload: bytes,
    base: bytes | memoryview,
    itemsize: int,
    dctx: zstandard.ZstdDecompressor,
) -> bytes:
    """The logical bytes (as many as ``base`` has) of a payload ``encode`` wrote against
    ``base``; damage raises ``CorruptObjectError``."""
    import numpy as np

    length = len(base)
    count = length // itemsize
    head = 1 + itemsize * _PLANE.size
    if itemsize not in ITEMSIZES or length % itemsize:
        raise _corrupt(f"difference chunk of {length} bytes does not fit itemsize {itemsize}")
    if len(payload) < head or payload[0] != TRANSFORM_DIFF:
        raise _corrupt("difference chunk has a short head or an unknown transform")
    out = np.empty((count, itemsize), np.uint8)
    at = head
    for i in range(itemsize):
        method, n = _PLANE.unpack_from(payload, 1 + i * _PLANE.size)
        body = payload[at : at + n]
        if len(body) != n:
            raise _corrupt(f"difference chunk plane {i} is truncated")
        at += n
        out[:, i] = np.frombuffer(_plane(body, method, count, i, dctx), np.uint8)
    if at != len(payload):
        raise _corrupt(f"difference chunk has {len(payload) - at} trailing bytes")
    return undo_zigzag_diff(out.reshape(-1).view(_UINT[itemsize]), base, itemsize)

"""Bit-level helpers: bit-pattern views, sub-byte packing, position coding, byte shuffling."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from potluck.codecs.base import malformed

_UINTS: dict[int, np.dtype] = {
    1: np.dtype("<u1"),
    2: np.dtype("<u2"),
    4: np.dtype("<u4"),
    8: np.dtype("<u8"),
}


def bit_view(a: np.ndarray) -> np.ndarray:
    """The raw bit patterns of ``a`` as a flat unsigned-int array (no float arithmetic).

    Elements of 1, 2, 4 or 8 bytes map to one uint each; wider ones (complex128) to several uint64.
    """
    flat = np.ascontiguousarray(a).reshape(-1)
    size = flat.dtype.itemsize
    out: np.ndarray = flat.view(_UINTS[size] if size in _UINTS else np.dtype("<u8"))
    return out


def bit_dtype(dtype: np.dtype) -> np.dtype:
    """The uint dtype ``bit_view`` uses for arrays of ``dtype``."""
    return _UINTS.get(dtype.itemsize, np.dtype("<u8"))


def from_bit_view(bits: np.ndarray, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of ``bit_view``: reinterpret bit patterns as ``dtype`` with ``shape``."""
    out: np.ndarray = np.ascontiguousarray(bits).view(dtype).reshape(shape)
    return out


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """Pack a flat bool array into bytes, first element in the lowest bit."""
    out: np.ndarray = np.packbits(bits.astype(bool).reshape(-1), bitorder="little")
    return out


def unpack_bits(packed: np.ndarray, count: int, codec: str) -> np.ndarray:
    """Inverse of ``pack_bits``: ``count`` bools."""
    if packed.size != (count + 7) // 8:
        raise malformed(codec, f"{packed.size} bytes cannot hold {count} bits")
    out: np.ndarray = np.unpackbits(packed, count=count, bitorder="little").astype(bool)
    return out


def pack_2bit(codes: np.ndarray) -> np.ndarray:
    """Pack values in 0..3 four to a byte, first value in the lowest two bits."""
    flat = codes.astype(np.uint8).reshape(-1)
    padded = np.zeros(-(-flat.size // 4) * 4, np.uint8)
    padded[: flat.size] = flat
    q = padded.reshape(-1, 4)
    out: np.ndarray = q[:, 0] | (q[:, 1] << 2) | (q[:, 2] << 4) | (q[:, 3] << 6)
    return out.astype(np.uint8)


def unpack_2bit(packed: np.ndarray, count: int, codec: str) -> np.ndarray:
    """Inverse of ``pack_2bit``: ``count`` values in 0..3 (uint8)."""
    if packed.size != -(-count // 4):
        raise malformed(codec, f"{packed.size} bytes cannot hold {count} 2-bit codes")
    shifts = np.array([0, 2, 4, 6], np.uint8)
    out: np.ndarray = ((packed[:, None] >> shifts) & 3).reshape(-1)[:count]
    return out


def pack_nibbles(values: np.ndarray) -> np.ndarray:
    """Pack values in 0..15 two to a byte, first value in the low nibble."""
    flat = values.astype(np.uint8).reshape(-1)
    padded = np.zeros(flat.size + (flat.size & 1), np.uint8)
    padded[: flat.size] = flat
    out: np.ndarray = (padded[0::2] | (padded[1::2] << 4)).astype(np.uint8)
    return out


def unpack_nibbles(packed: np.ndarray, count: int, codec: str) -> np.ndarray:
    """Inverse of ``pack_nibbles``: ``count`` values in 0..15 (uint8)."""
    if packed.size != (count + 1) // 2:
        raise malformed(codec, f"{packed.size} bytes cannot hold {count} 4-bit values")
    out: np.ndarray = np.stack([packed & 15, packed >> 4], axis=1).reshape(-1)[:count]
    return out


def encode_positions(positions: np.ndarray) -> np.ndarray:
    """Delta-code sorted, distinct positions: the first position, then the gaps.

    Stored in the narrowest unsigned dtype that holds the largest gap.
    """
    pos = positions.astype(np.int64).reshape(-1)
    gaps = np.diff(pos, prepend=np.int64(0))
    top = int(gaps.max()) if gaps.size else 0
    for dt in _UINTS.values():
        if top < 1 << (8 * dt.itemsize):
            out: np.ndarray = gaps.astype(dt)
            return out
    raise AssertionError("unreachable: int64 gaps fit uint64")


def decode_positions(gaps: np.ndarray, size: int, codec: str) -> np.ndarray:
    """Inverse of ``encode_positions``; checks positions are increasing and below ``size``."""
    if gaps.dtype.kind != "u":
        raise malformed(codec, f"positions have dtype {gaps.dtype}, expected unsigned")
    if gaps.ndim != 1:
        raise malformed(codec, "positions are not a flat array")
    bad = malformed(codec, f"positions are not increasing or not below {size}")
    if gaps.size and int(gaps.max()) >= size:
        raise bad
    out: np.ndarray = np.cumsum(gaps.astype(np.int64))
    if gaps.size and (np.any(gaps[1:] == 0) or int(out[-1]) >= size):
        raise bad
    return out


def shuffle_bytes(bits: np.ndarray) -> bytes:
    """Byte-plane transpose of a flat uint array (all first bytes, then all second bytes, …).

    Grouping bytes of equal significance makes XOR deltas compress much better.
    """
    size = bits.dtype.itemsize
    return bits.view(np.uint8).reshape(-1, size).T.tobytes()


def unshuffle_bytes(data: bytes, dtype: np.dtype, count: int) -> np.ndarray:
    """Inverse of ``shuffle_bytes`` for ``count`` elements of the uint ``dtype``."""
    size = dtype.itemsize
    planes = np.frombuffer(data, np.uint8).reshape(size, count)
    out: np.ndarray = np.ascontiguousarray(planes.T).reshape(-1).view(dtype)
    return out


def bit_ranges(a: np.ndarray, block: int) -> Iterator[tuple[int, int]]:
    """``[lo, hi)`` ranges over ``bit_view(a)`` of about ``block`` bytes each, cut at element
    boundaries (a complex128 element is two uint64)."""
    bits = bit_dtype(a.dtype).itemsize
    per = max(1, a.dtype.itemsize // bits)
    total = a.size * per
    step = max(1, block // (per * bits)) * per
    for lo in range(0, total, step):
        yield lo, min(total, lo + step)

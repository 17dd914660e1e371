"""Exact codecs: the update is rebuilt bit for bit (NaN payloads, −0.0, bf16 and fp8 included).

They work on raw bit patterns, never on float subtraction, so they accept every dtype potluck
knows (floats, ints, bool, complex).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import zstandard

from potluck.codecs.base import (
    PLAIN_DTYPES,
    Arrays,
    ErrorReport,
    Meta,
    Payload,
    UpdateCodec,
    get_array,
    malformed,
    meta_int,
)
from potluck.codecs.bits import (
    bit_dtype,
    bit_view,
    decode_positions,
    encode_positions,
    from_bit_view,
    shuffle_bytes,
    unshuffle_bytes,
)
from potluck.params import Param, ParamValue

_Encoded = tuple[Arrays, Meta, ErrorReport | None]


def _as_stored(a: np.ndarray) -> np.ndarray:
    """``a`` itself when its dtype is plain numeric, else its bit patterns (bf16, fp8, complex)."""
    if a.dtype in PLAIN_DTYPES:
        return a.copy(order="C")  # not ascontiguousarray: that turns a 0-d array into 1-d
    return bit_view(a).reshape(a.shape if a.dtype.itemsize in (1, 2, 4, 8) else (-1,))


class FullCodec(UpdateCodec):
    """Replacement: stores ``new`` itself and ignores the base's values (exact).

    Plain dtypes are stored as they are; bf16, fp8 and complex tensors as their bit patterns
    (``meta["stored"] == "bits"``).
    """

    name: ClassVar[str] = "full"
    exact: ClassVar[bool] = True

    def _encode(
        self,
        new: np.ndarray,
        base: np.ndarray,
        *,
        name: str,
        seed: int,
        params: dict[str, ParamValue],
    ) -> _Encoded:
        stored = _as_stored(new)
        kind = "array" if stored.dtype == new.dtype else "bits"
        return {"values": stored}, {"stored": kind}, None

    def _decode(self, payload: Payload, base: np.ndarray) -> np.ndarray:
        kind = payload.meta.get("stored")
        if kind == "array":
            values = get_array(payload, "values", base.dtype, base.shape)
            return values.copy()
        if kind == "bits":
            bits = get_array(payload, "values", bit_dtype(base.dtype))
            if bits.size * bits.itemsize != base.nbytes:
                raise malformed(self.name, "stored bit patterns do not fill the tensor")
            return from_bit_view(bits, base.dtype, base.shape).copy()
        raise malformed(self.name, f"meta 'stored' is {kind!r}")


class ExactXorCodec(UpdateCodec):
    """XOR of the bit patterns of new and base, byte-shuffled, zstd-compressed (exact).

    Unchanged elements XOR to zero bytes and small float changes leave the high (sign/exponent)
    byte planes mostly zero, which zstd squeezes well. Stored as one uint8 array ``xor_zstd``.
    """

    name: ClassVar[str] = "exact_xor"
    exact: ClassVar[bool] = True
    params: ClassVar[tuple[Param, ...]] = (
        Param(int, 3, "zstd compression level", low=1, high=22, name="level"),
    )

    def _encode(
        self,
        new: np.ndarray,
        base: np.ndarray,
        *,
        name: str,
        seed: int,
        params: dict[str, ParamValue],
    ) -> _Encoded:
        xor = bit_view(new) ^ bit_view(base)
        level = int(params["level"])
        data = zstandard.ZstdCompressor(level=level).compress(shuffle_bytes(xor))
        return {"xor_zstd": np.frombuffer(data, np.uint8).copy()}, {"layout": "byteshuffle"}, None

    def _decode(self, payload: Payload, base: np.ndarray) -> np.ndarray:
        data = get_array(payload, "xor_zstd", np.uint8)
        if payload.meta.get("layout") != "byteshuffle":
            raise malformed(self.name, f"unknown layout {payload.meta.get('layout')!r}")
        base_bits = bit_view(base)
        try:
            raw = zstandard.ZstdDecompressor().decompress(
                data.tobytes(), max_output_size=max(base.nbytes, 1)
            )
        except zstandard.ZstdError as e:
            raise malformed(self.name, f"zstd: {e}") from e
        if len(raw) != base.nbytes:
            raise malformed(self.name, f"{len(raw)} XOR bytes for a {base.nbytes}-byte tensor")
        xor = unshuffle_bytes(raw, base_bits.dtype, base_bits.size)
        return from_bit_view(base_bits ^ xor, base.dtype, base.shape)


class ExactSparseCodec(UpdateCodec):
    """Positions of the elements whose bit patterns changed, plus their new bit patterns (exact).

    ``positions`` are delta-coded (first position, then gaps) in the narrowest uint that fits;
    ``values`` are the new elements' bit patterns. Good when few elements change.
    """

    name: ClassVar[str] = "exact_sparse"
    exact: ClassVar[bool] = True

    def _encode(
        self,
        new: np.ndarray,
        base: np.ndarray,
        *,
        name: str,
        seed: int,
        params: dict[str, ParamValue],
    ) -> _Encoded:
        new_bits = bit_view(new)
        changed = np.flatnonzero(new_bits != bit_view(base))
        arrays = {"positions": encode_positions(changed), "values": new_bits[changed]}
        return arrays, {"changed": int(changed.size)}, None

    def _decode(self, payload: Payload, base: np.ndarray) -> np.ndarray:
        bits = bit_view(base).copy()
        count = meta_int(payload, "changed")
        gaps = payload.arrays.get("positions")
        if gaps is None:
            raise malformed(self.name, "array 'positions' is missing")
        values = get_array(payload, "values", bits.dtype, (count,))
        positions = decode_positions(gaps, bits.size, self.name)
        if positions.size != count:
            raise malformed(self.name, f"{positions.size} positions for {count} values")
        bits[positions] = values
        return from_bit_view(bits, base.dtype, base.shape)

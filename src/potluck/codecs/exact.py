"""Exact codecs: the update is rebuilt bit for bit (NaN payloads, −0.0, bf16 and fp8 included).

They work on raw bit patterns, never on float subtraction, so they accept every dtype potluck
knows (floats, ints, bool, complex).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import tempfile
import threading
from collections.abc import Iterator
from typing import BinaryIO, ClassVar

import numpy as np
import zstandard

from potluck.codecs.base import (
    PLAIN_DTYPES,
    Arrays,
    Done,
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
    bit_ranges,
    bit_view,
    decode_positions,
    encode_positions,
    from_bit_view,
    shuffle_bytes,
    unshuffle_bytes,
)
from potluck.params import Param, ParamValue

_Encoded = tuple[Arrays, Meta, ErrorReport | None]
#: How often the pages of a mapped temporary file that zstd has read are let go.
_REAP_SECONDS = 0.02


def _done(done: Done | None, itemsize: int, lo: int, hi: int) -> None:
    if done is not None:
        done(lo * itemsize, hi * itemsize)


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

    streams: ClassVar[bool] = True

    def _encode_blocked(
        self,
        new: np.ndarray,
        base: np.ndarray,
        params: dict[str, ParamValue],
        block: int,
        done: Done | None,
    ) -> _Encoded:
        return self._encode(new, base, name="", seed=0, params=params)  # the payload is `new`

    def _decode_blocks(
        self, payload: Payload, base: np.ndarray, block: int, done: Done | None
    ) -> Iterator[np.ndarray]:
        kind = payload.meta.get("stored")
        if kind == "array":
            flat = get_array(payload, "values", base.dtype, base.shape).reshape(-1)
        elif kind == "bits":
            bits = get_array(payload, "values", bit_dtype(base.dtype))
            if bits.size * bits.itemsize != base.nbytes:
                raise malformed(self.name, "stored bit patterns do not fill the tensor")
            flat = from_bit_view(bits, base.dtype, (base.size,))
        else:
            raise malformed(self.name, f"meta 'stored' is {kind!r}")
        step = max(1, block // max(1, base.dtype.itemsize))
        for lo in range(0, base.size, step):
            yield flat[lo : lo + step].copy()


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

    streams: ClassVar[bool] = True

    def _encode_blocked(
        self,
        new: np.ndarray,
        base: np.ndarray,
        params: dict[str, ParamValue],
        block: int,
        done: Done | None,
    ) -> _Encoded:
        """The byte planes of the XOR go to a temporary file block by block; zstd then
        compresses the file in one call (the same frame as ``_encode``: a streamed frame
        differs) while its pages are let go behind it."""
        new_bits, base_bits = bit_view(new), bit_view(base)
        k, n = base_bits.itemsize, base_bits.size
        with tempfile.TemporaryFile() as tmp:
            tmp.truncate(n * k)
            for lo, hi in bit_ranges(base, block):
                planes = (new_bits[lo:hi] ^ base_bits[lo:hi]).view(np.uint8).reshape(-1, k)
                for p in range(k):
                    os.pwrite(tmp.fileno(), planes[:, p].tobytes(), p * n + lo)
                del planes
                _done(done, k, lo, hi)
            data = _compress_file(tmp, n * k, int(params["level"]))
        return {"xor_zstd": np.frombuffer(data, np.uint8).copy()}, {"layout": "byteshuffle"}, None

    def _decode_blocks(
        self, payload: Payload, base: np.ndarray, block: int, done: Done | None
    ) -> Iterator[np.ndarray]:
        data = get_array(payload, "xor_zstd", np.uint8)
        if payload.meta.get("layout") != "byteshuffle":
            raise malformed(self.name, f"unknown layout {payload.meta.get('layout')!r}")
        base_bits = bit_view(base)
        k, n = base_bits.itemsize, base_bits.size
        with tempfile.TemporaryFile() as tmp:
            self._decompress_to(data, tmp, base.nbytes, block)
            for lo, hi in bit_ranges(base, block):
                planes = np.empty((hi - lo, k), np.uint8)
                for p in range(k):
                    planes[:, p] = np.frombuffer(
                        os.pread(tmp.fileno(), hi - lo, p * n + lo), np.uint8
                    )
                out = base_bits[lo:hi] ^ planes.reshape(-1).view(base_bits.dtype)
                _done(done, k, lo, hi)
                yield from_bit_view(out, base.dtype, (-1,))

    def _decompress_to(self, data: np.ndarray, out: BinaryIO, nbytes: int, block: int) -> None:
        """Decompress the payload's zstd frame into ``out`` ``block`` bytes at a time: exactly
        ``nbytes``."""
        written = 0
        try:
            with zstandard.ZstdDecompressor().stream_reader(data.data) as r:
                while piece := r.read(max(block, 4096)):
                    written += len(piece)
                    if written > nbytes:
                        break
                    out.write(piece)
        except zstandard.ZstdError as e:
            raise malformed(self.name, f"zstd: {e}") from e
        if written != nbytes:
            raise malformed(self.name, f"{written} XOR bytes for a {nbytes}-byte tensor")
        out.flush()


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

    streams: ClassVar[bool] = True

    def _encode_blocked(
        self,
        new: np.ndarray,
        base: np.ndarray,
        params: dict[str, ParamValue],
        block: int,
        done: Done | None,
    ) -> _Encoded:
        new_bits, base_bits = bit_view(new), bit_view(base)
        found: list[np.ndarray] = []
        values: list[np.ndarray] = []
        for lo, hi in bit_ranges(base, block):
            part = new_bits[lo:hi]
            changed = np.flatnonzero(part != base_bits[lo:hi])
            found.append(changed + lo)
            values.append(part[changed])
            _done(done, base_bits.itemsize, lo, hi)
        changed = np.concatenate(found) if found else np.zeros(0, np.int64)
        joined = np.concatenate(values) if values else new_bits[:0].copy()
        arrays = {"positions": encode_positions(changed), "values": joined}
        return arrays, {"changed": int(changed.size)}, None

    def _decode_blocks(
        self, payload: Payload, base: np.ndarray, block: int, done: Done | None
    ) -> Iterator[np.ndarray]:
        base_bits = bit_view(base)
        count = meta_int(payload, "changed")
        gaps = payload.arrays.get("positions")
        if gaps is None:
            raise malformed(self.name, "array 'positions' is missing")
        values = get_array(payload, "values", base_bits.dtype, (count,))
        positions = decode_positions(gaps, base_bits.size, self.name)
        if positions.size != count:
            raise malformed(self.name, f"{positions.size} positions for {count} values")
        for lo, hi in bit_ranges(base, block):
            a, b = np.searchsorted(positions, [lo, hi])
            out = base_bits[lo:hi].copy()
            out[positions[a:b] - lo] = values[a:b]
            _done(done, base_bits.itemsize, lo, hi)
            yield from_bit_view(out, base.dtype, (-1,))


def _compress_file(f: BinaryIO, size: int, level: int) -> bytes:
    """zstd of the first ``size`` bytes of ``f`` in one call, as ``compress`` of those bytes in
    memory would give, reading them through a map whose pages a helper thread keeps letting go
    (zstd works in a window of a few MiB; a page read again comes back from the page cache)."""
    cctx = zstandard.ZstdCompressor(level=level)
    if size == 0:
        return cctx.compress(b"")
    mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ)
    stop = threading.Event()

    def reap() -> None:
        while not stop.wait(_REAP_SECONDS):
            with contextlib.suppress(ValueError, OSError):
                mm.madvise(mmap.MADV_DONTNEED)

    reaper = threading.Thread(target=reap, name="potluck-reap", daemon=True)
    reaper.start()
    try:
        with memoryview(mm) as view:
            out = cctx.compress(view)
        return bytes(memoryview(out))  # compact: `out` keeps its compressBound-sized buffer
    finally:
        stop.set()
        reaper.join()
        mm.close()

"""Chunk work buffers (issue 19, the filter's memory): the fused helpers give the bytes of the
plain ones, and encoding or decoding one chunk holds at most two chunk-sized buffers at once."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import zstandard

from potluck.objects import streams, structured
from potluck.objects.encoding import (
    KIND_DIFF,
    KIND_GROUPED,
    KIND_XOR,
    _decode_chunk,
    _EncoderPool,
    _ungroup_xor,
    byte_group,
    byte_ungroup,
    grouped_xor,
    xor_bytes,
)
from testsupport.memory import traced_peak

CHUNK = 4 << 20


def _naive_group(data: bytes, k: int) -> bytes:
    """Byte grouping by slicing (the reference)."""
    return b"".join(data[i::k] for i in range(k))


def _naive_xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("k", [1, 2, 4, 8])
@pytest.mark.parametrize("count", [0, 1, 3, 17, 1001])
def test_grouped_xor_is_group_of_xor(k: int, count: int) -> None:
    rng = np.random.default_rng(count * 10 + k)
    a = rng.integers(0, 256, count * k, dtype=np.uint8).tobytes()
    b = rng.integers(0, 256, count * k, dtype=np.uint8).tobytes()
    got = bytes(memoryview(grouped_xor(a, b, k)).cast("B"))
    assert got == _naive_group(_naive_xor(a, b), k)
    assert got == byte_group(xor_bytes(a, b), k)


@pytest.mark.parametrize("k", [1, 2, 4, 8])
@pytest.mark.parametrize("count", [0, 1, 3, 17, 1001])
@pytest.mark.parametrize("with_base", [False, True])
def test_ungroup_xor_is_xor_of_ungroup(k: int, count: int, with_base: bool) -> None:
    rng = np.random.default_rng(count * 10 + k)
    plain = rng.integers(0, 256, count * k, dtype=np.uint8).tobytes()
    base = rng.integers(0, 256, count * k, dtype=np.uint8).tobytes()
    grouped = _naive_group(plain, k)
    got = _ungroup_xor(grouped, k, base if with_base else None)
    assert isinstance(got, bytes)
    assert got == (_naive_xor(plain, base) if with_base else plain)
    assert byte_ungroup(grouped, k) == plain


def test_mismatched_lengths_are_refused() -> None:
    with pytest.raises(ValueError):
        grouped_xor(b"abcd", b"ab", 2)
    with pytest.raises(ValueError):
        _ungroup_xor(b"abcd", 2, b"ab")


def _bf16_pair(dense: bool) -> tuple[bytes, bytes]:
    """A 4 MiB chunk of bf16 weights and an update of it (dense: every weight moves a little;
    else 1 % of them flip a bit)."""
    rng = np.random.default_rng(7)
    n = CHUNK // 2
    f = (rng.standard_normal(n) * 0.02).astype(np.float32)
    base = (f.view(np.uint32) >> 16).astype(np.uint16)
    if dense:
        g = f + (rng.standard_normal(n) * 5e-4).astype(np.float32)
        new = (g.view(np.uint32) >> 16).astype(np.uint16)
    else:
        new = base.copy()
        new[rng.choice(n, n // 100, replace=False)] ^= 1
    return new.tobytes(), base.tobytes()


def _peak(fn: Callable[[], object]) -> int:
    """Peak bytes Python and numpy allocate while ``fn`` runs (after one warm-up call)."""
    return traced_peak(fn, warm_up=True)


@pytest.mark.parametrize("dense", [False, True])
def test_delta_chunk_round_trip_holds_two_chunks(dense: bool) -> None:
    new, base = _bf16_pair(dense)
    kind, payload = _EncoderPool(2, 3, diff=True).encode(new, base)
    assert kind == (KIND_DIFF if dense else KIND_XOR)
    assert _decode_chunk(kind, payload, len(new), 0, 2, base) == new
    # the reference decoder, step by step
    if kind == KIND_XOR:
        plain = byte_ungroup(zstandard.ZstdDecompressor().decompress(payload), 2)
        assert xor_bytes(plain, base) == new
    else:
        assert streams.decode(payload, base, 2, zstandard.ZstdDecompressor()) == new
    limit = 2.5 * CHUNK  # two chunk-sized buffers and change (three or four before)
    assert _peak(lambda: _EncoderPool(2, 3, diff=True).encode(new, base)) < limit
    assert _peak(lambda: _decode_chunk(kind, payload, len(new), 0, 2, base)) < limit


def test_standalone_chunk_decode_holds_two_chunks() -> None:
    new, _ = _bf16_pair(False)
    kind, payload = _EncoderPool(2, 3).encode(new, None)
    assert kind == KIND_GROUPED
    assert _decode_chunk(kind, payload, len(new), 0, 2, None) == new
    assert _peak(lambda: _decode_chunk(kind, payload, len(new), 0, 2, None)) < 2.5 * CHUNK


def _naive_zigzag(new: bytes, recon: bytes, k: int) -> bytes:
    """``structured.residual`` element by element (the reference)."""
    bits, out = 8 * k, bytearray()
    for at in range(0, len(new), k):
        d = (
            int.from_bytes(new[at : at + k], "little")
            - int.from_bytes(recon[at : at + k], "little")
        ) % (1 << bits)
        signed = d - (1 << bits) if d >> (bits - 1) else d
        out += (((signed << 1) ^ (signed >> (bits - 1))) % (1 << bits)).to_bytes(k, "little")
    return bytes(out)


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("block", [1 << 16, 3])  # whole; blocks that end inside the data
def test_residual_in_blocks_matches_naive(
    k: int, block: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(structured, "BLOCK_ELEMENTS", block)
    rng = np.random.default_rng(k + block)
    count = 257
    new = rng.integers(0, 256, count * k, dtype=np.uint8).tobytes()
    recon = rng.integers(0, 256, count * k, dtype=np.uint8).tobytes()
    new = bytes(recon[: 4 * k]) + new[4 * k :]  # a few zero differences too
    res = structured.residual(new, recon, k)
    assert res == _naive_zigzag(new, recon, k)
    dtype = np.uint16 if k == 2 else np.uint32
    assert structured.residual(new, np.frombuffer(recon, dtype).copy(), k) == res
    assert structured.apply_residual(res, recon, k) == new
    assert structured.add_residual(res, np.frombuffer(recon, dtype).copy(), k) == new


def test_reconstruct_array_is_reconstruct() -> None:
    rng = np.random.default_rng(5)
    m, n, r = 9, 13, 2
    limit = 1 << structured.factor_bits(r)
    model = structured.Model(
        "BF16",
        m,
        n,
        u=rng.integers(1 - limit, limit, (m, r)).astype(np.int32),
        v=rng.integers(1 - limit, limit, (n, r)).astype(np.int32),
        eu=rng.integers(-40, -20, m).astype(np.int8),
        ev=rng.integers(-40, -20, n).astype(np.int8),
    )
    base = rng.integers(0, 1 << 14, m * n, dtype=np.uint16).tobytes()
    arr = structured.reconstruct_array(model, base[20:], 10)
    assert arr.dtype == np.uint16 and arr.flags.writeable
    assert arr.tobytes() == structured.reconstruct(model, base[20:], 10)
    assert structured.reconstruct(model, b"", 0) == b""


@pytest.mark.parametrize("length", [0, 1, 7, 8, 9, 24])
def test_chunks_of_cuts_and_lets_go(length: int) -> None:
    from potluck.ops.vcs.odb import _chunks_of

    data = bytes(range(length))
    pieces = list(_chunks_of(data, 8))
    assert b"".join(pieces) == data
    assert all(len(p) == 8 for p in pieces[:-1]) and all(0 < len(p) <= 8 for p in pieces)


def test_release_free_memory_runs() -> None:
    from potluck.workers import release_free_memory

    assert release_free_memory() in (True, False)  # never raises; True where glibc has it

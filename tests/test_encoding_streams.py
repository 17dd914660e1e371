"""Difference streams (chunk kind 5, object formats v3 and v4): the transform against an
independent reference, round trips, when they are chosen, golden bytes, and damage."""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from potluck.errors import CorruptObjectError
from potluck.objects import streams
from potluck.objects.encoding import (
    CHUNK_HEADER_SIZE,
    HEADER_SIZE,
    KIND_DIFF,
    KIND_MODEL,
    KIND_XOR,
    VERSION,
    VERSION_DIFF,
    VERSION_MODEL_DIFF,
    EncodeStats,
    check_layout,
    decode_object,
    describe,
    encode_object,
    read_header,
)
from potluck.objects.structured import Model, factor_bits, quantize

SETTINGS = settings(derandomize=True, deadline=None, max_examples=80)
CCTX = zstandard.ZstdCompressor(level=1, write_content_size=True, write_checksum=True)
DCTX = zstandard.ZstdDecompressor()
BASE_OID = "ab" * 32


def zigzag_reference(new: bytes, base: bytes, itemsize: int) -> list[int]:
    """``z`` of ``streams`` with Python integers, element by element."""
    w = 8 * itemsize
    out = []
    for i in range(0, len(new), itemsize):
        a = int.from_bytes(new[i : i + itemsize], "little")
        b = int.from_bytes(base[i : i + itemsize], "little")
        d = (a - b) % (1 << w)
        signed = d - (1 << w) if d >> (w - 1) else d
        out.append(2 * signed if signed >= 0 else -2 * signed - 1)
    return out


def pair(data: st.DataObject, itemsize: int) -> tuple[bytes, bytes]:
    """A base and a new version: unrelated, equal, or differing by small integers."""
    n = data.draw(st.integers(0, 300)) * itemsize
    base = data.draw(st.binary(min_size=n, max_size=n))
    how = data.draw(st.sampled_from(["unrelated", "equal", "small"]))
    if how == "unrelated":
        return data.draw(st.binary(min_size=n, max_size=n)), base
    if how == "equal":
        return base, base
    u = {2: "<u2", 4: "<u4"}[itemsize]
    steps = data.draw(
        st.lists(st.integers(-40, 40), min_size=n // itemsize, max_size=n // itemsize)
    )
    new = np.frombuffer(base, u) + np.array(steps, dtype=np.int64).astype(u)
    return new.astype(u).tobytes(), base


@SETTINGS
@given(st.sampled_from(streams.ITEMSIZES), st.data())
def test_transform_matches_reference_and_round_trips(itemsize: int, data: st.DataObject) -> None:
    new, base = pair(data, itemsize)
    z = streams.zigzag_diff(new, base, itemsize)
    assert z.tolist() == zigzag_reference(new, base, itemsize)
    payload = streams.encode(new, base, itemsize, CCTX)
    assert streams.decode(payload, base, itemsize, DCTX) == new


def test_planes_are_verbatim_or_zstd_whichever_is_smaller() -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**32, 4096, dtype=np.uint32)
    new = base + np.uint32(3)  # z = 6 everywhere: every plane compresses
    payload = streams.encode(new.tobytes(), base.tobytes(), 4, CCTX)
    methods = [payload[1 + 5 * i] for i in range(4)]
    assert methods == [streams.METHOD_ZSTD] * 4 and len(payload) < 200
    noise = rng.integers(0, 2**32, 4096, dtype=np.uint32)  # every plane is noise
    payload = streams.encode(noise.tobytes(), base.tobytes(), 4, CCTX)
    heads = [struct.unpack_from("<BI", payload, 1 + 5 * i) for i in range(4)]
    assert heads == [(streams.METHOD_RAW, 4096)] * 4
    assert len(payload) == 1 + 4 * 5 + 4 * 4096


# --- inside objects -----------------------------------------------------------------------------


def fine_tune(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Weights and an Adam-like update: every weight moves by about 4e-4, whatever its size."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal(n) * 0.04).astype("<f4")
    return w, (w + rng.standard_normal(n).astype("<f4") * np.float32(4e-4)).astype("<f4")


def encode(
    new: bytes,
    base: bytes,
    chunk_size: int,
    out: io.RawIOBase | io.BytesIO | None = None,
    **kw: object,
) -> tuple[bytes, EncodeStats]:
    buf = out if out is not None else io.BytesIO()
    stats = encode_object(
        [new],
        size=len(new),
        itemsize=4,
        chunk_size=chunk_size,
        level=1,
        out=buf,  # type: ignore[arg-type]
        base=iter([base]),
        base_oid=BASE_OID,
        **kw,  # type: ignore[arg-type]
    )
    return (buf.getvalue() if isinstance(buf, io.BytesIO) else b""), stats


def decode(blob: bytes, base: bytes) -> bytes:
    def open_base(oid: str) -> Iterator[bytes]:
        assert oid == BASE_OID
        return iter([base])

    return b"".join(decode_object(io.BytesIO(blob), open_base))


@pytest.mark.parametrize("chunk_size", [4096, 1 << 20])  # whole-chunk and sampled choice
def test_dense_update_is_stored_as_differences(chunk_size: int) -> None:
    w, w2 = fine_tune(1 << 19)
    blob, stats = encode(w2.tobytes(), w.tobytes(), chunk_size)
    old, old_stats = encode(w2.tobytes(), w.tobytes(), chunk_size, diff=False)
    assert stats.diff_chunks == stats.chunks and old_stats.xor_chunks == old_stats.chunks
    assert read_header(io.BytesIO(blob)).version == VERSION_DIFF
    assert read_header(io.BytesIO(old)).version == VERSION
    assert describe(io.BytesIO(blob)) == "delta+diff"
    assert len(blob) < 0.97 * len(old)
    assert check_layout(io.BytesIO(blob), len(blob)).version == VERSION_DIFF
    assert decode(blob, w.tobytes()) == w2.tobytes()


def test_sign_flips_keep_xor_and_version_1_bytes() -> None:
    """Negated weights: an XOR is one bit per flip, a difference is huge; a chunk takes the
    difference only when it is smaller, and an object without one is what version 1 wrote."""
    for chunk_size in (4096, 1 << 18):
        w, _ = fine_tune(1 << 18)
        w2 = w.copy()
        w2[::97] = -w2[::97]
        blob, stats = encode(w2.tobytes(), w.tobytes(), chunk_size)
        old, _ = encode(w2.tobytes(), w.tobytes(), chunk_size, diff=False)
        assert blob == old and stats.diff_chunks == 0 and stats.xor_chunks == stats.chunks
        assert read_header(io.BytesIO(blob)).version == VERSION


def test_no_difference_streams_without_a_seekable_output() -> None:
    class Pipe(io.RawIOBase):
        def __init__(self) -> None:
            self.data = bytearray()

        def writable(self) -> bool:
            return True

        def write(self, b: object) -> int:
            view = memoryview(b).cast("B")  # type: ignore[arg-type]
            self.data += view
            return len(view)

    w, w2 = fine_tune(1 << 16)
    pipe = Pipe()
    _, stats = encode(w2.tobytes(), w.tobytes(), 1 << 14, out=pipe)
    old, _ = encode(w2.tobytes(), w.tobytes(), 1 << 14, diff=False)
    assert stats.diff_chunks == 0 and bytes(pipe.data) == old


def test_thread_pool_gives_identical_difference_bytes() -> None:
    from concurrent.futures import ThreadPoolExecutor

    w, w2 = fine_tune(300_000)
    alone, _ = encode(w2.tobytes(), w.tobytes(), 65536)
    pooled, stats = encode(w2.tobytes(), w.tobytes(), 65536, executor=ThreadPoolExecutor(2))
    assert pooled == alone and stats.diff_chunks == stats.chunks


def test_model_object_with_difference_chunks_is_version_4() -> None:
    """A merged rank-2 update on the first half of the rows, a fine-tune's noise on the rest:
    the first chunks are model residuals, the others difference streams."""
    rng = np.random.default_rng(3)
    m, n = 256, 256
    w = (rng.standard_normal((m, n)) * 0.04).astype("<f4")
    b = (rng.standard_normal((m, 2)) * 0.05).astype("<f4")
    a = (rng.standard_normal((2, n)) * 0.05).astype("<f4")
    w2 = (w + b @ a).astype("<f4")
    w2[m // 2 :] = (w[m // 2 :] + rng.standard_normal((m // 2, n)) * 4e-4).astype("<f4")
    u, eu = quantize(b.astype(np.float64), factor_bits(2))
    v, ev = quantize(a.T.astype(np.float64), factor_bits(2))
    model = Model("F32", m, n, u=u, v=v, eu=eu, ev=ev)
    blob, stats = encode(w2.tobytes(), w.tobytes(), 16384, model=model)
    assert (stats.model_chunks, stats.diff_chunks) == (8, 8)
    assert read_header(io.BytesIO(blob)).version == VERSION_MODEL_DIFF
    assert describe(io.BytesIO(blob)) == "delta+lowrank2+diff"
    assert check_layout(io.BytesIO(blob), len(blob)).version == VERSION_MODEL_DIFF
    assert decode(blob, w.tobytes()) == w2.tobytes()


# --- golden bytes -------------------------------------------------------------------------------

GOLDEN_V3 = (
    "504c4b4f03040100002000000000000000100000abababababababababababababababababababababababab"
    "abababababababab057600000000011c00000001170000000117000000011700000028b52ffd640003750000"
    "38060606060600060100f62b6004fe6ede6228b52ffd6400034d00001000000100fb2b8005cdac85f028b52f"
    "fd6400034d00001000000100fb2b8005cdac85f028b52ffd6400034d00001000000100fb2b8005cdac85f005"
    "7100000000011700000001170000000117000000011700000028b52ffd6400034d00001006060100fb2b8005"
    "cfeffdea28b52ffd6400034d00001000000100fb2b8005cdac85f028b52ffd6400034d00001000000100fb2b"
    "8005cdac85f028b52ffd6400034d00001000000100fb2b8005cdac85f0"
)


def golden_inputs() -> tuple[bytes, bytes]:
    """Integer bit patterns (no float arithmetic): the new version adds 3 to every element,
    which carries through many low bits (an XOR pays for that, a difference does not)."""
    base = np.uint32(0x3C000000) + np.arange(2048, dtype=np.uint32) * np.uint32(0x1003)
    new = base + np.uint32(3)
    new[5] = base[5]
    return new.astype("<u4").tobytes(), base.astype("<u4").tobytes()


def test_golden_v3_encode_and_decode() -> None:
    new, base = golden_inputs()
    blob, stats = encode(new, base, 4096)
    assert (stats.diff_chunks, stats.xor_chunks) == (2, 0)
    assert blob.hex() == GOLDEN_V3
    assert decode(bytes.fromhex(GOLDEN_V3), base) == new


# --- damage -------------------------------------------------------------------------------------


def _damaged(edit: int, value: int) -> bytes:
    new, base = golden_inputs()
    blob = bytearray(encode(new, base, 4096)[0])
    blob[edit] = value
    return bytes(blob)


FIRST = HEADER_SIZE + CHUNK_HEADER_SIZE  # the first chunk's payload


@pytest.mark.parametrize(
    ("edit", "value", "message"),
    [
        (FIRST, 1, "unknown transform"),
        (FIRST + 1, 7, "plane 0 has method 7"),
        (FIRST + 1, 0, "plane 0 has method 0"),
        (FIRST + 2, 0xFF, "plane 0 is truncated"),
        (FIRST + 21, 0x00, "plane 0 does not"),
    ],
)
def test_damaged_difference_chunk(edit: int, value: int, message: str) -> None:
    _, base = golden_inputs()
    with pytest.raises(CorruptObjectError, match=message):
        decode(_damaged(edit, value), base)


def test_kind_5_in_a_version_1_object_is_unknown() -> None:
    new, base = golden_inputs()
    blob = bytearray(encode(new, base, 4096)[0])
    blob[4] = VERSION
    with pytest.raises(CorruptObjectError, match="unknown kind 5"):
        decode(bytes(blob), base)
    with pytest.raises(CorruptObjectError, match="unknown kind 5"):
        check_layout(io.BytesIO(bytes(blob)), len(blob))


@pytest.mark.parametrize("version", [5, 0xFF])
def test_unknown_version_is_refused(version: int) -> None:
    blob = bytearray(_damaged(4, version))
    with pytest.raises(CorruptObjectError, match=f"unsupported format version {version}"):
        read_header(io.BytesIO(bytes(blob)))


def test_version_3_needs_a_base() -> None:
    blob = bytearray(_damaged(6, 0))  # depth 0
    blob[20:52] = bytes(32)
    with pytest.raises(CorruptObjectError, match="depth 0 does not match"):
        read_header(io.BytesIO(bytes(blob)))


def test_xor_kind_still_allowed_in_version_3() -> None:
    assert KIND_XOR < KIND_MODEL < KIND_DIFF  # kinds keep their numbers
    new, base = golden_inputs()
    blob, _ = encode(new, base, 4096)
    assert decode(blob, base) == new


@SETTINGS
@given(st.integers(HEADER_SIZE, 292), st.integers(1, 255), st.booleans())
def test_any_damage_is_a_corrupt_object_or_caught_by_the_hash(
    at: int, flip: int, cut: bool
) -> None:
    """A flipped byte or a truncation anywhere after the header either raises
    ``CorruptObjectError`` or decodes to bytes of the right length that the object's sha256
    (checked by every read of the store) rejects: verbatim planes carry no checksum."""
    new, base = golden_inputs()
    blob = bytearray.fromhex(GOLDEN_V3)
    damaged = (
        bytes(blob[:at]) if cut else bytes(blob[:at] + bytes([blob[at] ^ flip]) + blob[at + 1 :])
    )
    try:
        back = decode(damaged, base)
    except CorruptObjectError:
        return
    assert len(back) == len(new) and back != new

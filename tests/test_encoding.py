"""Object file format v1: round trips, deltas, golden bytes and corruption handling."""

from __future__ import annotations

import hashlib
import io
import itertools
import struct
from collections.abc import Iterator

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from potluck.errors import CorruptObjectError
from potluck.objects.encoding import (
    CHUNK_HEADER_SIZE,
    HEADER_SIZE,
    KIND_GROUPED,
    KIND_RAW,
    KIND_SAME,
    KIND_XOR,
    SMALL_SAMPLE_MIN,
    SMALL_SAMPLES,
    TINY_CHUNK,
    TINY_LEVEL,
    EncodeStats,
    byte_group,
    byte_ungroup,
    decode_object,
    encode_object,
    encode_small_many,
    read_header,
    rechunk,
    sha256_of_chunks,
    xor_bytes,
)

SETTINGS = settings(derandomize=True, deadline=None, max_examples=60)
ITEMSIZES = st.sampled_from([1, 2, 4, 8])


def oid_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Objects:
    """A dict of encoded objects with an ``open_base`` that decodes through delta chains."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.opened: list[str] = []

    def put(
        self,
        data: bytes,
        *,
        itemsize: int,
        chunk_size: int,
        base: bytes | None = None,
        pieces: list[bytes] | None = None,
        key: str | None = None,
    ) -> tuple[str, EncodeStats]:
        out = io.BytesIO()
        base_oid = oid_of(base) if base is not None else None
        stats = encode_object(
            pieces if pieces is not None else rechunk([data], chunk_size),
            size=len(data),
            itemsize=itemsize,
            chunk_size=chunk_size,
            level=3,
            out=out,
            base=rechunk([base], chunk_size) if base is not None else None,
            base_oid=base_oid,
            base_depth=read_header(io.BytesIO(self.blobs[base_oid])).depth if base_oid else 0,
        )
        blob = out.getvalue()
        assert stats.stored_size == len(blob)
        key = key or oid_of(data)
        self.blobs[key] = blob
        return key, stats

    def open_base(self, oid: str) -> Iterator[bytes]:
        self.opened.append(oid)
        return decode_object(io.BytesIO(self.blobs[oid]), self.open_base)

    def get(self, oid: str) -> bytes:
        return b"".join(self.open_base(oid))


def make_data(kind: str, n_items: int, itemsize: int, seed: int) -> bytes:
    """Logical bytes of ``n_items`` elements that compress badly, well or perfectly."""
    rng = np.random.default_rng(seed)
    n = n_items * itemsize
    if kind == "random":
        return rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    if kind == "zeros":
        return bytes(n)
    if kind == "floats" and itemsize in (2, 4, 8):
        dtype = {2: "<f2", 4: "<f4", 8: "<f8"}[itemsize]
        return rng.standard_normal(n_items).astype(dtype).tobytes()
    return rng.integers(0, 4, n, dtype=np.uint8).tobytes()


def mutate(data: bytes, itemsize: int, how: str, seed: int) -> bytes:
    """A variant of ``data`` of the same size: identical, sparsely changed or unrelated."""
    rng = np.random.default_rng(seed)
    arr = np.frombuffer(data, np.uint8).copy()
    if how == "sparse" and arr.size:
        idx = rng.integers(0, arr.size, max(1, arr.size // 50))
        arr[idx] ^= rng.integers(1, 256, idx.size, dtype=np.uint8)
    elif how == "unrelated":
        arr = rng.integers(0, 256, arr.size, dtype=np.uint8)
    return arr.tobytes()


def cut(data: bytes, seed: int) -> list[bytes]:
    """``data`` split at random places (the encoder must re-cut it)."""
    rng = np.random.default_rng(seed)
    points = sorted(rng.integers(0, len(data) + 1, 3).tolist()) if data else []
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


case = st.tuples(
    ITEMSIZES,
    st.sampled_from([0, 1, 7, 16, 64, 100, 333]),  # elements
    st.integers(1, 24),  # elements per chunk
    st.sampled_from(["random", "zeros", "floats", "small"]),
    st.integers(0, 2**32 - 1),
)


@SETTINGS
@given(case)
def test_standalone_round_trip(c: tuple[int, int, int, str, int]) -> None:
    itemsize, n_items, per_chunk, kind, seed = c
    data = make_data(kind, n_items, itemsize, seed)
    objs = Objects()
    oid, stats = objs.put(
        data, itemsize=itemsize, chunk_size=per_chunk * itemsize, pieces=cut(data, seed)
    )
    assert stats.depth == 0 and stats.base_oid is None and stats.size == len(data)
    assert stats.chunks == -(-len(data) // (per_chunk * itemsize))
    assert objs.get(oid) == data


@SETTINGS
@given(case, st.sampled_from(["same", "sparse", "unrelated"]))
def test_delta_round_trip(c: tuple[int, int, int, str, int], how: str) -> None:
    itemsize, n_items, per_chunk, kind, seed = c
    base = make_data(kind, n_items, itemsize, seed)
    data = mutate(base, itemsize, how, seed + 1)
    objs = Objects()
    objs.put(base, itemsize=itemsize, chunk_size=per_chunk * itemsize)
    oid, stats = objs.put(
        data, itemsize=itemsize, chunk_size=per_chunk * itemsize, base=base, key="delta"
    )
    header = read_header(io.BytesIO(objs.blobs[oid]))
    assert (header.depth, header.base_oid) == (stats.depth, stats.base_oid)
    uses_base = stats.xor_chunks + stats.same_chunks + stats.diff_chunks > 0
    assert stats.depth == (1 if uses_base else 0)
    if how == "same" and data:
        assert stats.same_chunks == stats.chunks
    assert objs.get(oid) == data


@SETTINGS
@given(ITEMSIZES, st.integers(0, 2**32 - 1))
def test_chain_of_depth_three(itemsize: int, seed: int) -> None:
    chunk_size = 64 * itemsize
    versions = [make_data("floats", 1000, itemsize, seed)]
    for i in range(3):
        versions.append(mutate(versions[-1], itemsize, "sparse", seed + i))
    objs = Objects()
    oid, stats = objs.put(versions[0], itemsize=itemsize, chunk_size=chunk_size)
    for depth, (prev, cur) in enumerate(itertools.pairwise(versions), start=1):
        oid, stats = objs.put(cur, itemsize=itemsize, chunk_size=chunk_size, base=prev)
        assert stats.depth == depth
    objs.opened.clear()
    assert objs.get(oid) == versions[3]
    assert objs.opened == [oid_of(v) for v in reversed(versions)]


def test_decode_pulls_base_in_lockstep() -> None:
    base = make_data("floats", 4096, 4, 1)
    data = mutate(base, 4, "sparse", 2)
    objs = Objects()
    objs.put(base, itemsize=4, chunk_size=1024)
    oid, _ = objs.put(data, itemsize=4, chunk_size=1024, base=base)
    pulled = []

    def open_base(b: str) -> Iterator[bytes]:
        for chunk in objs.open_base(b):
            pulled.append(len(chunk))
            yield chunk

    chunks = decode_object(io.BytesIO(objs.blobs[oid]), open_base)
    assert next(chunks) == data[:1024]
    assert len(pulled) <= 1
    assert b"".join(chunks) == data[1024:]


def test_base_that_does_not_help_is_dropped() -> None:
    base = make_data("random", 4096, 4, 1)
    data = make_data("random", 4096, 4, 2)
    objs = Objects()
    objs.put(base, itemsize=4, chunk_size=4096)
    oid, stats = objs.put(data, itemsize=4, chunk_size=4096, base=base)
    assert (stats.depth, stats.base_oid) == (0, None)
    assert read_header(io.BytesIO(objs.blobs[oid])).base_oid is None

    def no_base(b: str) -> Iterator[bytes]:
        raise AssertionError("a standalone object must not open a base")

    assert b"".join(decode_object(io.BytesIO(objs.blobs[oid]), no_base)) == data


# --- sizes -------------------------------------------------------------------------------------


def _weights(n: int = 1 << 20) -> np.ndarray:
    return np.random.default_rng(0).standard_normal(n).astype("<f4")


def _delta_ratio(base: np.ndarray, new: np.ndarray, chunk_size: int = 1 << 18) -> float:
    objs = Objects()
    objs.put(base.tobytes(), itemsize=4, chunk_size=chunk_size)
    oid, stats = objs.put(new.tobytes(), itemsize=4, chunk_size=chunk_size, base=base.tobytes())
    assert objs.get(oid) == new.tobytes()
    return stats.stored_size / stats.size


def test_sparse_change_is_cheap() -> None:
    w = _weights()
    rng = np.random.default_rng(1)
    w2 = w.copy()
    idx = rng.choice(w.size, w.size // 100, replace=False)
    w2[idx] += rng.standard_normal(idx.size).astype("<f4")
    assert _delta_ratio(w, w2) < 0.05


def test_small_dense_update_beats_standalone() -> None:
    w = _weights()
    rng = np.random.default_rng(2)
    w2 = (w + 1e-3 * w * rng.standard_normal(w.size)).astype("<f4")
    assert _delta_ratio(w, w2) < 0.70


def test_unchanged_chunk_costs_its_header_only() -> None:
    w = _weights(1 << 16)
    chunk_size = 1 << 14
    w2 = w.copy()
    w2[:10] += 1  # only chunk 0 changes
    objs = Objects()
    objs.put(w.tobytes(), itemsize=4, chunk_size=chunk_size)
    oid, stats = objs.put(w2.tobytes(), itemsize=4, chunk_size=chunk_size, base=w.tobytes())
    assert stats.same_chunks == stats.chunks - 1 == 15
    blob = objs.blobs[oid]
    _, first_len = struct.unpack_from("<BI", blob, HEADER_SIZE)
    assert len(blob) == HEADER_SIZE + CHUNK_HEADER_SIZE + first_len + 15 * CHUNK_HEADER_SIZE


# --- golden bytes: the canonical encoding must not drift silently -------------------------------

GOLDEN_RAW = (
    "504c4b4f01040000400000000000000020000000000000000000000000000000000000000000000000000000"
    "00000000000000000020000000000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e"
    "1f0020000000202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f"
)
GOLDEN_GROUPED = (
    "504c4b4f01040000000200000000000000010000000000000000000000000000000000000000000000000000"
    "0000000000000000016000000028b52ffd6400009502006404000080004080a0c0e000102030405060708088"
    "9098a0a8b0b8c0c8d0d8e0e8f0f80004080c1014181c2024282c3034383c4044484c5054585c6064686c7074"
    "787c003f4041420410008dd41384c3d33646a20805015b00000028b52ffd6400006d02003404000080828486"
    "888a8c8e90929496989a9c9ea0a2a4a6a8aaacaeb0b2b4b6b8babcbec0c2c4c6c8caccced0d2d4d6d8dadcde"
    "e0e2e4e6e8eaeceef0f2f4f6f8fafcfe420200018114770ab0a2d45860"
)
GOLDEN_DELTA = (
    "504c4b4f010401000002000000000000000100009a7da1da62b9bde6e5fc843d1003baa8358e30e88e196434"
    "321e4235a8d7e435021d00000028b52ffd6400007d0000300000c000ff00035002009026f934da6e4c760300"
    "000000"
)


def _golden_inputs() -> tuple[bytes, bytes, bytes]:
    arange = np.arange(128, dtype="<f4")
    changed = arange.copy()
    changed[3] = -1
    return bytes(range(64)), arange.tobytes(), changed.tobytes()


def test_golden_bytes_decode() -> None:
    raw, arange, changed = _golden_inputs()
    objs = Objects()
    objs.blobs = {oid_of(d): bytes.fromhex(h) for d, h in [(arange, GOLDEN_GROUPED)]}
    assert b"".join(decode_object(io.BytesIO(bytes.fromhex(GOLDEN_RAW)), objs.open_base)) == raw
    assert objs.get(oid_of(arange)) == arange
    delta = decode_object(io.BytesIO(bytes.fromhex(GOLDEN_DELTA)), objs.open_base)
    assert b"".join(delta) == changed


def test_golden_bytes_encode() -> None:
    raw, arange, changed = _golden_inputs()
    objs = Objects()
    _, s1 = objs.put(raw, itemsize=4, chunk_size=32)
    _, s2 = objs.put(arange, itemsize=4, chunk_size=256)
    oid, s3 = objs.put(changed, itemsize=4, chunk_size=256, base=arange)
    assert (s1.raw_chunks, s2.grouped_chunks, s3.xor_chunks, s3.same_chunks) == (2, 2, 1, 1)
    assert objs.blobs[oid_of(raw)].hex() == GOLDEN_RAW
    assert objs.blobs[oid_of(arange)].hex() == GOLDEN_GROUPED
    assert objs.blobs[oid].hex() == GOLDEN_DELTA


# --- corruption ---------------------------------------------------------------------------------


def _decode_all(blob: bytes) -> bytes:
    objs = Objects()
    return b"".join(decode_object(io.BytesIO(blob), objs.open_base))


def test_bad_magic() -> None:
    blob = b"XXXX" + bytes.fromhex(GOLDEN_RAW)[4:]
    with pytest.raises(CorruptObjectError, match="bad magic") as e:
        read_header(io.BytesIO(blob))
    assert "potluck fsck" in str(e.value)


def test_bad_version_and_reserved() -> None:
    blob = bytearray.fromhex(GOLDEN_RAW)
    blob[4] = 9
    with pytest.raises(CorruptObjectError, match="unsupported format version 9"):
        read_header(io.BytesIO(bytes(blob)))
    blob = bytearray.fromhex(GOLDEN_RAW)
    blob[7] = 1
    with pytest.raises(CorruptObjectError, match="reserved"):
        read_header(io.BytesIO(bytes(blob)))


@pytest.mark.parametrize("keep", [0, 3, 20, HEADER_SIZE - 1])
def test_truncated_header(keep: int) -> None:
    with pytest.raises(CorruptObjectError, match="truncated header"):
        read_header(io.BytesIO(bytes.fromhex(GOLDEN_RAW)[:keep]))


@pytest.mark.parametrize("golden", [GOLDEN_RAW, GOLDEN_GROUPED])
def test_truncated_body(golden: str) -> None:
    blob = bytes.fromhex(golden)
    for keep in (HEADER_SIZE, HEADER_SIZE + 2, len(blob) - 1):
        with pytest.raises(CorruptObjectError, match=r"truncated chunk \d"):
            _decode_all(blob[:keep])


def test_trailing_bytes() -> None:
    with pytest.raises(CorruptObjectError, match="trailing bytes"):
        _decode_all(bytes.fromhex(GOLDEN_RAW) + b"\0")


def test_damaged_zstd_payload() -> None:
    blob = bytearray.fromhex(GOLDEN_GROUPED)
    blob[HEADER_SIZE + CHUNK_HEADER_SIZE + 20] ^= 0xFF
    with pytest.raises(CorruptObjectError, match="chunk 0"):
        _decode_all(bytes(blob))


def test_unknown_chunk_kind() -> None:
    blob = bytearray.fromhex(GOLDEN_RAW)
    blob[HEADER_SIZE] = 7
    with pytest.raises(CorruptObjectError, match="unknown kind 7"):
        _decode_all(bytes(blob))


def test_delta_without_its_base_declared() -> None:
    blob = bytearray.fromhex(GOLDEN_DELTA)
    blob[6] = 0  # depth 0 but a base digest is present
    with pytest.raises(CorruptObjectError, match="depth 0"):
        read_header(io.BytesIO(bytes(blob)))


def test_base_too_short() -> None:
    _, arange, _ = _golden_inputs()

    def short_base(oid: str) -> Iterator[bytes]:
        yield arange[:256]

    with pytest.raises(CorruptObjectError, match="shorter than its delta"):
        b"".join(decode_object(io.BytesIO(bytes.fromhex(GOLDEN_DELTA)), short_base))


# --- encoder arguments and helpers --------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "itemsize", "chunk_size", "match"),
    [
        (8, 3, 8, "itemsize"),
        (8, 4, 6, "chunk_size"),
        (6, 4, 8, "size 6"),
        (16, 4, 8, "declared size is 16"),
        (4, 4, 8, "declared size 4"),
    ],
)
def test_encode_rejects_bad_arguments(
    size: int, itemsize: int, chunk_size: int, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        encode_object(
            [bytes(8)],
            size=size,
            itemsize=itemsize,
            chunk_size=chunk_size,
            level=3,
            out=io.BytesIO(),
        )


def test_header_fields() -> None:
    h = read_header(io.BytesIO(bytes.fromhex(GOLDEN_DELTA)))
    assert (h.version, h.itemsize, h.depth, h.size, h.chunk_size) == (1, 4, 1, 512, 256)
    assert h.base_oid == oid_of(_golden_inputs()[1])
    assert (h.n_chunks, h.chunk_length(1)) == (2, 256)
    assert (KIND_RAW, KIND_GROUPED, KIND_XOR, KIND_SAME) == (0, 1, 2, 3)


@SETTINGS
@given(ITEMSIZES, st.integers(0, 200), st.integers(0, 2**32 - 1))
def test_group_ungroup_xor(itemsize: int, n_items: int, seed: int) -> None:
    a = make_data("random", n_items, itemsize, seed)
    b = make_data("random", n_items, itemsize, seed + 1)
    grouped = byte_group(a, itemsize)
    assert byte_ungroup(grouped, itemsize) == a
    if n_items and itemsize > 1:
        assert grouped[:n_items] == a[::itemsize]
    assert xor_bytes(xor_bytes(a, b), b) == a
    assert xor_bytes(a, a) == bytes(len(a))


def test_xor_rejects_unequal_lengths() -> None:
    with pytest.raises(ValueError, match="equal lengths"):
        xor_bytes(b"ab", b"a")


@SETTINGS
@given(st.lists(st.binary(max_size=50), max_size=8), st.integers(1, 17))
def test_rechunk(pieces: list[bytes], chunk_size: int) -> None:
    out = list(rechunk([memoryview(p) for p in pieces], chunk_size))
    assert b"".join(out) == b"".join(pieces)
    assert all(len(c) == chunk_size for c in out[:-1])
    assert all(0 < len(c) <= chunk_size for c in out)
    assert sha256_of_chunks(out) == oid_of(b"".join(pieces))


def test_thread_pool_gives_identical_bytes() -> None:
    from concurrent.futures import ThreadPoolExecutor

    gen = np.random.default_rng(7)
    base = (gen.standard_normal(300_000) * 0.02).astype(np.float32)
    new = base.copy()
    new[::7] += 1e-3
    outs = []
    for ex in (None, ThreadPoolExecutor(2)):
        buf = io.BytesIO()
        encode_object(
            [new.tobytes()],
            size=new.nbytes,
            itemsize=4,
            chunk_size=65536,
            level=1,
            out=buf,
            base=iter([base.tobytes()]),
            base_oid="ab" * 32,
            base_depth=0,
            executor=ex,
        )
        outs.append(buf.getvalue())
    assert outs[0] == outs[1]


def test_thread_pool_decode_matches_sequential() -> None:
    from concurrent.futures import ThreadPoolExecutor

    gen = np.random.default_rng(8)
    base = (gen.standard_normal(200_000) * 0.02).astype(np.float32)
    new = base.copy()
    new[::5] += 1e-3
    new[-1000:] = gen.standard_normal(1000)
    b_buf, n_buf = io.BytesIO(), io.BytesIO()
    encode_object(
        [base.tobytes()], size=base.nbytes, itemsize=4, chunk_size=32768, level=1, out=b_buf
    )
    encode_object(
        [new.tobytes()],
        size=new.nbytes,
        itemsize=4,
        chunk_size=32768,
        level=1,
        out=n_buf,
        base=iter([base.tobytes()]),
        base_oid="cd" * 32,
    )
    pool = ThreadPoolExecutor(2)

    def open_base(oid: str) -> Iterator[bytes]:
        assert oid == "cd" * 32
        return decode_object(io.BytesIO(b_buf.getvalue()), open_base, pool)

    for ex in (None, pool):
        got = b"".join(decode_object(io.BytesIO(n_buf.getvalue()), open_base, ex))
        assert got == new.tobytes()


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from([1, 2, 4, 8]),
    st.lists(
        st.tuples(
            st.integers(1, 300) | st.integers(4097, 5000),
            st.sampled_from(["zeros", "ramp", "noise"]),
        ),
        min_size=1,
        max_size=12,
    ),
)
def test_encode_small_many_writes_what_encode_object_writes(
    itemsize: int, specs: list[tuple[int, str]]
) -> None:
    """The batch encoder (``encode_small_many``, used for files of many small tensors) writes
    for each buffer exactly the file ``encode_object`` writes for it alone."""
    rng = np.random.default_rng(len(specs))
    datas: list[bytes] = []
    for n, kind in specs:
        size = n * itemsize
        if kind == "zeros":
            datas.append(bytes(size))
        elif kind == "ramp":
            datas.append(bytes(i % 7 for i in range(size)))
        else:
            datas.append(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
    cs = 1 << 16  # sizes both sides of TINY_CHUNK (tiny ones are compressed at TINY_LEVEL)
    got = encode_small_many(
        [memoryview(d) for d in datas], itemsize=itemsize, chunk_size=cs, level=1
    )
    for data, out in zip(datas, got, strict=True):
        one = io.BytesIO()
        encode_object([data], size=len(data), itemsize=itemsize, chunk_size=cs, level=1, out=one)
        assert out == one.getvalue()


@pytest.mark.parametrize("size", [TINY_CHUNK, TINY_CHUNK + 4])
def test_a_tiny_chunk_is_compressed_at_the_fast_level(size: int) -> None:
    """A standalone chunk of at most ``TINY_CHUNK`` bytes is zstd at ``TINY_LEVEL`` of its
    grouped bytes; a larger one at the configured level (the reference: zstd itself)."""
    data = (np.arange(size // 4, dtype="<f4") % 3).tobytes()
    one = io.BytesIO()
    encode_object([data], size=size, itemsize=4, chunk_size=1 << 16, level=9, out=one)
    level = TINY_LEVEL if size <= TINY_CHUNK else 9
    zc = zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=True)
    payload = zc.compress(byte_group(data, 4))
    assert len(payload) < 0.5 * size
    assert one.getvalue()[HEADER_SIZE:] == struct.pack("<BI", KIND_GROUPED, len(payload)) + payload


def _alone(data: bytes, itemsize: int, cs: int) -> bytes:
    one = io.BytesIO()
    encode_object([data], size=len(data), itemsize=itemsize, chunk_size=cs, level=1, out=one)
    return one.getvalue()


def _kind(obj: bytes) -> int:
    return obj[HEADER_SIZE]


def _batch(count: int, ramps: set[int]) -> list[bytes]:
    """``count`` buffers of 1100 random bytes, except those at ``ramps`` (very compressible)."""
    rng = np.random.default_rng(count)
    ramp = bytes(i % 7 for i in range(1100))
    return [ramp if k in ramps else rng.bytes(1100) for k in range(count)]


def test_a_large_batch_whose_sample_does_not_compress_is_stored_raw() -> None:
    """In a batch of ``SMALL_SAMPLE_MIN`` or more objects, ``SMALL_SAMPLES`` evenly spaced ones
    are compressed first; when none of them saves anything, every object is written raw (a
    compressible one between the sampled positions too) and still decodes to its bytes."""
    count, cs = SMALL_SAMPLE_MIN + 5, 1 << 16
    step = count // SMALL_SAMPLES
    hidden = {1, step + 1, 5 * step + 3}  # never a multiple of ``step``: not sampled
    datas = _batch(count, hidden)
    got = encode_small_many(datas, itemsize=4, chunk_size=cs, level=1)
    assert {_kind(obj) for obj in got} == {KIND_RAW}
    for k, (data, obj) in enumerate(zip(datas, got, strict=True)):
        assert b"".join(decode_object(io.BytesIO(obj), _no_base)) == data
        if k not in hidden:  # what the object alone gives: zstd does not shrink noise
            assert obj == _alone(data, 4, cs)
    assert _kind(_alone(datas[1], 4, cs)) == KIND_GROUPED  # alone, it would be compressed


def test_a_large_batch_with_a_compressible_sampled_object_is_encoded_as_each_alone() -> None:
    count, cs = SMALL_SAMPLE_MIN, 1 << 16
    step = count // SMALL_SAMPLES
    datas = _batch(count, {3 * step, 3 * step + 1})  # the first is sampled
    got = encode_small_many(datas, itemsize=4, chunk_size=cs, level=1)
    assert [obj == _alone(data, 4, cs) for data, obj in zip(datas, got, strict=True)] == [
        True
    ] * count
    assert _kind(got[3 * step + 1]) == KIND_GROUPED


def _no_base(oid: str) -> Iterator[bytes]:
    raise AssertionError(f"a standalone object asked for a base {oid}")


@pytest.mark.parametrize("size", [0, 6, 4100])
def test_encode_small_many_refuses_what_is_not_one_chunk(size: int) -> None:
    with pytest.raises(ValueError, match=f"object 1: length {size} is not a positive multiple"):
        encode_small_many([b"abcd", bytes(size)], itemsize=4, chunk_size=4096, level=1)

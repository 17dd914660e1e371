"""Object format v2: structured updates (low-rank, row/column scales) stored as a model plus an
exact residual; bit-exact round trips, fallback, golden bytes, corruption and determinism."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import subprocess
import sys
from collections.abc import Callable

import ml_dtypes
import numpy as np
import pytest
import zstandard

from potluck.config import RepoConfig
from potluck.errors import CorruptObjectError
from potluck.objects import structured
from potluck.objects.encoding import (
    KIND_MODEL,
    VERSION_MODEL,
    byte_group,
    check_layout,
    decode_object,
    describe,
    encode_object,
    has_model,
    read_header,
    xor_bytes,
)
from potluck.objects.structdetect import best_model
from potluck.objects.structured import Model, reconstruct
from potluck.ops.vcs.odb import ObjectDB
from potluck.store.memory import MemoryStore

NP = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}
SHAPE = (256, 384)  # 384 KiB in F32; rows straddle the 64 KiB chunks
CHUNK = 64 << 10


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def base_matrix(dtype: str, seed: int = 0, shape: tuple[int, int] = SHAPE) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)).astype(NP[dtype])


def merged_lora(w: np.ndarray, rank: int, seed: int = 1) -> np.ndarray:
    """What a LoRA merge writes: w + (B @ A) * alpha/r in float32, rounded to w's dtype."""
    rng = np.random.default_rng(seed)
    b = rng.standard_normal((w.shape[0], rank), dtype=np.float32) * np.float32(0.02)
    a = rng.standard_normal((rank, w.shape[1]), dtype=np.float32) * np.float32(0.02)
    product = np.einsum("ik,kj->ij", b, a)  # not BLAS: the same input whatever the threads
    merged = w.astype(np.float32) + product * np.float32(16 / rank)
    return merged.astype(w.dtype)


def db() -> ObjectDB:
    return ObjectDB(MemoryStore(), RepoConfig(chunk_bytes=CHUNK), workers=1)


def put_pair(
    odb: ObjectDB, old: np.ndarray, new: np.ndarray, dtype: str | None, shape: tuple[int, ...]
) -> str:
    """Store ``old`` then ``new`` against it; returns the new object's id."""
    k = old.dtype.itemsize
    ob, nb = old.tobytes(), new.tobytes()
    odb.put(sha(ob), lambda: [ob], size=len(ob), itemsize=k)
    oid = sha(nb)
    odb.put(oid, lambda: [nb], size=len(nb), itemsize=k, base_oid=sha(ob), dtype=dtype, shape=shape)
    return oid


def stored(odb: ObjectDB, oid: str) -> bytes:
    with odb.store.open(oid) as f:
        return f.read()


def how(odb: ObjectDB, oid: str) -> str:
    with odb.store.open(oid) as f:
        return describe(f)


# --- round trips --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
@pytest.mark.parametrize("rank", [1, 8, 16])
def test_merged_lora_round_trip(dtype: str, rank: int) -> None:
    odb = db()
    old = base_matrix(dtype)
    new = merged_lora(old, rank)
    oid = put_pair(odb, old, new, dtype, SHAPE)
    assert how(odb, oid) == f"delta+lowrank{rank}"
    assert odb.read_bytes(oid) == new.tobytes()
    plain = db()
    plain_oid = put_pair(plain, old, new, None, SHAPE)
    assert how(plain, plain_oid) in ("delta", "delta+diff")  # no model without dtype/shape
    limit = 0.5 if dtype == "F32" else 0.75  # 16-bit: the factors weigh more in a small matrix
    assert len(stored(odb, oid)) < limit * len(stored(plain, plain_oid))


@pytest.mark.parametrize("dtype", ["F32", "BF16"])
@pytest.mark.parametrize("axis", ["rows", "cols"])
def test_scaled_round_trip(dtype: str, axis: str) -> None:
    odb = db()
    old = base_matrix(dtype)
    rng = np.random.default_rng(5)
    if axis == "rows":
        scale = rng.uniform(0.5, 1.5, (SHAPE[0], 1)).astype(np.float32)
    else:
        scale = rng.uniform(0.5, 1.5, (1, SHAPE[1])).astype(np.float32)
    new = (old.astype(np.float32) * scale).astype(old.dtype)
    oid = put_pair(odb, old, new, dtype, SHAPE)
    assert how(odb, oid) == ("delta+rowscale" if axis == "rows" else "delta+colscale")
    assert odb.read_bytes(oid) == new.tobytes()
    assert len(stored(odb, oid)) < 0.05 * new.nbytes


def test_full_rank_update_keeps_todays_bytes() -> None:
    old = base_matrix("F32")
    rng = np.random.default_rng(7)
    new = (old + rng.standard_normal(SHAPE, dtype=np.float32) * np.float32(1e-3)).astype("<f4")
    a, b = db(), db()
    oid = put_pair(a, old, new, "F32", SHAPE)
    put_pair(b, old, new, None, SHAPE)
    assert stored(a, oid) == stored(b, oid)
    assert not has_model(read_header(io.BytesIO(stored(a, oid))).version)


@pytest.mark.parametrize("shape", [(SHAPE[0] * SHAPE[1],), (16, 16, SHAPE[0] * SHAPE[1] // 256)])
def test_not_two_dimensional_is_untouched(shape: tuple[int, ...]) -> None:
    old = base_matrix("F32")
    new = merged_lora(old, 4)
    a, b = db(), db()
    oid = put_pair(a, old, new, "F32", shape)
    put_pair(b, old, new, None, SHAPE)
    assert stored(a, oid) == stored(b, oid)
    assert how(a, oid) in ("delta", "delta+diff")  # no model


def test_integer_dtype_is_untouched() -> None:
    old = np.random.default_rng(0).integers(-100, 100, SHAPE, dtype=np.int32)
    new = old + np.int32(3)
    a, b = db(), db()
    oid = put_pair(a, old, new, "I32", SHAPE)
    put_pair(b, old, new, None, SHAPE)
    assert stored(a, oid) == stored(b, oid)


# --- the reconstruction against a naive reference ----------------------------------------------


def _round_naive(x: float, dtype: str) -> int:
    f32 = struct.unpack("<I", struct.pack("<f", x))[0]  # float64 -> float32, nearest even
    if dtype == "F32":
        return int(f32)
    if dtype == "F16":
        (h,) = struct.unpack(
            "<H", struct.pack("<e", struct.unpack("<f", struct.pack("<I", f32))[0])
        )
        return int(h)
    return (f32 + 0x7FFF + ((f32 >> 16) & 1)) >> 16  # nearest even on the bit pattern


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
@pytest.mark.parametrize("scales", [False, True])
@pytest.mark.parametrize("block", [1 << 18, 5])  # whole pieces; blocks ending inside rows
def test_reconstruction_matches_naive_float64_loop(
    dtype: str, scales: bool, block: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(structured, "BLOCK_ELEMENTS", block)
    m, n, r = 7, 11, 3
    rng = np.random.default_rng(3)
    base = base_matrix(dtype, 4, (m, n))
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    limit = 1 << structured.factor_bits(r)
    model = Model(
        dtype,
        m,
        n,
        row=f32(m) if scales else None,
        col=f32(n) if scales else None,
        u=rng.integers(1 - limit, limit, (m, r)).astype(np.int32),
        v=rng.integers(1 - limit, limit, (n, r)).astype(np.int32),
        eu=rng.integers(-40, -20, m).astype(np.int8),
        ev=rng.integers(-40, -20, n).astype(np.int8),
    )
    want = []
    for i in range(m):
        for j in range(n):
            x = float(base[i, j])
            if scales:
                assert model.row is not None and model.col is not None
                x = x * (float(model.row[i]) * float(model.col[j]))
            assert model.u is not None and model.v is not None
            assert model.eu is not None and model.ev is not None
            total = sum(int(model.u[i, k]) * int(model.v[j, k]) for k in range(r))  # exact
            x = x + float(total) * 2.0 ** (int(model.eu[i]) + int(model.ev[j]))
            want.append(_round_naive(x, dtype))
    width = "<u4" if dtype == "F32" else "<u2"
    flat = base.tobytes()
    k = base.dtype.itemsize
    got = np.frombuffer(reconstruct(model, flat, 0), width).tolist()
    assert got == want
    start = 17  # a piece that starts and ends inside a row
    piece = reconstruct(model, flat[start * k : 40 * k], start)
    assert np.frombuffer(piece, width).tolist() == want[start:40]


# --- golden bytes -------------------------------------------------------------------------------

GOLDEN_MODEL = (
    "504c4b4f020401000002000000000000000100009a7da1da62b9bde6e5fc843d1003baa8358e30e88e196434"
    "321e4235a8d7e43584000000040101000800000010000000fffffffffffffffffefefefefefefefefefefefe"
    "fefefefe000000000100000002000000030000000400000005000000060000000700000000000000ffffffff"
    "02000000fdffffff04000000fbffffff06000000f9ffffff08000000f7ffffff0a000000f5ffffff0c000000"
    "f3ffffff0e000000f1ffffff042000000028b52ffd6400009500004000004800c4000f000450020099932635"
    "1af1897a7d041700000028b52ffd6400004d000010000001007b0a6001601aa7f5"
)


def _golden() -> tuple[bytes, bytes, Model]:
    base = np.arange(128, dtype="<f4").reshape(8, 16)
    u = np.arange(8, dtype=np.int32).reshape(8, 1)
    v = (np.arange(16, dtype=np.int32) * (-1) ** np.arange(16)).reshape(16, 1).astype(np.int32)
    eu, ev = np.full(8, -1, np.int8), np.full(16, -2, np.int8)
    new = (base + (u @ v.T) * np.float32(0.125)).astype("<f4")
    new[1, 2] = 1e6  # one element the model does not explain
    return base.tobytes(), new.tobytes(), Model("F32", 8, 16, u=u, v=v, eu=eu, ev=ev)


def test_golden_v2_bytes() -> None:
    old, new, model = _golden()
    out = io.BytesIO()
    stats = encode_object(
        [new],
        size=512,
        itemsize=4,
        chunk_size=256,
        level=3,
        out=out,
        base=iter([old]),
        base_oid=sha(old),
        model=model,
    )
    assert (stats.model_chunks, stats.same_chunks, stats.model) == (2, 0, "lowrank1")
    assert out.getvalue().hex() == GOLDEN_MODEL
    blob = bytes.fromhex(GOLDEN_MODEL)
    assert check_layout(io.BytesIO(blob), len(blob)).version == VERSION_MODEL
    base_blob = io.BytesIO()
    encode_object([old], size=512, itemsize=4, chunk_size=256, level=3, out=base_blob)
    opened = lambda oid: decode_object(io.BytesIO(base_blob.getvalue()), opened)  # noqa: E731
    assert b"".join(decode_object(io.BytesIO(blob), opened)) == new


def test_v2_without_base_is_rejected() -> None:
    blob = bytearray.fromhex(GOLDEN_MODEL)
    blob[6] = 0
    blob[20:52] = bytes(32)
    with pytest.raises(CorruptObjectError, match="depth 0 does not match"):
        read_header(io.BytesIO(bytes(blob)))


def test_model_kind_in_a_v1_object_is_rejected() -> None:
    blob = bytearray.fromhex(GOLDEN_MODEL)
    blob[4] = 1  # claims v1: the model section is read as a chunk record
    with pytest.raises(CorruptObjectError):
        b"".join(decode_object(io.BytesIO(bytes(blob)), lambda oid: iter([b""])))


@pytest.mark.parametrize("cut", [54, 60, 100])
def test_truncated_model_section(cut: int) -> None:
    blob = bytes.fromhex(GOLDEN_MODEL)[:cut]
    with pytest.raises(CorruptObjectError, match=r"torn|model section"):
        check_layout(io.BytesIO(blob), len(blob))
    with pytest.raises(CorruptObjectError, match="model section"):
        b"".join(decode_object(io.BytesIO(blob), lambda oid: iter([b""])))


# --- corruption through the object database -----------------------------------------------------


def _damage(odb: ObjectDB, oid: str, at: Callable[[bytes], int]) -> None:
    blob = bytearray(stored(odb, oid))
    blob[at(bytes(blob))] ^= 0x40
    store = odb.store
    assert isinstance(store, MemoryStore)
    store._objects[oid] = bytes(blob)
    odb._whole.discard(oid)


def test_corrupted_factor_is_caught_by_the_hash() -> None:
    odb = db()
    old = base_matrix("F32")
    oid = put_pair(odb, old, merged_lora(old, 8), "F32", SHAPE)
    _damage(odb, oid, lambda blob: 52 + 4 + 12 + SHAPE[0] + SHAPE[1] + 100)  # in U
    with pytest.raises(CorruptObjectError, match="is corrupt: its content hashes to"):
        odb.read_bytes(oid)


def test_corrupted_residual_is_caught() -> None:
    odb = db()
    old = base_matrix("F32")
    oid = put_pair(odb, old, merged_lora(old, 8), "F32", SHAPE)
    _damage(odb, oid, lambda blob: len(blob) - 20)  # inside the last chunk's zstd frame
    with pytest.raises(CorruptObjectError, match="corrupt"):
        odb.read_bytes(oid)


# --- determinism --------------------------------------------------------------------------------

_SCRIPT = """
import hashlib, io, sys
sys.path[:0] = [{tests!r}]
import test_encoding_structured as t
old = t.base_matrix("F32")
new = t.merged_lora(old, 8)
odb = t.db()
oid = t.put_pair(odb, old, new, "F32", t.SHAPE)
print(hashlib.sha256(t.stored(odb, oid)).hexdigest())
"""


def test_same_bytes_whatever_the_thread_count() -> None:
    old = base_matrix("F32")
    odb = db()
    oid = put_pair(odb, old, merged_lora(old, 8), "F32", SHAPE)
    here = sha(stored(odb, oid))
    odb2 = db()
    put_pair(odb2, old, merged_lora(old, 8), "F32", SHAPE)
    assert sha(stored(odb2, oid)) == here
    script = _SCRIPT.format(tests=os.path.dirname(__file__))
    for threads in ("1",):  # in this process: numpy's default, one per core
        env = dict(os.environ, OPENBLAS_NUM_THREADS=threads, OMP_NUM_THREADS=threads)
        env["MKL_NUM_THREADS"] = threads
        out = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == here


def test_best_model_refuses_a_sparse_change() -> None:
    old = base_matrix("F32")
    new = old.copy()
    new.reshape(-1)[::97] += np.float32(0.01)
    cctx = zstandard.ZstdCompressor(level=3)
    found = best_model(
        old.tobytes(), new.tobytes(), "F32", SHAPE, cctx.compress, byte_group, xor_bytes
    )
    assert found is None


def test_eligible_bounds() -> None:
    assert structured.eligible("F32", (256, 64), 256 * 64 * 4)
    assert not structured.eligible("F32", (128, 64), 128 * 64 * 4)  # 32 KiB: below the floor
    assert not structured.eligible("F32", (4, 8192), 4 * 8192 * 4)  # fewer than 8 rows
    assert not structured.eligible("F32", (1 << 13, 1 << 12), 1 << 27)  # over 16M elements
    assert not structured.eligible("I32", (256, 64), 256 * 64 * 4)
    assert KIND_MODEL == 4


# --- end to end: git add/commit/checkout, du and ls say what each object got -------------------


def test_git_round_trip_and_listings(repo: object, git: object) -> None:
    import json
    from pathlib import Path

    from conftest import save_st
    from test_vcs import commit

    assert isinstance(repo, Path) and callable(git)
    old = base_matrix("F32")
    bias = np.zeros(SHAPE[1], np.float32)
    save_st(repo / "m.safetensors", {"w": old, "b": bias})
    commit(git, "m.safetensors", "v1")
    v1 = (repo / "m.safetensors").read_bytes()
    save_st(repo / "m.safetensors", {"w": merged_lora(old, 8), "b": bias})
    commit(git, "m.safetensors", "v2")
    v2 = (repo / "m.safetensors").read_bytes()
    rows = json.loads(git("potluck", "ls", "m.safetensors@HEAD", "--stored", "--json"))
    got = {r["name"]: r["encoding"] for r in rows}
    assert got == {"b": "standalone", "w": "delta+lowrank8"}
    w_row = next(r for r in rows if r["name"] == "w")
    assert 0 < w_row["stored"] < 0.25 * old.nbytes
    du = json.loads(git("potluck", "du", "--json"))
    assert du["encodings"]["delta+lowrank8"]["objects"] == 1
    assert "delta+lowrank8: 1 objects" in git("potluck", "du")
    (repo / "m.safetensors").unlink()
    git("git", "checkout", "HEAD~1", "--", "m.safetensors")
    assert (repo / "m.safetensors").read_bytes() == v1
    git("git", "checkout", "HEAD", "--", "m.safetensors")
    assert (repo / "m.safetensors").read_bytes() == v2
    assert "ok" in git("potluck", "fsck")


def test_factor_out_of_bounds_is_rejected() -> None:
    blob = bytearray.fromhex(GOLDEN_MODEL)
    at = 52 + 4 + 12 + 8 + 16 + 4  # U[1, 0]
    blob[at : at + 4] = struct.pack("<i", 1 << 26)
    with pytest.raises(CorruptObjectError, match="model factors exceed 26 bits"):
        b"".join(decode_object(io.BytesIO(bytes(blob)), lambda oid: iter([b""])))


def test_damaged_section_length_reads_nothing_more() -> None:
    blob = bytearray.fromhex(GOLDEN_MODEL)
    blob[52:56] = struct.pack("<I", 0xFFFFFFF0)  # a 4 GiB model section
    with pytest.raises(CorruptObjectError, match="model section length 4294967280 is not 132"):
        b"".join(decode_object(io.BytesIO(bytes(blob)), lambda oid: iter([b""])))

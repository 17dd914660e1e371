"""snapshot → materialise without git: every dtype round-trips bit for bit; delta chains bound."""

from __future__ import annotations

import hashlib
import io

import ml_dtypes
import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from potluck.config import RepoConfig
from potluck.errors import CorruptObjectError, FormatError
from potluck.formats.safetensors import build_header
from potluck.objects.manifest import dumps, parse
from potluck.ops.vcs.materialize import load_tensors, write_file
from potluck.ops.vcs.odb import ObjectDB
from potluck.ops.vcs.snapshot import snapshot
from potluck.store.memory import MemoryStore
from potluck.tensors.dtypes import dtype_names, to_numpy

ST_DTYPES = [d for d in dtype_names() if d != "C128"]


def st_bytes(tensors: dict[str, np.ndarray], names: dict[str, str]) -> bytes:
    order = list(tensors)
    header = build_header([(n, names[n], tensors[n].shape) for n in order], None)
    return header + b"".join(np.ascontiguousarray(tensors[n]).tobytes() for n in order)


def random_array(rng: np.random.Generator, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    dt = to_numpy(dtype)
    raw = rng.integers(0, 256, size=int(np.prod(shape)) * dt.itemsize, dtype=np.uint8)
    if dtype == "BOOL":
        raw = raw % 2
    return raw.view(dt).reshape(shape)


def odb(chunk: int = 4096, depth: int = 8) -> ObjectDB:
    return ObjectDB(MemoryStore(), RepoConfig(chunk_bytes=chunk, max_delta_depth=depth), workers=1)


@given(
    dtypes=st.lists(st.sampled_from(ST_DTYPES), min_size=1, max_size=5),
    shapes=st.lists(st.lists(st.integers(0, 40), max_size=3), min_size=5, max_size=5),
    seed=st.integers(0, 2**16),
)
@example(
    dtypes=["BF16", "F8_E4M3", "F8_E5M2", "F16", "BOOL"], shapes=[[], [0], [3, 0], [1], [7]], seed=0
)
def test_every_dtype_round_trips_bit_for_bit(dtypes, shapes, seed) -> None:
    rng = np.random.default_rng(seed)
    tensors = {f"t{i}.{d}": random_array(rng, d, tuple(shapes[i])) for i, d in enumerate(dtypes)}
    names = {n: n.split(".")[1] for n in tensors}
    data = st_bytes(tensors, names)
    db = odb()
    m, _ = snapshot(io.BytesIO(data), len(data), db, name="x.safetensors")
    assert parse(dumps(m)) == m
    out = io.BytesIO()
    write_file(m, db, out)
    assert out.getvalue() == data
    got = load_tensors(m, db)
    for n, a in tensors.items():
        assert got[n].dtype == a.dtype and got[n].tobytes() == a.tobytes()


def test_manifest_depends_only_on_content(rng) -> None:
    t = {"a": rng.normal(size=(64, 64)).astype(np.float32), "b": np.arange(9, dtype=np.int64)}
    data = st_bytes(t, {"a": "F32", "b": "I64"})
    m1, _ = snapshot(io.BytesIO(data), len(data), odb(chunk=4096), name="x")
    m2, _ = snapshot(io.BytesIO(data), len(data), odb(chunk=65536, depth=0), name="y")
    assert dumps(m1) == dumps(m2)
    assert m1.tensors()["b"].oid == hashlib.sha256(t["b"].tobytes()).hexdigest()


def test_delta_chain_depth_is_bounded(rng) -> None:
    db = odb(chunk=4096, depth=3)
    w = rng.normal(size=(128, 128)).astype(np.float32)
    prev = None
    depths = []
    for step in range(8):
        w = w.copy()
        w[step, :4] += 1.0  # a sparse edit: XOR delta is tiny
        data = st_bytes({"w": w}, {"w": "F32"})
        prev, _ = snapshot(io.BytesIO(data), len(data), db, prev, name="x")
        depths.append(db.header(prev.tensors()["w"].oid).depth)
        assert np.array_equal(load_tensors(prev, db)["w"], w)
    assert max(depths) == 3
    assert depths == [0, 1, 2, 3, 0, 1, 2, 3]


def test_sparse_update_is_stored_small(rng) -> None:
    db = odb(chunk=1 << 20)
    w = (rng.normal(size=(512, 512)) * 0.02).astype(np.float32)
    d1 = st_bytes({"w": w}, {"w": "F32"})
    m1, s1 = snapshot(io.BytesIO(d1), len(d1), db, name="x")
    w2 = w.copy()
    idx = rng.choice(w.size, w.size // 100, replace=False)
    w2.reshape(-1)[idx] += 0.01
    d2 = st_bytes({"w": w2}, {"w": "F32"})
    _, s2 = snapshot(io.BytesIO(d2), len(d2), db, m1, name="x")
    assert s2.stored_bytes < 0.04 * len(d2)  # ~11 bytes per changed entry (XOR+zstd)
    assert s1.stored_bytes > 0.5 * len(d1)


def test_corrupt_object_is_detected_on_read(rng) -> None:
    db = odb()
    data = st_bytes({"w": rng.normal(size=(32, 32)).astype(np.float32)}, {"w": "F32"})
    m, _ = snapshot(io.BytesIO(data), len(data), db, name="x")
    oid = m.tensors()["w"].oid
    store = db.store
    assert isinstance(store, MemoryStore)
    raw = bytearray(store._objects[oid])  # flip one byte of the stored object on purpose
    raw[-3] ^= 1
    store._objects[oid] = bytes(raw)
    with pytest.raises(CorruptObjectError, match="tensor 'w' is corrupt"):
        write_file(m, db, io.BytesIO(), path="x")


def test_not_a_checkpoint_is_refused() -> None:
    with pytest.raises(FormatError, match="not a checkpoint potluck knows"):
        snapshot(io.BytesIO(b"hello world" * 10), 110, odb(), name="notes.txt")


def test_bf16_is_ml_dtypes() -> None:
    assert to_numpy("BF16") == np.dtype(ml_dtypes.bfloat16)


@pytest.mark.parametrize("buffer", [1 << 30, 1000])  # in memory, and spilled per segment
def test_stream_snapshot_matches_file_snapshot(rng, tmp_path, monkeypatch, buffer) -> None:
    from potluck.ops.vcs import snapshot as snap

    monkeypatch.setattr(snap, "STREAM_BUFFER", buffer)
    t = {"a": rng.normal(size=(64, 64)).astype(np.float32), "b": np.arange(7, dtype=np.int16)}
    data = st_bytes(t, {"a": "F32", "b": "I16"})
    db = odb()
    m, _ = snap.snapshot_stream(io.BytesIO(data), db, None, name="x", spill_dir=tmp_path)
    m2, _ = snapshot(io.BytesIO(data), len(data), odb(), name="x")
    assert dumps(m) == dumps(m2)
    out = io.BytesIO()
    write_file(m, db, out)
    assert out.getvalue() == data


@pytest.mark.parametrize(
    ("cut", "match"),
    [(-5, "ends 5 bytes short inside tensor 'b'"), (3, "continues past the")],
)
def test_stream_snapshot_rolls_back_on_bad_file(rng, tmp_path, cut, match) -> None:
    from potluck.ops.vcs.snapshot import snapshot_stream

    t = {"a": rng.normal(size=(64, 64)).astype(np.float32), "b": np.arange(7, dtype=np.int16)}
    data = st_bytes(t, {"a": "F32", "b": "I16"})
    data = data[:cut] if cut < 0 else data + b"\0" * cut
    db = odb()
    with pytest.raises(FormatError, match=match):
        snapshot_stream(io.BytesIO(data), db, None, name="x", spill_dir=tmp_path)
    assert list(db.store.iter_oids()) == []  # header and tensor `a` were stored, then removed


def test_quick_put_stores_incompressible_chunks_verbatim_and_compresses_the_rest(
    tmp_path,
) -> None:
    from potluck.store.local import LocalStore

    db = ObjectDB(LocalStore(tmp_path / "objects"), RepoConfig(), workers=1)
    noise = np.random.default_rng(0).normal(size=1 << 20).astype(np.float32).tobytes()
    zeros = bytes(4 << 20)
    for data, verbatim in ((noise, True), (zeros, False)):
        oid = hashlib.sha256(data).hexdigest()
        db.put(oid, lambda d=data: [d], size=len(data), itemsize=4, quick=True)
        assert db.read_bytes(oid) == data  # round trip, hash verified
        stored = db.store.stored_size(oid)
        if verbatim:  # grouped zstd would save ~16 % here; quick mode does not spend the time
            assert len(data) < stored < len(data) + 64
        else:
            assert stored < len(data) // 100
    slow = ObjectDB(LocalStore(tmp_path / "other"), RepoConfig(), workers=1)
    oid = hashlib.sha256(noise).hexdigest()
    slow.put(oid, lambda: [noise], size=len(noise), itemsize=4)
    assert slow.store.stored_size(oid) < 0.9 * len(noise)  # a commit still compresses


def _mixed_file(rng: np.random.Generator, scale: float) -> bytes:
    """Many small tensors of several dtypes (equal ones, empty ones) around two large ones."""
    tensors: dict[str, np.ndarray] = {}
    names: dict[str, str] = {}
    for i in range(300):
        kind = ("F32", "F16", "I8", "BF16")[i % 4]
        shape = (int(rng.integers(0, 40)),) if i % 7 else (3, 5)
        arr = random_array(rng, kind, shape) if i % 11 else np.zeros(shape, to_numpy(kind))
        if kind in ("F32", "F16") and i % 3 == 0:
            with np.errstate(invalid="ignore", over="ignore"):  # random bits: NaN, inf
                arr = (arr * scale).astype(arr.dtype)  # changes in the second version
        tensors[f"t.{i:03d}"], names[f"t.{i:03d}"] = arr, kind
        if i in (100, 200):  # a large tensor breaks the run of small ones
            big = rng.normal(size=(300, 300)).astype(np.float32) * scale
            tensors[f"big.{i}"], names[f"big.{i}"] = big, "F32"
    return st_bytes(tensors, names)


class _Trickle:
    """A stream with ``read`` only (no ``readinto``), giving at most 1000 bytes a call."""

    def __init__(self, data: bytes) -> None:
        self._f = io.BytesIO(data)

    def read(self, n: int = -1, /) -> bytes:
        return self._f.read(1000 if n < 0 else min(n, 1000))


@pytest.mark.parametrize("stream", [io.BytesIO, _Trickle])
def test_stream_snapshot_of_many_small_tensors_stores_the_same_objects(
    rng, tmp_path, monkeypatch, stream
) -> None:
    """The streamed add stores runs of small tensors together (``put_small_many``); its
    manifests and every object's bytes equal those of the add one object at a time, also for
    a second version whose changed tensors are stored as deltas against the first (from a
    file, and from a stream that only has ``read`` and answers in small pieces)."""
    from potluck.ops.vcs.snapshot import snapshot_stream
    from potluck.store.local import LocalStore

    v1 = _mixed_file(np.random.default_rng(7), 1.0)
    v2 = _mixed_file(np.random.default_rng(7), 1.001)
    batches: list[int] = []
    together = ObjectDB.put_small_many
    monkeypatch.setattr(
        ObjectDB,
        "put_small_many",
        lambda self, items, durable=False: (
            batches.append(len(items)) or together(self, items, durable)
        ),
    )
    by_stream = ObjectDB(LocalStore(tmp_path / "a", pack_min=1), RepoConfig(), workers=1)
    one_by_one = ObjectDB(MemoryStore(), RepoConfig(), workers=1)
    prev_s = prev_f = None
    for data in (v1, v2):
        ms, _ = snapshot_stream(stream(data), by_stream, prev_s, name="x", spill_dir=tmp_path)
        mf, _ = snapshot(io.BytesIO(data), len(data), one_by_one, prev_f, name="x")
        assert dumps(ms) == dumps(mf)
        out = io.BytesIO()
        write_file(ms, by_stream, out)
        assert out.getvalue() == data
        prev_s, prev_f = ms, mf
    assert len(batches) < 40 and sum(batches) > 0.9 * 2 * 300  # runs end at empty and big ones
    oids = set(one_by_one.store.iter_oids())
    assert set(by_stream.store.iter_oids()) == oids
    for oid in oids:
        with by_stream.store.open(oid) as a, one_by_one.store.open(oid) as b:
            assert a.read() == b.read(), oid


def test_stream_snapshot_names_the_small_tensor_a_stream_ends_in(rng, tmp_path) -> None:
    from potluck.ops.vcs.snapshot import snapshot_stream

    tensors = {f"w{i}": np.full(10, i, np.float32) for i in range(50)}
    data = st_bytes(tensors, dict.fromkeys(tensors, "F32"))
    db = odb()
    with pytest.raises(FormatError, match="ends 25 bytes short inside tensor 'w47'"):
        snapshot_stream(io.BytesIO(data[: -2 * 40 - 25]), db, None, name="x", spill_dir=tmp_path)
    assert list(db.store.iter_oids()) == []

"""Scale: diff statistics streamed in blocks (same numbers, bounded memory), and diffs of files
with many tensors that scan the work-tree file once (issue 14, items 6 and 18).

Speed and memory at full size (20k tensors, a 2 GiB tensor) are measured by
``python -m bench.scale``; these are the small-scale regressions.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from conftest import Run, save_st
from potluck.errors import FormatError
from potluck.tensors.stats import DeltaStats, delta_stats, stream_delta_stats
from test_vcs import commit

# --- streamed statistics == the whole-array computation ------------------------------------------


def _reference(old: np.ndarray, new: np.ndarray) -> DeltaStats:
    """The whole-array computation potluck used before streaming (float64 throughout)."""

    def as_float(a: np.ndarray) -> np.ndarray:
        return a.astype(np.complex128 if a.dtype.kind == "c" else np.float64)

    n = int(old.size)
    if n == 0:
        return DeltaStats(0.0, 0.0, 0.0, 0.0, 0)
    if old.dtype == new.dtype:
        ob = old.reshape(-1).view(np.uint8).reshape(n, -1)
        nb = new.reshape(-1).view(np.uint8).reshape(n, -1)
        changed = int(np.count_nonzero((ob != nb).any(axis=1)))
    else:
        changed = int(np.count_nonzero(as_float(old) != as_float(new)))
    with np.errstate(invalid="ignore", over="ignore"):
        d = as_float(new) - as_float(old)
        l2 = float(np.sqrt(np.sum(np.abs(d) ** 2)))
        base = float(np.sqrt(np.sum(np.abs(as_float(old)) ** 2)))
        max_abs = float(np.max(np.abs(d)))
    rel = l2 / base if base > 0 else (0.0 if l2 == 0 else float("inf"))
    return DeltaStats(l2, rel, changed / n, max_abs, n)


#: Both sums are of non-negative float64 terms, summed pairwise by numpy (the reference) or per
#: block and then exactly (streamed): each is within (log2(n) + 2) ulp of the exact sum, so for
#: the sizes here (n < 2**17) they agree to a relative 4e-15; 1e-13 leaves room, and nothing
#: else may differ at all.
RTOL = 1e-13


def _same(got: DeltaStats, want: DeltaStats) -> None:
    assert got.numel == want.numel
    assert got.frac_changed == want.frac_changed
    assert got.max_abs == want.max_abs or (np.isnan(got.max_abs) and np.isnan(want.max_abs))
    for field in ("l2", "rel"):
        g, w = getattr(got, field), getattr(want, field)
        assert (np.isnan(g) and np.isnan(w)) or g == w or abs(g - w) <= RTOL * abs(w), field


def _pieces(a: np.ndarray, rng: np.random.Generator) -> list[bytes]:
    """The array's bytes cut at random places (not at element boundaries)."""
    data = a.tobytes()
    cuts = sorted(set(rng.integers(0, len(data) + 1, size=7).tolist()) | {0, len(data)})
    return [data[i:j] for i, j in itertools.pairwise(cuts)]


def _pair(rng: np.random.Generator, dtype: np.dtype, shape: tuple[int, ...]) -> tuple:
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        old = rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    elif dtype.kind == "c":
        old = (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(dtype)
    elif dtype.kind == "b":
        old = np.asarray(rng.random(shape) < 0.5)
    else:
        old = rng.normal(0, 3, size=shape).astype(dtype)
    old = np.asarray(old)
    new = old.copy()
    mask = rng.random(shape) < 0.3
    new[mask] = old[mask][::-1] if old[mask].size else old[mask]
    if dtype.kind == "f" or dtype == np.dtype(ml_dtypes.bfloat16):
        new.reshape(-1)[:3] = new.reshape(-1)[:3] + np.asarray(0.5, dtype=dtype)
    return old, new


DTYPES = [
    np.dtype(np.float32),
    np.dtype(np.float16),
    np.dtype(ml_dtypes.bfloat16),
    np.dtype(ml_dtypes.float8_e4m3fn),
    np.dtype(np.float64),
    np.dtype(np.int8),
    np.dtype(np.uint16),
    np.dtype(np.int32),
    np.dtype(np.int64),
    np.dtype(np.bool_),
    np.dtype(np.complex64),
    np.dtype(np.complex128),
]
SHAPES = [(), (1,), (7,), (3, 5, 7), (101, 13), (1000, 97)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_streamed_stats_equal_whole_array_stats(dtype: np.dtype) -> None:
    rng = np.random.default_rng(7)
    for shape in SHAPES:
        old, new = _pair(rng, dtype, shape)
        want = _reference(old, new)
        for block in (1, 5) if old.size < 200 else (97, 4096, 1 << 19):
            _same(delta_stats(old, new, block=block), want)
            got = stream_delta_stats(
                _pieces(old, rng), _pieces(new, rng), old.dtype, new.dtype, old.size, block=block
            )
            _same(got, want)


def test_streamed_stats_special_values_and_retyped() -> None:
    rng = np.random.default_rng(3)
    cases = [
        (np.zeros(9, np.float32), np.zeros(9, np.float32)),  # nothing changed
        (np.zeros(9, np.float32), np.ones(9, np.float32)),  # rel = inf
        (np.array([np.inf, 1, 2], np.float32), np.array([np.inf, 1, 3], np.float32)),  # inf-inf
        (np.array([np.nan, 1, 2], np.float32), np.array([np.nan, 1, 2], np.float32)),  # same bits
        (np.array([1, 2, 3e38], np.float32), np.array([1, 2, -3e38], np.float32)),  # finite
        (np.array([0.0, -0.0], np.float32), np.array([-0.0, 0.0], np.float32)),  # bits only
        (np.full(5, 1e300), np.full(5, -1e300)),  # squares overflow to inf
        (rng.normal(size=(33, 3)).astype(np.float32), rng.normal(size=(33, 3)).astype(np.float16)),
        (np.arange(12, dtype=np.int64), np.arange(12, dtype=np.float32)),  # retyped, equal values
        (rng.normal(size=7).astype(np.complex64), rng.normal(size=7).astype(np.float32)),
        (rng.normal(size=7).astype(np.float16), rng.normal(size=7).astype(np.complex128)),
    ]
    for old, new in cases:
        for block in (1, 2, 1 << 19):
            _same(delta_stats(old, new, block=block), _reference(old, new))
            got = stream_delta_stats(
                [old.tobytes()], [new.tobytes()], old.dtype, new.dtype, old.size
            )
            _same(got, _reference(old, new))


def test_streamed_stats_refuse_streams_of_the_wrong_length() -> None:
    a = np.arange(10, dtype=np.float32)
    with pytest.raises(FormatError, match="'w' ends 4 bytes early"):
        stream_delta_stats([a.tobytes()[:-4]], [a.tobytes()], a.dtype, a.dtype, 10, name="w")
    with pytest.raises(FormatError, match="holds 2 bytes more than its shape needs"):
        stream_delta_stats([a.tobytes()], [a.tobytes(), b"xy"], a.dtype, a.dtype, 10, name="w")


# --- diffs of files with many tensors: one scan, one read per changed tensor ---------------------


def _many(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {f"layer.{i:04d}.w": rng.normal(size=(3, 5)).astype(np.float32) for i in range(n)}


def test_diff_of_many_changed_tensors_scans_the_file_once(
    repo: Path, git: Run, rng, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: every changed tensor re-scanned the work-tree file and re-listed the manifest
    (quadratic; 340 s for 2k of 20k tensors)."""
    from potluck.formats.safetensors import SafetensorsFormat
    from potluck.git import inspect as insp
    from potluck.git.repo import Repo
    from potluck.ops.vcs.odb import ObjectDB

    t = _many(300, rng)
    save_st(repo / "m.safetensors", t)
    commit(git, "m.safetensors", "v1")
    t2 = {k: (v + 1 if i % 3 == 0 else v) for i, (k, v) in enumerate(sorted(t.items()))}
    save_st(repo / "m.safetensors", t2)
    calls = {"scan": 0, "read": 0}
    scan, read = SafetensorsFormat.scan, ObjectDB.read_chunks

    def counted_scan(self, f, size):  # type: ignore[no-untyped-def]
        calls["scan"] += 1
        return scan(self, f, size)

    def counted_read(self, oid, **kw):  # type: ignore[no-untyped-def]
        calls["read"] += 1
        return read(self, oid, **kw)

    monkeypatch.setattr(SafetensorsFormat, "scan", counted_scan)
    monkeypatch.setattr(ObjectDB, "read_chunks", counted_read)
    monkeypatch.chdir(repo)
    [d] = insp.diff(Repo(repo), None, None, [])
    assert calls == {"scan": 1, "read": 100}
    assert [c.name for c in d.changes] == [f"layer.{i:04d}.w" for i in range(0, 300, 3)]
    assert d.unchanged == 200
    for c in d.changes[:3]:
        assert c.stats == _reference(t[c.name], t2[c.name])


def test_diff_stats_of_torch_views_equal_the_arrays(repo: Path, git: Run) -> None:
    """Views (tied, sliced and transposed tensors of a shared storage) are streamed out of
    their storage or copied from the range they span; their stats equal the arrays'."""
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 4, generator=gen)
    sd = {"w": w, "tied": w, "rows": w[2:5], "wt": w.t()}
    torch.save(sd, repo / "c.pt")
    commit(git, "c.pt", "v1")
    w2 = w.clone()
    w2[3, 1] += 1.0
    w2[0, 0] = -7.0
    sd2 = {"w": w2, "tied": w2, "rows": w2[2:5], "wt": w2.t()}
    torch.save(sd2, repo / "c.pt")
    [out] = json.loads(git("potluck", "diff", "--json"))
    got = {c["name"]: c["stats"] for c in out["changes"]}
    assert set(got) == {"storage:0", "w", "tied", "rows", "wt"}
    for name in ("w", "tied", "rows", "wt"):
        want = _reference(sd[name].numpy(), sd2[name].numpy())
        _same(DeltaStats(**got[name]), want)


# --- memory: a 64 MiB tensor's diff stays within a few blocks -----------------------------------


_HWM = (
    "import atexit, sys\n"
    "from potluck.cli.main import main\n"
    "def hwm():\n"
    "    for line in open('/proc/self/status'):\n"
    "        if line.startswith('VmHWM:'):\n"
    "            sys.stderr.write(line)\n"
    "atexit.register(hwm)\n"
    "sys.argv = ['potluck', *sys.argv[1:]]\n"
    "main()\n"
)


def _peak_rss(args: list[str], cwd: Path) -> tuple[int, str]:
    """Peak RSS in bytes of ``potluck ARGS`` run in a fresh process (its own VmHWM: a forked
    child's ``ru_maxrss`` would include the parent's), and its stdout."""
    r = subprocess.run([sys.executable, "-c", _HWM, *args], cwd=cwd, capture_output=True)
    assert r.returncode == 0, r.stderr.decode()
    [kib] = [line.split()[1] for line in r.stderr.decode().splitlines() if "VmHWM:" in line]
    return int(kib) * 1024, r.stdout.decode()


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_diff_stats_memory_is_bounded_by_blocks_not_by_the_tensor(repo: Path, git: Run) -> None:
    """Before: ~8x the tensor (a 64 MiB F32 tensor: +521 MiB over `--no-stats`; a 2 GiB one
    was OOM-killed at 23 GB). Now the stats add a few blocks and chunks (measured +58 MiB),
    whatever the tensor's size."""
    n = 16 << 20  # 64 MiB of F32
    w = (np.arange(n, dtype=np.float32) % 977) / 977
    save_st(repo / "m.safetensors", {"w": w, "b": np.zeros(3, np.float32)})
    commit(git, "m.safetensors", "v1")
    before = w[::4096].astype(np.float64)
    w[::4096] += 1
    max_abs = float(np.abs(w[::4096] - before).max())
    save_st(repo / "m.safetensors", {"w": w, "b": np.zeros(3, np.float32)})
    del w, before
    base, _ = _peak_rss(["diff", "--no-stats", "--json"], repo)
    peak, out = _peak_rss(["diff", "--json"], repo)
    [stats] = [c["stats"] for c in json.loads(out)[0]["changes"]]
    assert stats["frac_changed"] == (n // 4096) / n and stats["max_abs"] == max_abs
    print(f"peak RSS {peak >> 20} MiB, --no-stats {base >> 20} MiB")
    assert peak - base < 100 << 20, f"stats took {(peak - base) >> 20} MiB over --no-stats"


# --- first add of many tensors: one flush per file, not two per object --------------------------


def test_small_objects_are_made_durable_by_one_sync_before_the_manifest(
    repo: Path, rng, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: two fsyncs per object (the file and its directory): 39 of the 64 s a first add
    of 20k tensors took. Now a file's small objects are written unflushed and one ``os.sync``
    makes them durable before the manifest is returned (so before git can record it)."""
    from potluck.git.repo import Repo
    from potluck.ops.vcs import Chain, snapshot_stream

    data = save_st(repo / "m.safetensors", _many(40, rng) | {"big": np.ones(1 << 20, np.float32)})
    r = Repo(repo)
    events: list[str] = []
    real_fsync, real_sync = os.fsync, os.sync

    def fsync(fd: int) -> None:
        events.append("fsync")
        real_fsync(fd)

    def sync() -> None:  # records how many objects exist when it runs
        events.append(f"sync {sum(1 for _ in r.store.iter_oids())}")
        real_sync()

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "sync", sync)
    src = Chain(b"", io.BytesIO(data))
    _, stats = snapshot_stream(src, r.odb, None, name="m", spill_dir=r.tmp_dir)
    assert stats.new_objects == 42  # 40 small tensors, the header, one 4 MiB tensor
    assert events == ["fsync", "fsync", "sync 42"]  # the 4 MiB object is flushed on its own
    assert stats.unsynced == 0


def test_ls_of_a_work_tree_file_reads_its_structure_only(
    repo: Path, git: Run, rng, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: `potluck ls FILE` hashed every tensor of the file (a 2 GiB read for a listing)."""
    from potluck.git import inspect as insp
    from potluck.git.repo import Repo
    from potluck.ops.vcs import snapshot

    t = _many(5, rng)
    save_st(repo / "m.safetensors", t)

    def no_hashing(*args: object) -> str:
        raise AssertionError("ls hashed a tensor")

    monkeypatch.setattr(snapshot, "hash_range", no_hashing)
    monkeypatch.chdir(repo)
    rows = insp.ls(Repo(repo), "m.safetensors", None)
    assert rows == [{"name": n, "dtype": "F32", "shape": [3, 5], "bytes": 60} for n in sorted(t)]


def test_reading_a_revision_tensor_by_tensor_lists_its_manifest_once(
    repo: Path, git: Run, rng, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: each tensor read from ``FILE@REV`` (merge, patch inputs) rebuilt the manifest's
    tensor table (4.5 ms a tensor for 20k tensors: quadratic)."""
    from potluck.git.models import open_model
    from potluck.objects.manifest import Manifest

    t = _many(60, rng)
    save_st(repo / "m.safetensors", t)
    commit(git, "m.safetensors", "v1")
    listed = 0
    tensors = Manifest.tensors

    def counted(self: Manifest) -> dict:  # type: ignore[type-arg]
        nonlocal listed
        listed += 1
        return tensors(self)

    monkeypatch.chdir(repo)
    monkeypatch.setattr(Manifest, "tensors", counted)
    with open_model("m.safetensors@HEAD") as src:
        got = {n: src.read(n) for n in src.names()}
    assert listed <= 2  # once per file, not once per tensor
    assert got.keys() == t.keys() and all(np.array_equal(got[n], t[n]) for n in t)

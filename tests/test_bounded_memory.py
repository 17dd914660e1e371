"""Memory of merge, patch create and patch apply is bounded by a few blocks, not by the largest
tensor, also when the inputs are revisions (``FILE@REV``, read from the object store) — issue 14.

The default-run tests force tiny blocks (``sources.BLOCK_BYTES``, ``run.BLOCK_ELEMENTS``,
``git.models.SPILL_BYTES``) on a 4 MiB tensor and check with ``tracemalloc`` (numpy's buffers are
traced) that no step holds more than a few blocks, and that blocked results are byte-identical
to the one-shot ones. The heavy test runs the real commands on a 2 GiB tensor and measures their
peak RSS (``-m heavy``).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import subprocess
import sys
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from potluck.codecs import exact, get_codec, payloads_equal
from potluck.codecs.rules import Rule
from potluck.errors import CorruptObjectError
from potluck.git import models as git_models
from potluck.git.models import open_model
from potluck.ops.merge import run as merge_run
from potluck.ops.merge.config import parse_config
from potluck.ops.models import sources
from potluck.ops.patch import apply_patch, create_patch
from tests.conftest import isolated_env, run_in, save_st
from testsupport.memory import traced_peak

MiB = 1 << 20
BLOCK = 64 << 10
ELEMENTS = MiB  # a 4 MiB F32 tensor: 64 blocks
RULES: list[Rule] = [("w_sparse", "exact_sparse", {}), ("w_full", "full", {})]


def _versions() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """v1 and v2 of a small model: every 97th element of the big tensors changes in v2."""
    rng = np.random.default_rng(14)
    v1 = {
        "w": rng.standard_normal(ELEMENTS, dtype=np.float32).reshape(1024, 1024),
        "w_sparse": rng.standard_normal(100_000, dtype=np.float32),
        "w_full": rng.standard_normal(50_000, dtype=np.float32),
        "h": rng.standard_normal(100_000).astype(ml_dtypes.bfloat16),
        "b": np.arange(16, dtype=np.float32),
    }
    v2 = {k: v.copy() for k, v in v1.items()}
    for k in ("w", "w_sparse", "w_full", "h"):
        flat = v2[k].reshape(-1)
        flat[::97] = (flat[::97].astype(np.float32) + np.float32(1e-3)).astype(flat.dtype)
    return v1, v2


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A potluck repository with ``m.safetensors`` committed as v1 then v2 (shared: read only);
    objects are stored in 64 KiB chunks (the store's own unit of streaming)."""
    root = tmp_path_factory.mktemp("bounded") / "repo"
    root.mkdir()
    with isolated_env(root.parent / "_home"):
        _commit_versions(root)
    return root


def _commit_versions(root: Path) -> None:
    run = run_in(root)
    run("git", "init", "-q", "-b", "main")
    run("potluck", "init")
    run("potluck", "track", "*.safetensors")
    (root / ".potluck.json").write_text(json.dumps({"chunk_bytes": BLOCK}))
    run("git", "add", ".gitattributes", ".potluck.json")
    run("git", "commit", "-q", "-m", "track")
    for i, version in enumerate(_versions(), 1):
        save_st(root / "m.safetensors", version)
        run("git", "add", "m.safetensors")
        run("git", "commit", "-q", "-m", f"v{i}")


@pytest.fixture
def tiny_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """64 KiB blocks; stored tensors of 1 MiB or more spill to a mapped temporary file."""
    monkeypatch.setattr(sources, "BLOCK_BYTES", BLOCK)
    monkeypatch.setattr(git_models, "SPILL_BYTES", MiB)
    monkeypatch.setattr(merge_run, "BLOCK_ELEMENTS", BLOCK // 4)


_peak = traced_peak  # numpy registers its buffers with tracemalloc


def _peak_beside_zstd(fn: Callable[[], object], monkeypatch: pytest.MonkeyPatch) -> int:
    """``_peak`` of ``fn`` leaving out the inside of ``exact._compress_file``'s one zstd call:
    python-zstandard reserves ``ZSTD_compressBound(size)`` for its output there, untouched
    (not resident) beyond the compressed bytes, and ``_compress_file`` keeps a compact copy."""
    peaks = []
    real = exact._compress_file

    def compress(*args: object) -> bytes:
        peaks.append(tracemalloc.get_traced_memory()[1])
        out = real(*args)  # type: ignore[arg-type]
        tracemalloc.reset_peak()
        return out

    monkeypatch.setattr(exact, "_compress_file", compress)
    last = _peak(fn)
    assert peaks, "the exact_xor payload was not encoded block by block"
    return max(*peaks, last)


def _create(out: Path) -> None:
    with open_model("m.safetensors@HEAD~1") as a, open_model("m.safetensors@HEAD") as b:
        create_patch(a, b, out, rules=RULES)


def _apply(patch: Path, out: Path) -> None:
    with open_model("m.safetensors@HEAD~1") as a:
        apply_patch(a, patch, out)


@pytest.mark.parametrize("codec", ["exact_xor", "exact_sparse", "full"])
@pytest.mark.parametrize(
    "dtype", [np.float32, ml_dtypes.bfloat16, np.complex128, np.int8, np.float64, np.bool_]
)
def test_exact_codecs_blocked_equal_one_shot(codec: str, dtype: type) -> None:
    rng = np.random.default_rng(3)
    seen: list[tuple[int, int]] = []

    def done(start: int, stop: int) -> None:
        seen.append((start, stop))

    for shape in [(0,), (1,), (37, 29)]:
        base: np.ndarray = (rng.standard_normal(shape) * 3).astype(dtype)
        new = base.copy()
        new.reshape(-1)[::7] = (rng.standard_normal(new.reshape(-1)[::7].shape) * 5).astype(dtype)
        c = get_codec(codec)
        one = c.encode(new, base, name="t", seed=0)
        for block in (24, 1000, 1 << 20):
            seen.clear()
            blocked = c.encode_blocked(new, base, name="t", seed=0, block=block, done=done)
            assert payloads_equal(blocked, one)
            pieces = list(c.decode_blocks(one, base, block=block))
            assert b"".join(p.tobytes() for p in pieces) == new.tobytes()
            assert all(p.ndim == 1 and p.dtype == new.dtype for p in pieces)
            if codec != "full":
                assert sum(b - a for a, b in seen) == base.nbytes  # every byte let go once


def test_blocked_patch_equals_one_shot_and_rebuilds_v2(
    history: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(history)
    _create(tmp_path / "one.patch")  # 16 MiB blocks: every tensor in one piece
    _apply(tmp_path / "one.patch", tmp_path / "one.safetensors")
    monkeypatch.setattr(sources, "BLOCK_BYTES", BLOCK)
    monkeypatch.setattr(git_models, "SPILL_BYTES", MiB)
    _create(tmp_path / "blocked.patch")
    _apply(tmp_path / "blocked.patch", tmp_path / "blocked.safetensors")
    assert (tmp_path / "blocked.patch").read_bytes() == (tmp_path / "one.patch").read_bytes()
    want = (history / "m.safetensors").read_bytes()  # the work tree holds v2
    assert (tmp_path / "one.safetensors").read_bytes() == want
    assert (tmp_path / "blocked.safetensors").read_bytes() == want


def test_patch_create_and_apply_from_revisions_hold_a_few_blocks(
    history: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_blocks: None
) -> None:
    monkeypatch.chdir(history)
    patch, out = tmp_path / "p.patch", tmp_path / "out.safetensors"
    created = _peak_beside_zstd(lambda: _create(patch), monkeypatch)
    applied = _peak(lambda: _apply(patch, out))
    # not even half the 4 MiB tensor: store chunks and 64 KiB blocks, the payloads (~250 KB)
    assert max(created, applied) < ELEMENTS * 4 / 2, (created, applied)
    assert out.read_bytes() == (history / "m.safetensors").read_bytes()
    monkeypatch.setattr(git_models, "SPILL_BYTES", 16 * MiB)  # control: decoded into memory
    assert _peak(lambda: _apply(patch, tmp_path / "whole.safetensors")) > ELEMENTS * 4


def test_merge_from_revisions_holds_a_few_blocks(
    history: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_blocks: None
) -> None:
    monkeypatch.chdir(history)
    config = parse_config(
        {"merge_method": "linear", "models": [{"model": "m.safetensors@HEAD~1"},
                                              {"model": "m.safetensors@HEAD"}]},
        where="test",
    )  # fmt: skip
    out = tmp_path / "merged"
    peak = _peak(lambda: merge_run.run_merge(config, out, opener=open_model, workers=1))
    # a block: 16k rows' elements, float64 copies of two inputs and the result, plus temporaries
    assert peak < 48 * BLOCK < ELEMENTS * 4, peak
    v1, v2 = _versions()
    from safetensors.numpy import load_file

    got = load_file(str(out / "model.safetensors"))
    want = ((v1["w"].astype(np.float64) + v2["w"]) / 2).astype(np.float32)
    assert got["w"].tobytes() == want.tobytes()


def test_ties_trim_from_revisions_holds_a_few_blocks(
    history: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_blocks: None
) -> None:
    """TIES with trimming in row blocks: where each trim cuts is found a block at a time (a few
    passes), never from a whole float64 copy of a task vector; the result is the whole-tensor
    merge's, bit for bit."""
    from potluck.merging import MERGE_METHODS

    monkeypatch.chdir(history)
    config = parse_config(
        {"merge_method": "ties", "base_model": "m.safetensors@HEAD~1",
         "parameters": {"density": 0.3},
         "models": [{"model": "m.safetensors@HEAD"}, {"model": "m.safetensors@HEAD~1"}]},
        where="test",
    )  # fmt: skip
    out = tmp_path / "merged"
    peak = _peak(lambda: merge_run.run_merge(config, out, opener=open_model, workers=1))
    # before: |tau| of the whole 1M-element tensor as float64 (8 MiB) per model
    assert peak < ELEMENTS * 4, peak
    v1, v2 = _versions()
    from safetensors.numpy import load_file

    got = load_file(str(out / "model.safetensors"))["w"]
    ties = MERGE_METHODS.get("ties")
    want = ties.merge([v2["w"], v1["w"]], v1["w"], None, name="w", seed=0, density=0.3)
    assert got.tobytes() == np.asarray(want).astype(np.float32).tobytes()


def test_spilled_tensor_leaves_no_file_when_its_object_is_corrupt(
    history: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_blocks: None
) -> None:
    work = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(history), str(work)], check=True)
    monkeypatch.chdir(work)
    src = open_model("m.safetensors@HEAD")
    oid = src.known_sha256["w"]
    obj = next(p for p in (work / ".git/potluck/objects").rglob(f"*{oid[4:]}*") if p.is_file())
    data = bytearray(obj.read_bytes())
    data[-100] ^= 0xFF  # inside the last chunk's payload
    obj.chmod(0o644)
    obj.write_bytes(bytes(data))
    with pytest.raises(CorruptObjectError):
        src.read("w")
    src.close()
    assert list((work / ".git/potluck/tmp").iterdir()) == []


# --------------------------------------------------------------------------- heavy: 2 GiB

_PEAK = (
    "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
    "sys.exit(r.returncode)"
)


def _peak_rss_mib(cmd: list[str], cwd: Path) -> float:
    """Peak RSS (MiB) of the command ``cmd`` run in ``cwd``, measured by a parent of its own."""
    r = subprocess.run([sys.executable, "-c", _PEAK, *cmd], cwd=cwd, capture_output=True)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    return int(r.stderr.decode().strip().splitlines()[-1]) / 1024


def _big_blocks(elements: int, changed: bool) -> Iterator[bytes]:
    rng = np.random.default_rng(1)
    for start in range(0, elements, 1 << 22):
        a = rng.standard_normal(min(1 << 22, elements - start), dtype=np.float32)
        if changed:
            a[::97] += np.float32(1e-3)
        yield a.tobytes()


def _write_big(path: Path, elements: int, changed: bool) -> str:
    meta = {"w": {"dtype": "F32", "shape": [elements], "data_offsets": [0, elements * 4]}}
    head = json.dumps(meta).encode()
    head += b" " * (-len(head) % 8)
    h = hashlib.sha256()
    with path.open("wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for piece in _big_blocks(elements, changed):
            f.write(piece)
            h.update(piece)
    return h.hexdigest()


@pytest.mark.heavy
@pytest.mark.timeout(3600)
def test_two_gib_tensor_from_revisions_stays_under_512_mib(repo: Path, tmp_path: Path) -> None:
    run = run_in(repo)
    elements = (2048 * MiB) // 4
    _write_big(repo / "m.safetensors", elements, False)
    run("git", "add", "m.safetensors")
    run("git", "commit", "-q", "-m", "v1")
    want = _write_big(repo / "m.safetensors", elements, True)
    run("git", "add", "m.safetensors")
    run("git", "commit", "-q", "-m", "v2")
    old, new = "m.safetensors@HEAD~1", "m.safetensors@HEAD"
    steps = {
        "merge": ["potluck", "merge", "--method", "linear", old, new, "-o", "../merged"],
        "create": ["potluck", "patch", "create", old, new, "-o", "../p.patch"],
        "apply": ["potluck", "patch", "apply", old, "../p.patch", "-o", "../out.safetensors"],
    }
    rss = {k: _peak_rss_mib(cmd, repo) for k, cmd in steps.items()}
    assert max(rss.values()) <= 512, rss
    h = hashlib.sha256()
    with (tmp_path / "out.safetensors").open("rb") as f:
        f.seek(8 + int.from_bytes(f.read(8), "little"))
        while piece := f.read(16 * MiB):
            h.update(piece)
    assert h.hexdigest() == want
    assert os.path.getsize(tmp_path / "merged" / "model.safetensors") > elements * 4
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < 1024 * 1024  # the test itself

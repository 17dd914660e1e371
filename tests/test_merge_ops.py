"""Three-way manifest merges without git: metadata, combine functions, zip formats, resolve."""

from __future__ import annotations

import io

import numpy as np
import pytest

from potluck.errors import UserError
from potluck.formats.safetensors import build_header
from potluck.objects.manifest import Manifest, RawEntry, TensorEntry
from potluck.ops.vcs.materialize import load_tensors, write_file
from potluck.ops.vcs.snapshot import scan_manifest, snapshot
from potluck.ops.vcs.threeway import METADATA, STRUCTURE, merge_manifests, resolve_manifest
from test_ops import odb


def st(db, tensors: dict[str, np.ndarray], meta: dict[str, str] | None = None) -> Manifest:
    names = list(tensors)
    data = build_header([(n, "F32", tensors[n].shape) for n in names], meta) + b"".join(
        tensors[n].astype("<f4").tobytes() for n in names
    )
    return snapshot(io.BytesIO(data), len(data), db, name="m.safetensors")[0]


def check_file(m: Manifest, db) -> None:
    """The merged manifest is exactly what cleaning its materialised file gives."""
    out = io.BytesIO()
    write_file(m, db, out)
    data = out.getvalue()
    assert scan_manifest(io.BytesIO(data), len(data)) == m


@pytest.fixture
def trio(rng):
    t = {n: rng.normal(size=(4, 4)).astype(np.float32) for n in ("a", "b", "c")}
    return t


def test_fast_paths(trio) -> None:
    db = odb()
    base = st(db, trio)
    other = st(db, dict(trio, a=trio["a"] + 1))
    assert merge_manifests(base, base, other, db).manifest == other
    assert merge_manifests(base, other, base, db).manifest == other
    assert merge_manifests(base, other, other, db).conflicts == []


def test_metadata_merges_three_way(trio) -> None:
    db = odb()
    base = st(db, trio, {"k": "0"})
    ours = st(db, dict(trio, a=trio["a"] * 2), {"k": "0"})
    theirs = st(db, dict(trio, b=trio["b"] * 3), {"k": "1"})
    res = merge_manifests(base, ours, theirs, db)
    assert res.conflicts == [] and res.manifest.metadata == {"k": "1"}
    got = load_tensors(res.manifest, db)
    assert np.array_equal(got["a"], trio["a"] * 2) and np.array_equal(got["b"], trio["b"] * 3)
    check_file(res.manifest, db)
    both = st(db, dict(trio, a=trio["a"] * 2), {"k": "2"})
    res = merge_manifests(base, both, theirs, db)
    assert res.conflicts == [METADATA] and res.manifest.metadata == {"k": "2"}
    fixed = resolve_manifest(base, both, theirs, {METADATA: "theirs"}, db)
    assert fixed.metadata == {"k": "1"}
    check_file(fixed, db)


def test_combine_function_merges_conflicting_tensors(trio) -> None:
    db = odb()
    base = st(db, trio)
    ours = st(db, dict(trio, a=trio["a"] + 1))
    theirs = st(db, dict(trio, a=trio["a"] - 3))
    res = merge_manifests(base, ours, theirs, db, combine=lambda name: lambda b, o, t: (o + t) / 2)
    assert res.conflicts == [] and res.combined == ["a"]
    want = ((trio["a"] + 1) + (trio["a"] - 3)) / 2
    assert np.array_equal(load_tensors(res.manifest, db)["a"], want.astype(np.float32))
    check_file(res.manifest, db)


def _zip(raw: str, **tensors: str) -> Manifest:
    entries = [RawEntry(raw * 64, 10)]
    entries += [TensorEntry(n, "F32", (1,), o * 64, 4) for n, o in tensors.items()]
    return Manifest("pytorch", 0, (), ()).with_entries(tuple(entries))


def test_zip_formats_take_whole_sides() -> None:
    db = odb()
    base = _zip("0", a="1", b="2")
    ours, theirs = _zip("3", a="4", b="2"), _zip("5", a="1", b="6")
    res = merge_manifests(base, ours, theirs, db)
    assert res.conflicts == ["b"] and res.manifest == ours and "whole sides" in res.reason["b"]
    with pytest.raises(UserError, match="cannot mix tensors from both sides"):
        resolve_manifest(base, ours, theirs, {"b": "theirs"}, db)
    # same tensors, different pickled values on both sides: a structure conflict
    res = merge_manifests(base, _zip("7", a="1", b="2"), _zip("8", a="1", b="2"), db)
    assert res.conflicts == [STRUCTURE]
    took = resolve_manifest(
        base, _zip("7", a="1", b="2"), _zip("8", a="1", b="2"), {STRUCTURE: "theirs"}, db
    )
    assert took == _zip("8", a="1", b="2")

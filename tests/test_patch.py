"""Patches: format, create/apply/info use cases and the `potluck patch` commands."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

import potluck.cli.patch_cmd  # noqa: F401  (registers `potluck patch`)
from potluck.cli.main import cli
from potluck.errors import IntegrityError, UserError
from potluck.formats import scan_file
from potluck.ops.patch.apply import apply_patch
from potluck.ops.patch.create import create_patch, patch_info


def sha(a: np.ndarray) -> str:
    return hashlib.sha256(a.tobytes()).hexdigest()


@pytest.fixture
def pair(tmp_path: Path, rng: np.random.Generator) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """A base checkpoint and a fine-tune of it: two matrices changed, the rest untouched."""
    base: dict[str, np.ndarray] = {
        "attn.weight": rng.standard_normal((48, 32)).astype(np.float32),
        "mlp.weight": rng.standard_normal((32, 24)).astype(np.float32),
        "norm.bias": rng.standard_normal(32).astype(np.float32),
        "steps": np.arange(5, dtype=np.int64),
    }
    target = dict(base)
    target["attn.weight"] = base["attn.weight"] + 0.01 * rng.standard_normal((48, 32)).astype(
        np.float32
    )
    target["mlp.weight"] = base["mlp.weight"] + 0.02 * rng.standard_normal((32, 24)).astype(
        np.float32
    )
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(target, str(tmp_path / "target.safetensors"))
    return tmp_path / "base.safetensors", tmp_path / "target.safetensors", target


def test_exact_round_trip_is_byte_identical(pair: tuple[Path, Path, dict[str, np.ndarray]]) -> None:
    base, target, want = pair
    info = create_patch(base, target, base.parent / "p.patch")
    assert [e.name for e in info.entries] == ["attn.weight", "mlp.weight"]
    assert all(e.codec == "exact_xor" and e.relative_error is None for e in info.entries)
    assert info.unchanged == 2
    report = apply_patch(base, base.parent / "p.patch", base.parent / "out.safetensors")
    assert report.results_verified and not report.warnings
    got = load_file(str(base.parent / "out.safetensors"))
    assert list(got) == list(load_file(str(base)))
    for name, arr in want.items():
        assert sha(got[name]) == sha(arr)


def test_patch_metadata_and_unchanged_not_stored(
    pair: tuple[Path, Path, dict[str, np.ndarray]],
) -> None:
    base, target, want = pair
    create_patch(base, target, base.parent / "p.patch", description={"author": "me"})
    meta = scan_file(base.parent / "p.patch").metadata
    assert meta["potluck_patch"] == "1"
    hashes = json.loads(meta["base"])
    base_arrays = load_file(str(base))
    assert hashes == {n: sha(base_arrays[n]) for n in ("attn.weight", "mlp.weight")}
    canon = json.dumps(hashes, sort_keys=True, separators=(",", ":"))
    assert meta["base_digest"] == hashlib.sha256(canon.encode()).hexdigest()
    assert json.loads(meta["result"]) == {n: sha(want[n]) for n in hashes}
    assert json.loads(meta["description"]) == {"author": "me"}
    names = [s.name for s in scan_file(base.parent / "p.patch").tensor_segments()]
    assert names == sorted(names)
    assert not any(n.startswith(("norm.bias/", "steps/")) for n in names)


def test_patch_bytes_are_deterministic(pair: tuple[Path, Path, dict[str, np.ndarray]]) -> None:
    base, target, _ = pair
    kw = {"rules": [("mlp*", "sparse_topk", {"density": 0.2})], "seed": 3}
    create_patch(base, target, base.parent / "a.patch", **kw)  # type: ignore[arg-type]
    create_patch(base, target, base.parent / "b.patch", **kw)  # type: ignore[arg-type]
    assert (base.parent / "a.patch").read_bytes() == (base.parent / "b.patch").read_bytes()


@pytest.mark.parametrize(
    ("codec", "params"),
    [("lowrank", {"rank": 4}), ("quant", {"bits": 8}), ("sparse_topk", {"density": 0.1})],
)
def test_lossy_error_matches_report(
    pair: tuple[Path, Path, dict[str, np.ndarray]], codec: str, params: dict[str, object]
) -> None:
    base, target, want = pair
    info = create_patch(base, target, base.parent / "p.patch", default_codec=codec, params=params)
    apply_patch(base, base.parent / "p.patch", base.parent / "out.safetensors")
    got, old = load_file(str(base.parent / "out.safetensors")), load_file(str(base))
    for e in info.entries:
        assert e.codec == codec and e.relative_error is not None
        delta = want[e.name].astype(np.float64) - old[e.name]
        approx = got[e.name].astype(np.float64) - old[e.name]
        rel = np.linalg.norm(approx - delta) / np.linalg.norm(delta)
        assert rel == pytest.approx(e.relative_error, rel=1e-3, abs=1e-6)
        assert 0 < rel < 1
    assert not json.loads(scan_file(base.parent / "p.patch").metadata["result"])


def test_scale_half_gives_half_delta(pair: tuple[Path, Path, dict[str, np.ndarray]]) -> None:
    base, target, _ = pair
    patch = base.parent / "p.patch"
    create_patch(base, target, patch, default_codec="lowrank", params={"rank": 4})
    apply_patch(base, patch, base.parent / "full.safetensors")
    apply_patch(base, patch, base.parent / "half.safetensors", scale=0.5)
    old = load_file(str(base))
    full = load_file(str(base.parent / "full.safetensors"))
    half = load_file(str(base.parent / "half.safetensors"))
    for name in ("attn.weight", "mlp.weight"):
        expect = old[name] + 0.5 * (full[name].astype(np.float64) - old[name])
        np.testing.assert_allclose(half[name], expect, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(half["norm.bias"], old["norm.bias"])


def test_scale_on_exact_patch_needs_force(pair: tuple[Path, Path, dict[str, np.ndarray]]) -> None:
    base, target, _ = pair
    create_patch(base, target, base.parent / "p.patch")
    with pytest.raises(UserError, match=r"lossy codecs only; 'attn.weight'"):
        apply_patch(base, base.parent / "p.patch", base.parent / "o.safetensors", scale=0.5)
    assert not (base.parent / "o.safetensors").exists()
    report = apply_patch(
        base, base.parent / "p.patch", base.parent / "o.safetensors", scale=0.5, force=True
    )
    assert any("exactly-coded" in w for w in report.warnings)


def test_wrong_base_is_refused_and_nothing_written(
    pair: tuple[Path, Path, dict[str, np.ndarray]],
) -> None:
    base, target, _ = pair
    create_patch(base, target, base.parent / "p.patch")
    other = load_file(str(base))
    other["mlp.weight"] = other["mlp.weight"] + 1
    save_file(other, str(base.parent / "other.safetensors"))
    out = base.parent / "out.safetensors"
    with pytest.raises(IntegrityError, match=r"1 tensor\(s\) differ \('mlp.weight'\)") as exc:
        apply_patch(base.parent / "other.safetensors", base.parent / "p.patch", out)
    assert "--force" in (exc.value.hint or "")
    assert not out.exists()
    assert [p.name for p in base.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_force_applies_and_warns(pair: tuple[Path, Path, dict[str, np.ndarray]]) -> None:
    base, target, _ = pair
    create_patch(base, target, base.parent / "p.patch")
    other = load_file(str(base))
    other["attn.weight"] = other["attn.weight"] * 2
    save_file(other, str(base.parent / "other.safetensors"))
    runner = CliRunner()
    args = ["patch", "apply", str(base.parent / "other.safetensors"), str(base.parent / "p.patch")]
    res = runner.invoke(cli, [*args, "-o", str(base.parent / "o.safetensors"), "--force"])
    assert res.exit_code == 0, res.output
    assert "WARNING: FORCED" in res.output and "'attn.weight'" in res.output
    assert "results not hash-checked" in res.output
    assert (base.parent / "o.safetensors").exists()
    res = runner.invoke(cli, [*args, "-o", str(base.parent / "o2.safetensors")])
    assert res.exit_code == 3 and "--force" in res.output


def test_added_removed_and_shape_change(tmp_path: Path, rng: np.random.Generator) -> None:
    a = rng.standard_normal((4, 4)).astype(np.float32)
    base: dict[str, np.ndarray] = {
        "a": a,
        "gone": np.ones(3, np.float32),
        "w": np.zeros((2, 3), np.float16),
    }
    target: dict[str, np.ndarray] = {
        "a": a,
        "head": np.arange(6, dtype=np.int32),
        "w": np.ones((3, 2), np.float16),
    }
    save_file(base, str(tmp_path / "b.safetensors"))
    save_file(target, str(tmp_path / "t.safetensors"))
    info = create_patch(tmp_path / "b.safetensors", tmp_path / "t.safetensors", tmp_path / "p")
    assert info.added == ["head"] and info.removed == ["gone"]
    assert {e.name: e.codec for e in info.entries} == {"head": "full", "w": "full"}
    report = apply_patch(tmp_path / "b.safetensors", tmp_path / "p", tmp_path / "o.safetensors")
    assert report.added == ["head"] and report.removed == ["gone"] and report.results_verified
    got = load_file(str(tmp_path / "o.safetensors"))
    assert list(got) == ["a", "w", "head"]
    for name, arr in target.items():
        assert got[name].dtype == arr.dtype and sha(got[name]) == sha(arr)


def test_tensors_glob_and_rules(pair: tuple[Path, Path, dict[str, np.ndarray]]) -> None:
    base, target, _ = pair
    rules = [("attn*", "lowrank", {"rank": 2})]
    info = create_patch(base, target, base.parent / "p", rules=rules, tensors_glob="attn*")
    assert [(e.name, e.codec) for e in info.entries] == [("attn.weight", "lowrank")]


def test_info_numbers_match(pair: tuple[Path, Path, dict[str, np.ndarray]]) -> None:
    base, target, _ = pair
    patch = base.parent / "p.patch"
    runner = CliRunner()
    args = ["patch", "create", str(base), str(target), "-o", str(patch), "--codec", "sparse_topk"]
    args += ["--density", "0.25", "--rule", "attn*=quant:bits=4", "--author", "ann"]
    res = runner.invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert "attn.weight: quant" in res.output and "2 changed" in res.output
    res = runner.invoke(cli, ["patch", "info", str(patch), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info == json.loads(json.dumps(patch_info(patch)))
    assert info["size"] == patch.stat().st_size
    assert info["tensors"]["attn.weight"]["params"]["bits"] == 4
    assert info["tensors"]["mlp.weight"]["params"]["density"] == 0.25
    seg_bytes: dict[str, int] = {}
    for s in scan_file(patch).tensor_segments():
        key = s.name.rpartition("/")[0]
        seg_bytes[key] = seg_bytes.get(key, 0) + s.length
    assert {n: t["bytes"] for n, t in info["tensors"].items()} == seg_bytes
    full = 48 * 32 * 4 + 32 * 24 * 4
    assert info["full_bytes"] == full
    assert info["compression_ratio"] == pytest.approx(full / info["size"])
    assert info["description"] == {"author": "ann"}
    res = runner.invoke(cli, ["patch", "info", str(patch)])
    assert res.exit_code == 0 and "compression" in res.output


def test_bad_rule_and_not_a_patch(pair: tuple[Path, Path, dict[str, np.ndarray]]) -> None:
    base, target, _ = pair
    res = CliRunner().invoke(
        cli, ["patch", "create", str(base), str(target), "-o", "x", "--rule", "nope"]
    )
    assert res.exit_code == 2 and "bad --rule 'nope'" in res.output
    with pytest.raises(UserError, match="not a potluck patch"):
        patch_info(base)

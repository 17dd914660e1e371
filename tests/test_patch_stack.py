"""`potluck patch stack`: composing patches, checked against applying them one by one."""

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
from potluck.ops.patch.apply import apply_patch
from potluck.ops.patch.create import create_patch
from potluck.ops.patch.fileformat import read_patch
from potluck.ops.patch.stack import stack_patches

Arrays = dict[str, np.ndarray]


def sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def save(path: Path, arrays: Arrays) -> Path:
    save_file(arrays, str(path))
    return path


@pytest.fixture
def chain(tmp_path: Path, rng: np.random.Generator) -> tuple[Path, Path, Path]:
    """base → mid → final: attn changed twice, mlp once (first), norm once (second), head added
    by the first step and changed by the second, gone removed by the second."""
    f32 = np.float32
    base: Arrays = {
        "attn": rng.standard_normal((16, 12)).astype(f32),
        "mlp": rng.standard_normal((12, 8)).astype(f32),
        "norm": rng.standard_normal(12).astype(f32),
        "gone": np.ones(4, f32),
        "steps": np.arange(3, dtype=np.int64),
    }
    mid = dict(base)
    mid["attn"] = base["attn"] + 0.01 * rng.standard_normal((16, 12)).astype(f32)
    mid["mlp"] = base["mlp"] + 0.01 * rng.standard_normal((12, 8)).astype(f32)
    mid["head"] = rng.standard_normal((4, 12)).astype(f32)
    final = dict(mid)
    final["attn"] = mid["attn"].copy()
    final["attn"][:3] += 0.5
    final["norm"] = base["norm"] + 1
    final["head"] = mid["head"] * 2
    del final["gone"]
    d = tmp_path
    return save(d / "base.st", base), save(d / "mid.st", mid), save(d / "final.st", final)


def two_step(base: Path, p1: Path, p2: Path, tmp: Path) -> Arrays:
    apply_patch(base, p1, tmp / "step1.st")
    apply_patch(tmp / "step1.st", p2, tmp / "step2.st")
    return load_file(str(tmp / "step2.st"))


def assert_bitwise(got: Arrays, want: Arrays, *, order: bool = True) -> None:
    assert list(got) == list(want) if order else sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape
        assert sha(got[name]) == sha(want[name]), name


@pytest.mark.parametrize("codec", ["exact_xor", "exact_sparse"])
def test_exact_stack_equals_step_by_step(
    chain: tuple[Path, Path, Path], tmp_path: Path, codec: str
) -> None:
    base, mid, final = chain
    p1, p2, stacked = tmp_path / "p1", tmp_path / "p2", tmp_path / "s"
    create_patch(base, mid, p1, default_codec=codec)
    create_patch(mid, final, p2, default_codec=codec)
    report = stack_patches([p1, p2], stacked)
    assert report.exact
    assert report.composed == {"attn": "payload", "head": "payload"}
    assert report.codecs == {"attn": codec, "head": "full", "mlp": codec, "norm": codec}
    applied = apply_patch(base, stacked, tmp_path / "out.st")
    assert applied.results_verified and applied.removed == ["gone"]
    assert_bitwise(load_file(str(tmp_path / "out.st")), two_step(base, p1, p2, tmp_path))
    assert_bitwise(load_file(str(tmp_path / "out.st")), load_file(str(final)), order=False)
    # tensors touched by one part only are carried over unchanged
    s, one, two = read_patch(stacked), read_patch(p1), read_patch(p2)
    for name, part in (("mlp", one), ("norm", two)):
        assert s.base[name] == part.base[name] and s.result[name] == part.result[name]
        for key, arr in part.payloads[name].arrays.items():
            assert s.payloads[name].arrays[key].tobytes() == arr.tobytes()
    assert s.added == ["head"] and s.removed == ["gone"]
    assert [p["sha256"] for p in s.description["stack"]] == [
        hashlib.sha256(p.read_bytes()).hexdigest() for p in (p1, p2)
    ]


def test_three_parts_and_cli(chain: tuple[Path, Path, Path], tmp_path: Path) -> None:
    base, mid, final = chain
    last = load_file(str(final))
    last["mlp"] = last["mlp"] - 3
    save(tmp_path / "last.st", last)
    p = [tmp_path / f"p{i}" for i in range(3)]
    create_patch(base, mid, p[0])
    create_patch(mid, final, p[1], rules=[("attn", "full", {})])
    create_patch(final, tmp_path / "last.st", p[2])
    res = CliRunner().invoke(
        cli, ["patch", "stack", *map(str, p), "-o", str(tmp_path / "s"), "--json"]
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["exact"] and out["composed"] == {
        "attn": "payload",
        "head": "payload",
        "mlp": "payload",
    }
    apply_patch(base, tmp_path / "s", tmp_path / "o.st")
    assert_bitwise(load_file(str(tmp_path / "o.st")), last, order=False)


def test_mixed_exact_codecs_need_base(chain: tuple[Path, Path, Path], tmp_path: Path) -> None:
    base, mid, final = chain
    p1, p2 = tmp_path / "p1", tmp_path / "p2"
    create_patch(base, mid, p1, default_codec="exact_xor")
    create_patch(mid, final, p2, default_codec="exact_sparse")
    with pytest.raises(
        UserError, match=r"cannot stack tensor 'attn' \(exact_xor then exact_sparse\)"
    ):
        stack_patches([p1, p2], tmp_path / "s")
    assert not (tmp_path / "s").exists()
    report = stack_patches([p1, p2], tmp_path / "s", base=base)
    assert report.exact and report.composed["attn"] == "materialised"
    apply_patch(base, tmp_path / "s", tmp_path / "o.st")
    assert_bitwise(load_file(str(tmp_path / "o.st")), two_step(base, p1, p2, tmp_path))


def test_lossy_first_part(chain: tuple[Path, Path, Path], tmp_path: Path) -> None:
    base, mid, final = chain
    p1, p2 = tmp_path / "p1", tmp_path / "p2"
    create_patch(base, mid, p1, default_codec="lowrank", params={"rank": 2})
    apply_patch(base, p1, tmp_path / "mid_lossy.st")  # P2 is made on top of the lossy result
    target = load_file(str(final))
    target["mlp"] = load_file(str(tmp_path / "mid_lossy.st"))["mlp"]
    save(tmp_path / "final2.st", target)
    create_patch(tmp_path / "mid_lossy.st", tmp_path / "final2.st", p2)
    with pytest.raises(UserError, match=r"'attn' \(lowrank then exact_xor\) without the base"):
        stack_patches([p1, p2], tmp_path / "s")
    want = two_step(base, p1, p2, tmp_path)
    # re-encoded exactly: bit for bit the step-by-step result
    report = stack_patches([p1, p2], tmp_path / "s", base=base)
    assert report.composed == {"attn": "materialised", "head": "payload"}
    assert not report.exact and report.codecs["attn"] == "exact_xor" and not report.errors
    apply_patch(base, tmp_path / "s", tmp_path / "o.st")
    assert_bitwise(load_file(str(tmp_path / "o.st")), want)
    # re-encoded lossily: the reported error is the error against the step-by-step result
    report = stack_patches([p1, p2], tmp_path / "s2", base=base, default_codec="quant")
    assert not report.exact and set(report.errors) == {"attn"}
    apply_patch(base, tmp_path / "s2", tmp_path / "o2.st")
    got, old = load_file(str(tmp_path / "o2.st")), load_file(str(base))
    delta = want["attn"].astype(np.float64) - old["attn"]
    rel = np.linalg.norm(got["attn"] - old["attn"].astype(np.float64) - delta) / np.linalg.norm(
        delta
    )
    assert rel == pytest.approx(report.errors["attn"], rel=1e-3)
    assert sha(got["mlp"]) == sha(want["mlp"])  # carried lossy part 1 payload: same decode


def test_incompatible_parts_are_refused(chain: tuple[Path, Path, Path], tmp_path: Path) -> None:
    base, mid, final = chain
    p1, p2 = tmp_path / "p1", tmp_path / "p2"
    create_patch(base, mid, p1)
    create_patch(base, final, p2)  # made against the base, not against P1's result
    with pytest.raises(
        UserError, match=r"part 2 \(.*p2\) does not apply .* tensor 'attn' is pinned"
    ):
        stack_patches([p1, p2], tmp_path / "s")
    assert not (tmp_path / "s").exists()
    res = CliRunner().invoke(cli, ["patch", "stack", str(p1), str(p2), "-o", str(tmp_path / "s")])
    assert res.exit_code == 2 and "does not apply to the result" in res.output
    create_patch(mid, final, p2, default_codec="exact_sparse")
    other = load_file(str(base))
    other["attn"] = other["attn"] + 1
    save(tmp_path / "other.st", other)
    with pytest.raises(IntegrityError, match=r"not the base of this stack: tensor 'attn'"):
        stack_patches([p1, p2], tmp_path / "s", base=tmp_path / "other.st")
    assert not (tmp_path / "s").exists()


def test_removed_then_changed_is_refused(chain: tuple[Path, Path, Path], tmp_path: Path) -> None:
    base, mid, final = chain
    p1, p2 = tmp_path / "p1", tmp_path / "p2"
    create_patch(mid, final, p1)  # removes "gone"
    create_patch(base, mid, p2, tensors_glob="gone")  # changes nothing…
    changed = load_file(str(mid))
    changed["gone"] = changed["gone"] * 3
    save(tmp_path / "g.st", changed)
    create_patch(mid, tmp_path / "g.st", p2)  # …this one changes "gone"
    with pytest.raises(UserError, match=r"tensor 'gone' was removed by an earlier part"):
        stack_patches([p1, p2], tmp_path / "s")


def test_removed_then_added_and_added_then_removed(
    chain: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    base, mid, final = chain
    p1, p2 = tmp_path / "p1", tmp_path / "p2"
    create_patch(mid, final, p1)  # on mid: removes "gone"
    back = load_file(str(final))
    back["gone"] = np.full(4, 7, np.float32)  # added again, with new values
    del back["head"]
    save(tmp_path / "back.st", back)
    create_patch(final, tmp_path / "back.st", p2)  # adds "gone", removes "head"
    report = stack_patches([p1, p2], tmp_path / "s")
    s = read_patch(tmp_path / "s")
    assert s.removed == ["head"] and s.added == ["gone"] and "head" not in s.payloads
    assert report.exact
    apply_patch(mid, tmp_path / "s", tmp_path / "o.st")
    # same tensors bit for bit; the re-added tensor keeps its base position instead of going last
    assert_bitwise(load_file(str(tmp_path / "o.st")), two_step(mid, p1, p2, tmp_path), order=False)
    # added by the first part, removed by the second: gone from the stack altogether
    create_patch(base, mid, p1)  # adds "head"
    no_head = load_file(str(mid))
    del no_head["head"]
    save(tmp_path / "nh.st", no_head)
    create_patch(mid, tmp_path / "nh.st", p2)
    stack_patches([p1, p2], tmp_path / "s")
    s = read_patch(tmp_path / "s")
    assert "head" not in s.payloads and s.removed == [] and s.added == []
    apply_patch(base, tmp_path / "s", tmp_path / "o.st")
    assert_bitwise(load_file(str(tmp_path / "o.st")), two_step(base, p1, p2, tmp_path))

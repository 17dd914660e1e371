"""``patch create --budget/--max-error``: the rate–distortion allocation, its predictions, and
refusals of budgets and tolerances that cannot be met (real files, real patches)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

import potluck.cli.patch_cmd  # noqa: F401  (registers `potluck patch`)
from potluck.cli.main import cli
from potluck.errors import UserError
from potluck.ops.patch.apply import apply_patch
from potluck.ops.patch.budget import (
    Option,
    Plan,
    TensorCurve,
    allocate,
    array_cost,
    check_fits,
    header_estimate,
    lower_hull,
    parse_budget,
)
from potluck.ops.patch.create import create_patch, patch_info
from potluck.ops.patch.fileformat import read_patch

SHAPES = {"l0.attn.weight": (192, 128), "l0.mlp.weight": (256, 128), "l1.attn.weight": (192, 128)}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A base and a fine-tune-like target: decaying-spectrum deltas plus noise, a changed bias,
    an unchanged int tensor."""
    rng = np.random.default_rng(7)
    d = tmp_path_factory.mktemp("budget")
    base: dict[str, np.ndarray] = {"steps": np.arange(4, dtype=np.int64)}
    target: dict[str, np.ndarray] = {"steps": base["steps"]}
    for i, (name, (m, n)) in enumerate(sorted(SHAPES.items())):
        w = rng.standard_normal((m, n)).astype(np.float32)
        k = min(m, n)
        u, _ = np.linalg.qr(rng.standard_normal((m, k)))
        v, _ = np.linalg.qr(rng.standard_normal((n, k)))
        spectrum = (i + 1) * 0.02 * (np.arange(1, k + 1) ** -1.0)
        base[name], target[name] = w, (w + (u * spectrum) @ v.T).astype(np.float32)
    base["l0.bias"] = rng.standard_normal(128).astype(np.float32)
    target["l0.bias"] = base["l0.bias"] + np.float32(0.01)
    save_file(base, str(d / "base.safetensors"))
    save_file(target, str(d / "target.safetensors"))
    return d / "base.safetensors", d / "target.safetensors"


FP16 = 2 * (sum(m * n for m, n in SHAPES.values()) + 128)


def test_parse_budget_units() -> None:
    assert parse_budget("1000", FP16) == 1000
    assert parse_budget(2500, FP16) == 2500
    assert parse_budget("5MB", FP16) == 5_000_000
    assert parse_budget("2KiB", FP16) == 2048
    assert parse_budget("1.5kb", FP16) == 1500
    assert parse_budget("x16", 1600) == 100
    for bad in ("5 parsecs", "x0", "x-2", "-5", "MB"):
        with pytest.raises(UserError, match="bad --budget"):
            parse_budget(bad, FP16)


def _opt(nbytes: int, err: float, rank: int) -> Option:
    return Option("qlowrank", {"rank": rank, "bits": 8}, nbytes, err)


def test_hull_drops_dominated_and_concave_points() -> None:
    pts = [_opt(0, 100, 0), _opt(10, 40, 1), _opt(20, 35, 2), _opt(30, 10, 3), _opt(40, 12, 4)]
    assert [o.params["rank"] for o in lower_hull(pts[::-1])] == [0, 1, 3]


def test_greedy_takes_best_error_per_byte_within_budget() -> None:
    a = TensorCurve("a", 100.0, 0, [_opt(0, 100, 0), _opt(10, 20, 1), _opt(20, 10, 2)])
    b = TensorCurve("b", 100.0, 0, [_opt(0, 100, 0), _opt(10, 50, 1), _opt(20, 0, 2)])
    header = header_estimate(["a", "b"])
    plan = allocate([b, a], header + 30, None)
    # steps by gain per byte: a→1 (8/B), b→1 (5/B), b→2 (5/B; the name breaks the tie), a→2
    assert {n: c.params["rank"] for n, c in plan.choices.items()} == {"a": 1, "b": 2}
    assert plan.payload_bytes == 30
    assert plan.choices["b"].predicted_error == 0.0
    assert plan.choices["a"].predicted_error == pytest.approx(math.sqrt(0.2))
    with pytest.raises(UserError) as exc:
        allocate([a, b], header + 15, 0.5)  # within 0.5: a needs rank 1, b rank 2
    assert exc.value.data["smallest_budget"] == header + 30
    assert f"the smallest feasible budget is {header + 30} bytes" in str(exc.value)


def test_budgeted_patch_fits_predicts_and_applies(models: tuple[Path, Path]) -> None:
    base, target = models
    out = base.parent / "x8.patch"
    info = create_patch(base, target, out, budget="x8")
    assert info.size <= FP16 // 8
    assert out.stat().st_size == info.size
    entries = {e.name: e for e in info.entries}
    assert sorted(entries) == ["l0.attn.weight", "l0.bias", "l0.mlp.weight", "l1.attn.weight"]
    assert entries["l0.bias"].codec == "full"
    for name in SHAPES:
        e = entries[name]
        assert e.codec in ("qlowrank", "lowrank")
        assert e.relative_error is not None and e.predicted_error is not None
        assert abs(e.relative_error - e.predicted_error) <= 0.1 * e.predicted_error + 0.01
    # the largest delta gets the most bytes
    assert entries["l1.attn.weight"].nbytes > entries["l0.attn.weight"].nbytes
    shown = patch_info(out)["tensors"]["l0.mlp.weight"]
    assert shown["predicted_error"] == entries["l0.mlp.weight"].predicted_error
    assert "predicted_error" not in shown["params"]
    report = apply_patch(base, out, base.parent / "x8.safetensors")
    assert not report.warnings
    got, want = load_file(str(base.parent / "x8.safetensors")), load_file(str(target))
    assert np.array_equal(got["l0.bias"], want["l0.bias"])
    # deterministic: the same inputs give the same bytes
    again = create_patch(base, target, base.parent / "x8b.patch", budget="x8")
    assert again.size == info.size
    assert out.read_bytes() == (base.parent / "x8b.patch").read_bytes()


def test_max_error_alone_gives_a_patch_within_tolerance(models: tuple[Path, Path]) -> None:
    base, target = models
    info = create_patch(base, target, base.parent / "tol.patch", max_error=0.3)
    for e in info.entries:
        if e.name in SHAPES:
            assert e.predicted_error is not None and e.predicted_error <= 0.3
            assert e.relative_error is not None and e.relative_error <= 0.3 * 1.05


def test_budget_below_overhead_refused_naming_smallest(models: tuple[Path, Path]) -> None:
    base, target = models
    out = base.parent / "tiny.patch"
    with pytest.raises(UserError) as exc:
        create_patch(base, target, out, budget=1000)
    smallest = header_estimate([*sorted(SHAPES), "l0.bias"]) + 4 * 128
    smallest += array_cost("l0.bias", 1) + sum(array_cost(n, 4) for n in SHAPES)
    assert exc.value.data["smallest_budget"] == smallest
    assert str(exc.value).startswith(
        "--budget 1000 bytes is too small: it is smaller than the patch's fixed overhead"
    )
    assert not out.exists()
    assert create_patch(base, target, out, budget=smallest).size <= smallest


def test_tolerance_that_does_not_fit_names_smallest_budget(models: tuple[Path, Path]) -> None:
    base, target = models
    out = base.parent / "tight.patch"
    with pytest.raises(UserError) as exc:
        create_patch(base, target, out, budget="x8", max_error=0.01)
    need = exc.value.data["smallest_budget"]
    assert "no encoding meets --max-error 0.01 within it" in str(exc.value)
    assert need > FP16 // 8
    assert not out.exists()
    assert create_patch(base, target, out, budget=need, max_error=0.01).size <= need


def test_cli_budget_and_codec_conflict_and_info(models: tuple[Path, Path]) -> None:
    base, target = models
    out = str(base.parent / "cli.patch")
    runner = CliRunner()
    args = ["patch", "create", str(base), str(target), "-o", out, "--budget", "x8"]
    bad = runner.invoke(cli, [*args, "--codec", "lowrank", "--rank", "4"])
    assert bad.exit_code != 0
    assert (
        "--budget/--max-error choose each tensor's codec; --codec, --rank cannot be combined "
        "with them" in bad.output
    )
    assert "Traceback" not in bad.output
    assert not Path(out).exists()
    ok = runner.invoke(cli, args)
    assert ok.exit_code == 0, ok.output
    shown = runner.invoke(cli, ["patch", "info", out])
    assert shown.exit_code == 0
    line = next(x for x in shown.output.splitlines() if "l1.attn.weight" in x)
    assert "(predicted " in line and ("qlowrank[" in line or "lowrank[" in line)


def test_row_sparse_delta_factors_only_changed_rows(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    base = {"emb.weight": rng.standard_normal((600, 32)).astype(np.float32)}
    target = {"emb.weight": base["emb.weight"].copy()}
    rows = np.arange(0, 600, 50)
    target["emb.weight"][rows] += np.float32(0.1) * rng.standard_normal((12, 32)).astype(np.float32)
    save_file(base, str(tmp_path / "b.safetensors"))
    save_file(target, str(tmp_path / "t.safetensors"))
    fp16 = 2 * 12 * 32
    budget = header_estimate(["emb.weight"]) + array_cost("emb.weight", 5) + fp16 // 2
    info = create_patch(
        tmp_path / "b.safetensors", tmp_path / "t.safetensors", tmp_path / "p.patch", budget=budget
    )
    p = patch_info(tmp_path / "p.patch")["tensors"]["emb.weight"]
    assert p["params"]["rows"] == "changed"
    assert (tmp_path / "p.patch").stat().st_size <= budget
    assert p["bytes"] < 12 * 32 * 4  # factors of the changed rows, less than those rows exactly
    assert info.entries[0].relative_error is not None and info.entries[0].relative_error < 0.5


def test_real_header_checked_before_writing(models: tuple[Path, Path]) -> None:
    base, target = models
    out = base.parent / "fits.patch"
    info = create_patch(base, target, out, budget="x8")
    contents = read_patch(out)
    check_fits(Plan(budget=info.size), contents)  # exactly fits
    with pytest.raises(UserError) as exc:
        check_fits(Plan(budget=info.size - 1, header_bytes=100), contents)
    assert exc.value.data["smallest_budget"] == info.size
    assert f"the patch needs {info.size} bytes" in str(exc.value)


def test_negative_or_nan_tolerance_refused(models: tuple[Path, Path]) -> None:
    base, target = models
    for bad in (-0.1, float("nan")):
        want = r"^bad --max-error (-0\.1|nan)\nhint: a relative error"
        with pytest.raises(UserError, match=want):
            create_patch(base, target, base.parent / "bad.patch", max_error=bad)
    assert not (base.parent / "bad.patch").exists()


def test_the_bytes_the_header_estimate_leaves_go_to_the_tensors(
    models: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``header_estimate`` is an upper bound: what the real header leaves of the budget is
    spent on the next hull steps (``budget.refill``), re-encoding only those tensors. The
    reference is the same patch with nothing refilled: smaller, and with a larger error."""
    base, target = models
    budget = parse_budget("x16", FP16)

    def made(name: str) -> tuple[int, float]:
        info = create_patch(base, target, tmp_path / name, budget="x16", check=True)
        assert info.quality is not None
        return info.size, sum(t.error_norm**2 for t in info.quality.tensors)

    refilled, refilled_error = made("refilled.patch")
    monkeypatch.setattr("potluck.ops.patch.create.refill", lambda plan, room: [])
    first, first_error = made("first.patch")
    assert first < refilled <= budget
    assert refilled_error < first_error
    assert refilled == (tmp_path / "refilled.patch").stat().st_size

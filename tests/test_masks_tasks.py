"""Merged model + per-task parts: ``potluck merge --method tall_masks|emr`` writes
``OUT/tasks/<name>.patch``, ``potluck patch apply OUT OUT/tasks/<name>.patch`` rebuilds the task
from the merged model and the original base, and every wrong or missing model is refused."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result
from safetensors.numpy import load_file

from potluck.cli.main import cli
from potluck.ops.patch import patch_info
from tests.conftest import save_st

SHAPES = {"w": (512, 512), "b": (512,)}
NAMES = ("ft-a", "ft-b", "ft-c")


def _cli(cwd: Path, *args: str) -> Result:
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        return CliRunner().invoke(cli, list(args))


def _ok(cwd: Path, *args: str) -> str:
    res = _cli(cwd, *args)
    assert res.exit_code == 0, res.output
    return res.output


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A base and three sparse fine-tunes (float32), as files in one folder."""
    rng = np.random.default_rng(16)
    root = tmp_path_factory.mktemp("tasks")
    base = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    save_st(root / "base.safetensors", base)
    for name in NAMES:
        ft = {
            k: (v + rng.normal(scale=0.05, size=v.shape) * (rng.random(v.shape) < 0.3)).astype(
                np.float32
            )
            for k, v in base.items()
        }
        save_st(root / f"{name}.safetensors", ft)
    return root


@pytest.fixture(scope="module")
def emr_out(models: Path) -> tuple[Path, str]:
    files = [f"{n}.safetensors" for n in NAMES]
    out = _ok(models, "merge", "--method", "emr", "--base", "base.safetensors", *files, "-o", "E")
    return models / "E", out


def _load(path: Path) -> dict[str, np.ndarray]:
    return load_file(str(path))


def test_emr_writes_one_patch_per_task_that_rebuilds_it(
    models: Path, emr_out: tuple[Path, str]
) -> None:
    out, _ = emr_out
    assert sorted(p.name for p in (out / "tasks").iterdir()) == [f"{n}.patch" for n in NAMES]
    base, merged = _load(models / "base.safetensors"), _load(out / "model.safetensors")
    ft = _load(models / "ft-b.safetensors")
    # the reference: θ₀ + γ·M ⊙ (θ_m − θ₀), γ = Σ|τ| / Σ|M ⊙ τ_m| over the whole model
    tau = {k: ft[k] - base[k] for k in SHAPES}
    tau_m = {k: merged[k] - base[k] for k in SHAPES}
    mask = {k: tau[k] * tau_m[k] > 0 for k in SHAPES}
    num = sum(float(np.abs(tau[k].astype(np.float64)).sum()) for k in SHAPES)
    den = sum(
        float(np.abs(np.where(mask[k], tau_m[k], 0).astype(np.float64)).sum()) for k in SHAPES
    )
    gamma = np.float32(num / den)
    res = _ok(models, "patch", "apply", "E", "E/tasks/ft-b.patch", "-o", "B")
    assert "2 changed, 0 added, 0 removed; results verified" in res
    got = _load(models / "B" / "model.safetensors")
    for k in SHAPES:
        want = np.where(mask[k], base[k] + tau_m[k] * gamma, base[k])
        np.testing.assert_array_equal(got[k], want)
    info = patch_info(out / "tasks" / "ft-b.patch")
    assert info["description"]["task"] == "ft-b"
    assert {t["codec"] for t in info["tensors"].values()} == {"task_mask"}
    assert info["tensors"]["w"]["params"]["scale"] == float(num / den)


def test_bits_per_parameter(models: Path, emr_out: tuple[Path, str]) -> None:
    out, text = emr_out
    params = sum(math.prod(s) for s in SHAPES.values())
    for name in NAMES:
        info = patch_info(out / "tasks" / f"{name}.patch")
        # exactly one bit per parameter, packed eight to a byte, plus the header
        assert info["payload_bytes"] == sum(math.ceil(math.prod(s) / 8) for s in SHAPES.values())
        assert info["description"]["mask_bits_per_parameter"] == 1.0
        bits = 8 * info["size"] / params
        assert bits <= 1.1
        assert f"tasks/{name}.patch: {info['size']} bytes, {bits:.4g} bits/parameter" in text
    res = _ok(models, "patch", "info", "E/tasks/ft-a.patch")
    assert f"{8 * patch_info(out / 'tasks' / 'ft-a.patch')['size'] / params:.4g} bits" in res


def test_tall_masks_rebuild_disjoint_tasks_exactly(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    base = rng.normal(size=(64, 48)).astype(np.float32)
    save_st(tmp_path / "base.safetensors", {"w": base})
    owner = rng.integers(0, 3, size=base.shape)  # each weight is tuned by one task at most
    for t in range(3):
        delta = np.where(owner == t, rng.normal(scale=0.1, size=base.shape), 0.0)
        save_st(tmp_path / f"t{t}.safetensors", {"w": (base + delta).astype(np.float32)})
    files = [f"t{t}.safetensors" for t in range(3)]
    _ok(tmp_path, "merge", "--method", "tall_masks", "--base", "base.safetensors", *files,
        "-o", "M", "-p", "mask_lambda=0.4")  # fmt: skip
    for t in range(3):
        _ok(tmp_path, "patch", "apply", "M", f"M/tasks/t{t}.patch", "-o", f"R{t}")
        got = (tmp_path / f"R{t}" / "model.safetensors").read_bytes()
        rebuilt = load_file(str(tmp_path / f"R{t}" / "model.safetensors"))["w"]
        want = load_file(str(tmp_path / f"t{t}.safetensors"))["w"]
        assert got and rebuilt.tobytes() == want.tobytes()


def test_wrong_or_missing_models_are_refused(
    models: Path, emr_out: tuple[Path, str], tmp_path: Path
) -> None:
    out, _ = emr_out
    digest = patch_info(out / "tasks" / "ft-a.patch")["description"]["origin"]["weights_digest"]
    # the patch's base is the merged model: the original base is not it
    res = _cli(models, "patch", "apply", "base.safetensors", "E/tasks/ft-a.patch", "-o", "x")
    assert res.exit_code != 0 and "is not the base this patch was made for" in res.output
    res = _cli(models, "patch", "apply", "E", "E/tasks/ft-a.patch", "-o", "x",
               "--with", "ft-b.safetensors")  # fmt: skip
    assert res.exit_code != 0
    assert "is not the original base of this task patch" in res.output
    assert f"expected {digest}" in res.output
    res = _cli(models, "patch", "apply", "E", "E/tasks/ft-a.patch", "-o", "x", "--scale", "0.5")
    assert res.exit_code != 0 and "--scale 0.5 does not apply to a task patch" in res.output
    assert not (models / "x").exists()
    # merged model moved without its base: found no more, then given with --with
    shutil.copytree(out, tmp_path / "E")
    shutil.copy(models / "base.safetensors", tmp_path / "orig.safetensors")
    (models / "base.safetensors").rename(models / "base.moved")
    try:
        res = _cli(tmp_path, "patch", "apply", "E", "E/tasks/ft-a.patch", "-o", "A")
        assert res.exit_code != 0 and f"weights digest {digest}) is not at" in res.output
        assert "--with BASE" in res.output
    finally:
        (models / "base.moved").rename(models / "base.safetensors")
    _ok(
        tmp_path,
        "patch",
        "apply",
        "E",
        "E/tasks/ft-a.patch",
        "-o",
        "A",
        "--with",
        "orig.safetensors",
    )
    assert sorted(p.name for p in (tmp_path / "A").iterdir())[-1] == "model.safetensors"


def test_other_refusals(models: Path, tmp_path: Path) -> None:
    # --with on an ordinary patch
    patch = str(tmp_path / "p")
    _ok(models, "patch", "create", "base.safetensors", "ft-a.safetensors", "-o", patch)
    res = _cli(models, "patch", "apply", "base.safetensors", patch, "-o",
               str(tmp_path / "o.safetensors"), "--with", "base.safetensors")  # fmt: skip
    assert res.exit_code != 0 and "this patch does not need one" in res.output
    # task_mask payloads are written by merges only
    res = _cli(models, "patch", "create", "base.safetensors", "ft-a.safetensors", "-o",
               str(tmp_path / "q"), "--codec", "task_mask")  # fmt: skip
    assert res.exit_code != 0 and "is written by merges, not by `patch create`" in res.output
    # two inputs that would write the same task patch: refused before anything is written
    (tmp_path / "d").mkdir()
    shutil.copy(models / "ft-a.safetensors", tmp_path / "d" / "ft-a.safetensors")
    res = _cli(models, "merge", "--method", "emr", "--base", "base.safetensors", "ft-a.safetensors",
               str(tmp_path / "d" / "ft-a.safetensors"), "-o", str(tmp_path / "M"))  # fmt: skip
    assert res.exit_code != 0 and "would both write tasks/ft-a.patch" in res.output
    assert not (tmp_path / "M").exists()


def test_yaml_tall_masks_on_ties_with_a_lambda_per_model(models: Path) -> None:
    (models / "tall.yaml").write_text(
        "merge_method: tall_masks\nbase_model: base.safetensors\n"
        "models:\n"
        "  - {model: ft-a.safetensors, parameters: {mask_lambda: 0.2}}\n"
        "  - {model: ft-b.safetensors, parameters: {mask_lambda: 0.6}}\n"
        "parameters:\n  base_method: ties\n  density: 0.5\n"
    )
    _ok(models, "merge", "tall.yaml", "T")
    base, merged = _load(models / "base.safetensors"), _load(models / "T" / "model.safetensors")
    for name, lam in (("ft-a", 0.2), ("ft-b", 0.6)):
        _ok(models, "patch", "apply", "T", f"T/tasks/{name}.patch", "-o", f"T-{name}")
        ft = _load(models / f"{name}.safetensors")
        got = _load(models / f"T-{name}" / "model.safetensors")
        for k in SHAPES:
            tau, tau_m = ft[k] - base[k], merged[k] - base[k]
            mask = np.abs(tau) > np.float32(lam) * np.abs(tau_m - tau)
            np.testing.assert_array_equal(got[k], np.where(mask, merged[k], base[k]))


def test_experts_add_refuses_a_task_patch(models: Path, emr_out: tuple[Path, str]) -> None:
    res = _cli(models, "experts", "add", "-L", "lib", "E/tasks/ft-a.patch", "--name", "ft-a",
               "--version", "1.0.0")  # fmt: skip
    assert res.exit_code != 0
    assert "is a task_mask part of a tall_masks/emr merge: compose serves" in res.output
    assert not (models / "lib").exists()

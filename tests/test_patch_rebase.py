"""`potluck patch rebase` (issue 17 item 6): a patch made against base v1 ported to v2 as a
three-way merge relative to v1, checked against naive float64 references."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file

from conftest import Run, model, save_st
from potluck.cli.main import cli
from potluck.errors import IntegrityError
from potluck.merging import MERGE_METHODS
from potluck.ops.compose import AddOptions, add_expert, find_expert
from potluck.ops.lineage import weights_digest_of
from potluck.ops.patch import apply_patch, create_patch, read_patch
from potluck.ops.patch.rebase import rebase_patch
from potluck.tensors.digests import tensor_sha256, weights_digest
from test_vcs import commit

Arrays = dict[str, np.ndarray]
#: task arithmetic's parameters, defaults resolved (what the rebased patch records)
PARAMS = MERGE_METHODS.get("task_arithmetic").resolve_params({})


def _versions() -> tuple[Arrays, Arrays, Arrays]:
    """v1; the contributor's target (changes layers.0.w and layers.1.w); v2, the moved base
    (changes layers.0.w, the conflict, and embed, which the patch leaves alone)."""
    rng = np.random.default_rng(7)
    v1 = model(rng, n_layers=2, d=8)

    def bump(d: Arrays, names: list[str], scale: float) -> Arrays:
        return dict(
            d, **{n: (d[n] + scale * rng.normal(size=d[n].shape)).astype(np.float32) for n in names}
        )

    target = bump(v1, ["layers.0.w", "layers.1.w"], 0.05)
    v2 = bump(v1, ["layers.0.w", "embed"], 0.05)
    return v1, target, v2


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    v1, target, v2 = _versions()
    out = {}
    for name, tensors in (("v1", v1), ("target", target), ("v2", v2)):
        out[name] = tmp_path / f"{name}.safetensors"
        save_st(out[name], tensors)
    out["patch"] = tmp_path / "p.patch"
    create_patch(out["v1"], out["target"], out["patch"])
    return out


def _applied(p2: Path, v2: Path, tmp_path: Path) -> Arrays:
    apply_patch(v2, p2, tmp_path / "rebased.safetensors")
    return load_file(str(tmp_path / "rebased.safetensors"))


def test_task_arithmetic_rebase_equals_v2_plus_the_patch_delta(
    files: dict[str, Path], tmp_path: Path
) -> None:
    v1, target, v2 = _versions()
    report = rebase_patch(
        files["patch"], files["v1"], files["v2"], tmp_path / "p2.patch", method="ta"
    )
    got = _applied(tmp_path / "p2.patch", files["v2"], tmp_path)
    for name in v1:
        a, b, t = (x[name].astype(np.float64) for x in (v1, v2, target))
        want = (a + ((b - a) + (t - a))).astype(np.float32)  # v2 + (target − v1), float64
        assert tensor_sha256(got[name]) == tensor_sha256(want), name
    assert got["layers.1.w"].tobytes() == target["layers.1.w"].tobytes()  # patch only: exact
    assert got["embed"].tobytes() == v2["embed"].tobytes()  # base only: v2's
    assert [(t.name, t.status, t.resolution) for t in report.tensors] == [
        ("layers.0.w", "conflict", "task_arithmetic of both changes"),
        ("layers.1.w", "patch", "the patch's tensor"),
    ]
    assert report.base_only == 1 and report.method == "task_arithmetic"
    p2 = read_patch(tmp_path / "p2.patch")
    assert sorted(p2.base) == ["layers.0.w", "layers.1.w"]
    assert p2.base["layers.0.w"] == tensor_sha256(v2["layers.0.w"])  # pinned to v2
    assert p2.description["rebased"] == {
        "from_patch_sha256": hashlib.sha256(files["patch"].read_bytes()).hexdigest(),
        "old_base_digest": weights_digest_of(files["v1"]),
        "new_base_digest": weights_digest_of(files["v2"]),
        "method": "task_arithmetic",
        "params": PARAMS,
        "seed": 0,
    }


def _ties_reference(v1: np.ndarray, v2: np.ndarray, t: np.ndarray) -> np.ndarray:
    """TIES (density 1: no trimming) per its steps: task vectors, elected sign = sign of the
    sum (0 elects +), mean of the agreeing entries."""
    a = v1.astype(np.float64)
    taus = np.stack([v2.astype(np.float64) - a, t.astype(np.float64) - a])
    sign = np.where(taus.sum(axis=0) >= 0, 1.0, -1.0)
    agree = (taus * sign) > 0
    count = agree.sum(axis=0)
    total = np.where(agree, taus, 0.0).sum(axis=0)
    merged = np.where(count > 0, total / np.maximum(count, 1), total)
    return (a + merged).astype(np.float32)


def test_ties_rebase_through_the_cli_matches_the_steps(
    files: dict[str, Path], tmp_path: Path
) -> None:
    v1, target, v2 = _versions()
    args = [
        "patch",
        "rebase",
        str(files["patch"]),
        "--onto",
        str(files["v2"]),
        "--old-base",
        str(files["v1"]),
        "--method",
        "ties",
        "-o",
        str(tmp_path / "p2.patch"),
        "--json",
    ]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert (doc["method"], doc["conflicts"], doc["base_only"]) == ("ties", ["layers.0.w"], 1)
    got = _applied(tmp_path / "p2.patch", files["v2"], tmp_path)
    want = _ties_reference(v1["layers.0.w"], v2["layers.0.w"], target["layers.0.w"])
    np.testing.assert_array_equal(got["layers.0.w"], want)
    assert got["layers.1.w"].tobytes() == target["layers.1.w"].tobytes()


def test_a_wrong_old_base_is_refused_and_nothing_is_written(
    files: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(IntegrityError, match="not the one the patch was made against"):
        rebase_patch(files["patch"], files["v2"], files["v2"], tmp_path / "p2.patch")
    assert not (tmp_path / "p2.patch").exists()
    args = [
        "patch",
        "rebase",
        str(files["patch"]),
        "--onto",
        str(files["v2"]),
        "--method",
        "linear",
        "--old-base",
        str(files["v1"]),
        "-o",
        str(tmp_path / "p2.patch"),
    ]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 2 and "does not merge relative to a base" in r.stderr
    assert not (tmp_path / "p2.patch").exists()


def test_old_base_found_through_history_and_lineage_shows_the_rebase(
    repo: Path, git: Run, tmp_path: Path
) -> None:
    v1, target, v2 = _versions()
    save_st(repo / "m.safetensors", v1)
    c1 = commit(git, "m.safetensors", "v1")
    save_st(tmp_path / "target.safetensors", target)
    git(
        "potluck",
        "patch",
        "create",
        "m.safetensors@HEAD",
        str(tmp_path / "target.safetensors"),
        "-o",
        "p.patch",
    )
    save_st(repo / "m.safetensors", v2)
    commit(git, "m.safetensors", "v2: the base moved")
    out = git("potluck", "patch", "rebase", "p.patch", "--onto", "m.safetensors", "-o", "p2.patch")
    assert out.splitlines()[-1].startswith(
        "2 patched tensor(s), 1 conflict(s) resolved by "
        "task_arithmetic, 1 changed by the base only → p2.patch"
    )
    doc = json.loads(git("potluck", "lineage", "p2.patch", "--json"))
    rebase = doc["edges"][1]
    assert (rebase["relation"], rebase["method"]) == ("patch", "rebase")
    assert [p["digest"] for p in rebase["parents"]] == [_digest(v2), _digest(v1)]
    base_edge = json.loads(git("potluck", "lineage", "p.patch", "--json"))["edges"][0]
    assert base_edge["parents"][0]["commit"] == c1


def _digest(tensors: Arrays) -> str:
    return weights_digest({n: ("F32", a.shape, tensor_sha256(a)) for n, a in tensors.items()})


def test_experts_rebase_adds_a_low_rank_version_pinned_to_the_new_base(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    v1 = model(rng, n_layers=2, d=8)
    lora = {
        n: (rng.normal(size=(8, 2)) @ rng.normal(size=(2, 8))).astype(np.float32) * 0.01
        for n in ("layers.0.w", "layers.1.w")
    }
    target = dict(v1, **{n: v1[n] + d for n, d in lora.items()})
    v2 = dict(v1, **{"layers.0.w": v1["layers.0.w"] + 0.03, "embed": v1["embed"] * 1.5})
    paths = {}
    for name, tensors in (("v1", v1), ("target", target), ("v2", v2)):
        paths[name] = tmp_path / f"{name}.safetensors"
        save_st(paths[name], tensors)
    create_patch(
        paths["v1"],
        paths["target"],
        tmp_path / "e.patch",
        default_codec="lowrank",
        params={"rank": 2},
    )
    lib = tmp_path / "lib"
    add_expert(
        lib,
        tmp_path / "e.patch",
        "math",
        "1.0",
        base=str(paths["v1"]),
        options=AddOptions(tags=["math"]),
    )
    args = [
        "experts",
        "rebase",
        "math@1.0",
        "-L",
        str(lib),
        "--onto",
        str(paths["v2"]),
        "--old-base",
        str(paths["v1"]),
        "--version",
        "2.0",
        "--json",
    ]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert (doc["version"], doc["tags"], doc["conflicts"]) == ("2.0", ["math"], ["layers.0.w"])
    new = find_expert(lib, "math@2.0")
    pinned = read_patch(new.patch_path)
    assert pinned.base == {n: tensor_sha256(v2[n]) for n in lora}  # pinned to v2
    assert {p.codec for p in pinned.payloads.values()} == {"lowrank"}
    got = _applied(new.patch_path, paths["v2"], tmp_path)
    for n in lora:  # TA keeps the LoRA update B·A; rank-2 re-encoding, float32 sums
        want = (v2[n].astype(np.float64) + target[n] - v1[n]).astype(np.float32)
        np.testing.assert_allclose(got[n], want, rtol=0, atol=1e-6)
    assert got["embed"].tobytes() == v2["embed"].tobytes()

"""Tensor-level three-way merges through real `git merge` and `potluck resolve`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import potluck
from conftest import Run, model, save_st
from test_vcs import commit


def _branches(repo: Path, git: Run, rng, ours_change: dict, theirs_change: dict):
    base = model(rng)
    save_st(repo / "m.safetensors", base)
    commit(git, "m.safetensors", "base")
    git("git", "switch", "-q", "-c", "theirs")
    theirs = dict(base, **theirs_change)
    save_st(repo / "m.safetensors", theirs)
    commit(git, "m.safetensors", "theirs")
    git("git", "switch", "-q", "main")
    ours = dict(base, **ours_change)
    save_st(repo / "m.safetensors", ours)
    commit(git, "m.safetensors", "ours")
    return base, ours, theirs


def test_one_sided_changes_merge_cleanly_and_exactly(repo: Path, git: Run, rng) -> None:
    base, ours, theirs = _branches(
        repo,
        git,
        rng,
        {"layers.0.w": np.full((64, 64), 1, np.float32)},
        {"layers.2.w": np.full((64, 64), 2, np.float32)},
    )
    git("git", "merge", "-q", "--no-edit", "theirs")
    got = potluck.load(str(repo / "m.safetensors"))
    want = dict(base, **{"layers.0.w": ours["layers.0.w"], "layers.2.w": theirs["layers.2.w"]})
    assert set(got) == set(want)
    for k in want:
        assert np.array_equal(got[k], want[k]), k
    assert git("git", "status", "--porcelain") == ""
    # the committed blob is what a fresh clean of the merged file gives
    assert git("git", "diff", "HEAD", "--stat") == ""


def test_structural_one_sided_change_rebuilds_header(repo: Path, git: Run, rng) -> None:
    base = model(rng)
    save_st(repo / "m.safetensors", base)
    commit(git, "m.safetensors", "base")
    git("git", "switch", "-q", "-c", "theirs")
    theirs = dict(base, extra=np.arange(5, dtype=np.float32))
    save_st(repo / "m.safetensors", theirs)
    commit(git, "m.safetensors", "theirs adds a tensor")
    git("git", "switch", "-q", "main")
    ours = dict(base, embed=base["embed"] * 2)
    save_st(repo / "m.safetensors", ours)
    commit(git, "m.safetensors", "ours")
    git("git", "merge", "-q", "--no-edit", "theirs")
    got = potluck.load(str(repo / "m.safetensors"))
    assert np.array_equal(got["extra"], theirs["extra"])
    assert np.array_equal(got["embed"], ours["embed"])
    assert git("git", "status", "--porcelain") == ""


def test_conflict_keeps_loadable_ours_and_resolve_finishes(repo: Path, git: Run, rng) -> None:
    _, ours, theirs = _branches(
        repo,
        git,
        rng,
        {"layers.0.w": np.full((64, 64), 1, np.float32), "layers.1.b": np.ones(64, np.float32)},
        {"layers.0.w": np.full((64, 64), 2, np.float32), "layers.2.b": np.ones(64, np.float32)},
    )
    out = git("git", "merge", "--no-edit", "theirs", check=False)
    assert "CONFLICT" in out
    text = (repo / "m.safetensors").read_bytes()
    assert not text.startswith(b"potluck manifest") and b"<<<<<<<" not in text
    got = potluck.load(str(repo / "m.safetensors"))
    assert np.array_equal(got["layers.0.w"], ours["layers.0.w"])  # conflict: ours kept
    assert np.array_equal(got["layers.2.b"], theirs["layers.2.b"])  # one-sided: merged
    st = git("potluck", "status", check=False)  # exits 1 while the conflict is unresolved
    assert "conflict: m.safetensors" in st and "layers.0.w" in st
    git("potluck", "resolve", "m.safetensors", "--take", "theirs")
    got = potluck.load(str(repo / "m.safetensors"))
    assert np.array_equal(got["layers.0.w"], theirs["layers.0.w"])
    assert np.array_equal(got["layers.1.b"], ours["layers.1.b"])
    git("git", "commit", "-q", "--no-edit")
    assert git("git", "status", "--porcelain") == ""
    assert "nothing to report" in git("potluck", "status")
    committed = potluck.load(str(repo / "m.safetensors"), rev="HEAD")
    assert np.array_equal(committed["layers.0.w"], theirs["layers.0.w"])


def test_resolve_without_conflict_is_a_clear_error(repo: Path, git: Run) -> None:
    err = git("potluck", "resolve", "m.safetensors", "--take", "ours", check=False)
    assert "has no tensor-level merge conflict" in err


@pytest.mark.parametrize("take", ["ours", "theirs"])
def test_resolve_by_pattern(repo: Path, git: Run, rng, take: str) -> None:
    _, ours, theirs = _branches(
        repo,
        git,
        rng,
        {
            "layers.0.w": np.full((64, 64), 1, np.float32),
            "layers.1.w": np.ones((64, 64), np.float32),
        },
        {
            "layers.0.w": np.full((64, 64), 2, np.float32),
            "layers.1.w": np.zeros((64, 64), np.float32),
        },
    )
    git("git", "merge", "--no-edit", "theirs", check=False)
    out = git("potluck", "resolve", "m.safetensors", "--take", take, "--tensors", "layers.0.*")
    assert "1 tensors still conflicted: layers.1.w" in out
    git("potluck", "resolve", "m.safetensors", "--take", "ours")
    got = potluck.load(str(repo / "m.safetensors"))
    side = ours if take == "ours" else theirs
    assert np.array_equal(got["layers.0.w"], side["layers.0.w"])
    assert np.array_equal(got["layers.1.w"], ours["layers.1.w"])


def test_configured_method_merges_both_sided_changes(repo: Path, git: Run, rng) -> None:
    import json

    rules = [
        {"path": "*.safetensors", "tensors": "embed", "method": "ours"},
        {
            "path": "*.safetensors",
            "tensors": "layers.*",
            "method": "task_arithmetic",
            "params": {"lambda_": 1.0},
        },
    ]
    (repo / ".potluck.json").write_text(json.dumps({"merge": rules}))
    commit(git, ".potluck.json", "merge rules")
    base = model(rng)
    d0, d1 = (
        rng.normal(size=(64, 64)).astype(np.float32),
        rng.normal(size=(64, 64)).astype(np.float32),
    )
    ours_t = dict(base, **{"layers.0.w": base["layers.0.w"] + d0, "embed": base["embed"] + 1})
    theirs_t = dict(
        base,
        **{
            "layers.0.w": base["layers.0.w"] + d1,
            "embed": base["embed"] - 1,
            "layers.2.b": np.ones(64, np.float32),
        },
    )
    save_st(repo / "m.safetensors", base)
    commit(git, "m.safetensors", "base")
    git("git", "switch", "-q", "-c", "theirs")
    save_st(repo / "m.safetensors", theirs_t)
    commit(git, "m.safetensors", "theirs")
    git("git", "switch", "-q", "main")
    save_st(repo / "m.safetensors", ours_t)
    commit(git, "m.safetensors", "ours")
    git("git", "merge", "-q", "--no-edit", "theirs")  # no conflict: the rules decide
    got = potluck.load(str(repo / "m.safetensors"), rev="HEAD")
    # task arithmetic relative to the merge base: base + (ours - base) + (theirs - base)
    want = (
        base["layers.0.w"].astype(np.float64)
        + (ours_t["layers.0.w"] - base["layers.0.w"])
        + (theirs_t["layers.0.w"] - base["layers.0.w"])
    ).astype(np.float32)
    np.testing.assert_allclose(got["layers.0.w"], want, rtol=0, atol=1e-6)
    assert np.array_equal(got["embed"], ours_t["embed"])  # rule: ours
    assert np.array_equal(got["layers.2.b"], theirs_t["layers.2.b"])  # one-sided: exact
    assert git("git", "status", "--porcelain") == ""


def test_bad_merge_rule_fails_clearly(repo: Path, git: Run, rng) -> None:
    import json

    (repo / ".potluck.json").write_text(json.dumps({"merge": [{"method": "tie"}]}))
    commit(git, ".potluck.json", "bad rule")
    _branches(
        repo,
        git,
        rng,
        {"layers.0.w": np.ones((64, 64), np.float32)},
        {"layers.0.w": np.zeros((64, 64), np.float32)},
    )
    out = git("git", "merge", "--no-edit", "theirs", check=False)
    assert "unknown merge method 'tie'" in out and "did you mean 'ties'" in out

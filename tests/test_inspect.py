"""ls, diff (command and git diff driver), log, du, gc — numbers checked against numpy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from conftest import Run, model, save_st
from test_vcs import commit, objects


def test_ls_worktree_and_revision(repo: Path, git: Run, rng) -> None:
    t = {"a": np.zeros((2, 3), np.float32), "b": np.zeros(5, np.int64)}
    save_st(repo / "m.safetensors", t)
    commit(git, "m.safetensors", "v1")
    rows = json.loads(git("potluck", "ls", "m.safetensors@HEAD", "--json"))
    assert rows == [
        {"name": "a", "dtype": "F32", "shape": [2, 3], "bytes": 24},
        {"name": "b", "dtype": "I64", "shape": [5], "bytes": 40},
    ]
    assert json.loads(git("potluck", "ls", "m.safetensors", "--json")) == rows


def test_diff_stats_match_numpy(repo: Path, git: Run, rng) -> None:
    t = model(rng)
    save_st(repo / "m.safetensors", t)
    commit(git, "m.safetensors", "v1")
    w = t["layers.1.w"].copy()
    w[0, :5] += 0.25
    t2 = dict(t, **{"layers.1.w": w, "new": np.ones(3, np.float32)})
    del t2["layers.2.b"]
    save_st(repo / "m.safetensors", t2)
    commit(git, "m.safetensors", "v2")
    out = json.loads(git("potluck", "diff", "HEAD~1", "HEAD", "--json"))
    assert len(out) == 1 and out[0]["path"] == "m.safetensors"
    ch = {c["name"]: c for c in out[0]["changes"]}
    assert ch["new"]["status"] == "added" and ch["layers.2.b"]["status"] == "removed"
    s = ch["layers.1.w"]["stats"]
    d = w.astype(np.float64) - t["layers.1.w"].astype(np.float64)
    assert np.isclose(s["l2"], np.linalg.norm(d), rtol=1e-12)
    assert np.isclose(
        s["rel"], np.linalg.norm(d) / np.linalg.norm(t["layers.1.w"].astype(np.float64)), rtol=1e-12
    )
    assert s["frac_changed"] == 5 / w.size
    assert np.isclose(s["max_abs"], np.abs(d).max(), rtol=1e-12)
    assert out[0]["unchanged"] == len(t) - 2


def test_git_diff_uses_tensor_driver(repo: Path, git: Run, rng) -> None:
    t = model(rng)
    save_st(repo / "m.safetensors", t)
    commit(git, "m.safetensors", "v1")
    save_st(repo / "m.safetensors", dict(t, embed=t["embed"] + 1))
    out = git("git", "diff")  # work tree vs index: the driver reads the checkpoint itself
    assert "changed  embed  F32[256,64]" in out and "changed=100.00%" in out
    commit(git, "m.safetensors", "v2")
    out = git("git", "log", "-p", "--ext-diff", "-1")
    assert "changed  embed  F32[256,64]" in out
    out = git("git", "log", "-p", "-1")  # textconv: one line per tensor
    assert "-embed  F32[256,64]  " in out and "+embed  F32[256,64]  " in out
    assert "-layers.0.w" not in out and "+layers.0.w" not in out


def test_log_and_du(repo: Path, git: Run, rng) -> None:
    t = model(rng)
    data = save_st(repo / "m.safetensors", t)
    commit(git, "m.safetensors", "first")
    save_st(repo / "m.safetensors", dict(t, embed=t["embed"] + 1))
    commit(git, "m.safetensors", "second")
    rows = json.loads(git("potluck", "log", "m.safetensors", "--json"))
    assert [r["subject"] for r in rows] == ["second", "first"]
    assert rows[0]["counts"]["changed"] == 1 and rows[1]["counts"]["added"] == len(t)
    du = json.loads(git("potluck", "du", "--json"))
    assert du["files"][0]["versions"] == 2 and du["logical"] == 2 * len(data)
    stored = sum(p.stat().st_size for p in objects(repo))
    assert du["stored"] == stored


def test_gc_keeps_reachable_and_drops_unreachable(repo: Path, git: Run, rng) -> None:
    t = model(rng)
    data = save_st(repo / "m.safetensors", t)
    commit(git, "m.safetensors", "v1")
    save_st(repo / "m.safetensors", dict(t, embed=t["embed"] + 7))
    git("git", "add", "m.safetensors")  # staged: the index keeps it alive
    git("git", "reset", "-q", "--hard")
    # the staged-then-dropped version is unreachable now
    git("git", "reflog", "expire", "--expire=now", "--all")
    rep = json.loads(git("potluck", "gc", "--json"))  # younger than the grace period: kept
    assert (rep["removed"], rep["recent"]) == (0, 1)
    rep = json.loads(git("potluck", "gc", "--prune=now", "--json"))
    assert (rep["removed"], rep["recent"]) == (1, 0)
    assert "ok" in git("potluck", "fsck")
    (repo / "m.safetensors").unlink()
    git("git", "checkout", "--", "m.safetensors")
    assert (repo / "m.safetensors").read_bytes() == data


def test_diff_limits_to_paths_and_worktree(repo: Path, git: Run, rng) -> None:
    t = model(rng)
    save_st(repo / "a.safetensors", t)
    save_st(repo / "b.safetensors", t)
    commit(git, ".", "v1")
    save_st(repo / "a.safetensors", dict(t, embed=t["embed"] * 2))
    save_st(repo / "b.safetensors", dict(t, embed=t["embed"] * 3))
    both = json.loads(git("potluck", "diff", "--json"))  # index vs work tree
    assert [d["path"] for d in both] == ["a.safetensors", "b.safetensors"]
    only_b = json.loads(git("potluck", "diff", "--json", "HEAD", "--", "b.safetensors"))
    assert [d["path"] for d in only_b] == ["b.safetensors"]
    assert np.isclose(only_b[0]["changes"][0]["stats"]["rel"], 2.0, rtol=1e-6)


def test_status_reports_files_left_as_manifests(repo: Path, git: Run, rng, tmp_path: Path) -> None:
    from conftest import run_in

    save_st(repo / "m.safetensors", model(rng))
    commit(git, "m.safetensors", "v1")
    clone = tmp_path / "clone"
    run_in(tmp_path)("git", "clone", "-q", str(repo), str(clone))  # no potluck objects travel
    c = run_in(clone)
    assert (clone / "m.safetensors").read_bytes().startswith(b"potluck manifest v1\n")
    c("potluck", "init")
    st = json.loads(c("potluck", "status", "--json"))
    n_objects = len(
        set(
            json.loads(line)["oid"] if "oid" in line else json.loads(line)["raw"]
            for line in (clone / "m.safetensors").read_text().splitlines()[2:]
        )
    )
    assert st["not_materialized"] == [
        {"path": "m.safetensors", "missing_objects": n_objects, "tensors": 7, "tensors_missing": 7}
    ]
    placeholder = (clone / "m.safetensors").read_bytes()
    (clone / "m.safetensors").unlink()
    # the origin repository has no objects to give: the file is left as its manifest
    err = c("git", "checkout", "--", "m.safetensors", check=False)
    assert "m.safetensors left as a manifest: " in err and "potluck pull" in err
    assert (clone / "m.safetensors").read_bytes() == placeholder


def test_ls_lists_views_and_compressed_npz_members(repo: Path, git: Run, rng) -> None:
    np.savez_compressed(repo / "c.npz", a=np.arange(6, dtype=np.int32).reshape(2, 3))
    commit(git, "c.npz", "compressed")
    rows = json.loads(git("potluck", "ls", "c.npz@HEAD", "--json"))
    assert rows == [
        {
            "name": "a",
            "dtype": "I32",
            "shape": [2, 3],
            "bytes": 0,
            "note": "compressed member, stored whole",
        }
    ]
    assert np.array_equal(np.load(repo / "c.npz")["a"], np.arange(6).reshape(2, 3))

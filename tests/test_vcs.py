"""End-to-end version control through real git: add, commit, checkout and history operations."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

import potluck
from conftest import Run, model, run_in, save_st
from potluck.objects.manifest import is_manifest, parse


def objects(repo: Path) -> list[Path]:
    root = repo / ".git" / "potluck" / "objects"
    return sorted(p for p in root.rglob("*") if p.is_file() and p.parent.name != "tmp")


def commit(git: Run, path: str, msg: str) -> str:
    git("git", "add", path)
    git("git", "commit", "-q", "-m", msg)
    return git("git", "rev-parse", "HEAD").strip()


def test_add_stores_manifest_and_checkout_is_byte_exact(repo: Path, git: Run, rng) -> None:
    t = model(rng)
    data = save_st(repo / "m.safetensors", t, {"author": "me"})
    c1 = commit(git, "m.safetensors", "v1")
    blob = git("git", "cat-file", "-p", ":m.safetensors").encode()
    m = parse(blob)
    assert m.format == "safetensors" and m.size == len(data)
    assert {e.name for e in m.tensors().values()} == set(t)
    assert m.metadata == {"author": "me"}
    (repo / "m.safetensors").unlink()
    git("git", "checkout", "--", "m.safetensors")
    assert (repo / "m.safetensors").read_bytes() == data
    assert git("git", "status", "--porcelain") == ""
    t2 = dict(t, **{"layers.0.w": t["layers.0.w"] + 1})
    save_st(repo / "m.safetensors", t2)
    commit(git, "m.safetensors", "v2")
    git("git", "checkout", "-q", c1)
    assert (repo / "m.safetensors").read_bytes() == data
    assert git("git", "status", "--porcelain") == ""


def test_unchanged_tensors_stored_once_across_versions_and_files(repo: Path, git: Run, rng) -> None:
    t = model(rng, n_layers=4)
    save_st(repo / "a.safetensors", t)
    commit(git, "a.safetensors", "a")
    n1 = len(objects(repo))
    save_st(repo / "b.safetensors", t)  # same tensors, other file: no new tensor objects
    commit(git, "b.safetensors", "b")
    assert len(objects(repo)) == n1
    t["layers.2.w"] = t["layers.2.w"] * 2
    save_st(repo / "a.safetensors", t)
    commit(git, "a.safetensors", "a2")
    assert len(objects(repo)) == n1 + 1  # only the changed tensor (header unchanged)


def test_clean_is_idempotent(repo: Path, git: Run, rng) -> None:
    data = save_st(repo / "m.safetensors", model(rng))
    out1 = git("git", "hash-object", "--path=m.safetensors", "m.safetensors")
    manifest = git("potluck", "clean", "m.safetensors", input=data)
    # cleaning a manifest again gives the same manifest
    again = run_in(repo)("potluck", "clean", "m.safetensors", input=manifest.encode())
    assert again == manifest
    assert (
        out1.strip() == hashlib.sha1(b"blob %d\0" % len(manifest) + manifest.encode()).hexdigest()
    )


@pytest.mark.parametrize("op", ["switch", "reset", "stash", "cherry-pick", "rebase"])
def test_history_operations(repo: Path, git: Run, rng, op: str) -> None:
    t = model(rng)
    v1 = save_st(repo / "m.safetensors", t)
    c1 = commit(git, "m.safetensors", "v1")
    git("git", "switch", "-q", "-c", "side")
    t_side = dict(t, embed=t["embed"] + 0.5)
    v_side = save_st(repo / "m.safetensors", t_side)
    c_side = commit(git, "m.safetensors", "side")
    git("git", "switch", "-q", "main")
    assert (repo / "m.safetensors").read_bytes() == v1
    if op == "switch":
        git("git", "switch", "-q", "side")
        assert (repo / "m.safetensors").read_bytes() == v_side
    elif op == "reset":
        git("git", "reset", "-q", "--hard", c_side)
        assert (repo / "m.safetensors").read_bytes() == v_side
        git("git", "reset", "-q", "--hard", c1)
        assert (repo / "m.safetensors").read_bytes() == v1
    elif op == "stash":
        save_st(repo / "m.safetensors", dict(t, embed=t["embed"] * 3))
        wip = (repo / "m.safetensors").read_bytes()
        git("git", "stash", "-q")
        assert (repo / "m.safetensors").read_bytes() == v1
        git("git", "stash", "pop", "-q")
        assert (repo / "m.safetensors").read_bytes() == wip
        assert git("git", "status", "--porcelain") == " M m.safetensors\n"
        git("git", "checkout", "--", "m.safetensors")
    elif op == "cherry-pick":
        git("git", "cherry-pick", c_side)
        assert (repo / "m.safetensors").read_bytes() == v_side
    elif op == "rebase":
        (repo / "notes.txt").write_text("x")
        commit(git, "notes.txt", "notes")
        git("git", "switch", "-q", "side")
        git("git", "rebase", "-q", "main")
        assert (repo / "m.safetensors").read_bytes() == v_side
        assert (repo / "notes.txt").read_text() == "x"
    assert git("git", "status", "--porcelain") == ""


def test_load_api_revisions_and_names(repo: Path, git: Run, rng) -> None:
    t = model(rng)
    save_st(repo / "m.safetensors", t)
    c1 = commit(git, "m.safetensors", "v1")
    t2 = dict(t, embed=t["embed"] - 1)
    save_st(repo / "m.safetensors", t2)
    commit(git, "m.safetensors", "v2")
    old = potluck.load(str(repo / "m.safetensors"), rev=c1, names=["embed"])
    assert list(old) == ["embed"] and np.array_equal(old["embed"], t["embed"])
    cur = potluck.load(str(repo / "m.safetensors"))
    assert set(cur) == set(t2) and all(np.array_equal(cur[k], t2[k]) for k in t2)
    with pytest.raises(potluck.UserError, match="no tensor named 'nope'"):
        potluck.load(str(repo / "m.safetensors"), rev="HEAD", names=["nope"])


def test_torch_and_npz_round_trip_through_git(repo: Path, git: Run, rng) -> None:
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    sd = {"w": torch.randn(8, 4), "b": torch.zeros(4, dtype=torch.bfloat16), "step": 7}
    sd["tied"] = sd["w"]
    torch.save(sd, repo / "ckpt.pt")
    np.savez(repo / "arr.npz", a=np.arange(10.0), b=rng.normal(size=(3, 3)).astype(np.float16))
    pt, npz = (repo / "ckpt.pt").read_bytes(), (repo / "arr.npz").read_bytes()
    git("git", "add", "ckpt.pt", "arr.npz")
    git("git", "commit", "-q", "-m", "c")
    assert is_manifest(git("git", "cat-file", "-p", ":ckpt.pt").encode())
    (repo / "ckpt.pt").unlink()
    (repo / "arr.npz").unlink()
    git("git", "checkout", "--", ".")
    assert (repo / "ckpt.pt").read_bytes() == pt
    assert (repo / "arr.npz").read_bytes() == npz
    loaded = potluck.load(str(repo / "ckpt.pt"), rev="HEAD")
    assert np.array_equal(loaded["w"], sd["w"].numpy())
    assert np.array_equal(loaded["tied"], sd["w"].numpy())


def test_status_after_checkout_does_not_reread_checkpoint(repo: Path, git: Run, rng) -> None:
    import os
    import subprocess
    import time

    t = model(rng)
    save_st(repo / "m.safetensors", t)
    c1 = commit(git, "m.safetensors", "v1")
    save_st(repo / "m.safetensors", dict(t, embed=t["embed"] + 1))
    commit(git, "m.safetensors", "v2")
    git("git", "checkout", "-q", c1)

    def traced_status() -> tuple[str, str]:
        r = subprocess.run(
            ["git", "status", "--porcelain"],
            cwd=repo,
            capture_output=True,
            text=True,
            env=dict(os.environ, GIT_TRACE="1"),
        )
        return r.stdout, r.stderr

    # git without USE_NSEC re-checks files written in the same second as the index ("racily
    # clean"); the first status refreshes the index, after which nothing is re-read.
    time.sleep(1.1)
    out, _ = traced_status()
    assert out == ""
    out, trace = traced_status()
    assert out == "" and "filter-process" not in trace
    os.utime(repo / "m.safetensors")  # touch: git must look, and still finds no change
    time.sleep(1.1)
    out, trace = traced_status()
    assert out == "" and "filter-process" in trace
    out, trace = traced_status()  # the index was refreshed: no re-read the second time
    assert out == "" and "filter-process" not in trace


def test_init_is_idempotent_and_uses_this_installation(repo: Path, git: Run) -> None:
    import sys

    assert "already configured" in git("potluck", "init")
    proc = git("git", "config", "filter.potluck.process").strip()
    assert proc == f"{Path(sys.executable).parent / 'git-potluck'} filter-process"


def test_hf_sharded_directory_dedups_across_shards(repo: Path, git: Run, rng) -> None:
    import json as _json

    shared = rng.normal(size=(128, 128)).astype(np.float32)
    d = repo / "model"
    d.mkdir()
    s1 = save_st(d / "model-00001-of-00002.safetensors", {"a": shared, "b": np.ones(3, np.float32)})
    s2 = save_st(d / "model-00002-of-00002.safetensors", {"tied": shared.copy()})
    index = {
        "metadata": {"total_size": 2 * shared.nbytes + 12},
        "weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00001-of-00002.safetensors",
            "tied": "model-00002-of-00002.safetensors",
        },
    }
    (d / "model.safetensors.index.json").write_text(_json.dumps(index))
    before = len(objects(repo))
    commit(git, "model", "sharded")
    # 2 headers + a + b; `tied` is the same bytes as `a` and is stored once
    assert len(objects(repo)) - before == 4
    import shutil

    shutil.rmtree(d)
    git("git", "checkout", "--", "model")
    assert (d / "model-00001-of-00002.safetensors").read_bytes() == s1
    assert (d / "model-00002-of-00002.safetensors").read_bytes() == s2
    assert _json.loads((d / "model.safetensors.index.json").read_text()) == index

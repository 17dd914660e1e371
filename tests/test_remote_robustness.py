"""Remote paths that go wrong, end to end with real git: an LFS server whose downloads redirect
in a loop (issue 14 item 14), a disk that fills up during ``potluck clone`` (item 16, on a real
tmpfs), and the partial-clone selection (issue 15 item 1)."""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from conftest import Run, model, run_in, save_st
from potluck.objects.manifest import is_manifest, parse
from test_sync import FILE, commit_model, sha
from test_sync_servers import use_lfs
from testsupport.servers import LfsServer, lfs, lfs_server  # noqa: F401


def is_placeholder(path: Path) -> bool:
    return is_manifest(path.read_bytes()[:64])


# -- item 14: a redirect loop --------------------------------------------------------------------


def test_lfs_redirect_loop_is_a_clear_error_and_checkout_keeps_the_manifest(
    repo: Path,
    git: Run,
    hub: Path,
    lfs: LfsServer,  # noqa: F811
    rng: np.random.Generator,
    tmp_path: Path,
) -> None:
    use_lfs(git, repo, lfs)
    m1 = model(rng)
    commit_model(git, repo, m1, "v1")
    git("git", "push", "-q", "origin", "main")
    clone = tmp_path / "clone"
    run_in(tmp_path)("potluck", "clone", str(hub), str(clone))
    c = run_in(clone)
    # a user with credentials in the URL: they must never be printed
    port = lfs.base.rsplit(":", 1)[1]
    c("git", "config", "lfs.url", lfs.url.replace("127.0.0.1", "user:s3cret@127.0.0.1"))
    m2 = dict(m1, embed=rng.normal(0, 0.02, m1["embed"].shape).astype(np.float32))
    commit_model(git, repo, m2, "v2")
    git("git", "push", "-q", "origin", "main")
    lfs.redirect_loop = True
    r = subprocess.run(["git", "pull", "-q", "--ff-only"], cwd=clone, capture_output=True)
    out = r.stderr.decode()
    assert r.returncode == 0, out
    assert f"http://127.0.0.1:{port}/" in out and "redirects more than 10 times" in out
    assert is_placeholder(clone / FILE)  # v2's manifest, never a deleted or broken file
    assert parse((clone / FILE).read_bytes()) == parse(
        git("git", "cat-file", "blob", f"HEAD:{FILE}").encode()
    )
    r = subprocess.run(["potluck", "pull"], cwd=clone, capture_output=True)
    err = r.stderr.decode()
    assert r.returncode == 1
    assert err.startswith("potluck: error: http://127.0.0.1:")
    assert "redirects more than 10 times (a redirect loop?)" in err
    assert "Traceback" not in err and "s3cret" not in err + out
    lfs.redirect_loop = False
    c("potluck", "pull")
    assert sha(clone / FILE) == sha(repo / FILE)
    assert c("git", "status", "--porcelain") == ""


# -- item 16: the disk fills up during a clone ---------------------------------------------------


@contextlib.contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of ``size`` at ``where`` (skips where mounting is not allowed)."""
    where.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def big_model(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """1.5 MiB of incompressible weights."""
    return {f"w{i}": rng.normal(0, 0.02, (256, 256)).astype(np.float32) for i in range(6)}


def test_clone_onto_a_full_disk_fails_cleanly_and_pull_resumes(
    repo: Path, git: Run, hub: Path, rng: np.random.Generator, tmp_path: Path
) -> None:
    commit_model(git, repo, big_model(rng), "v1")
    git("git", "push", "-q", "origin", "main")
    with tmpfs(tmp_path / "small", "1m") as small:  # less than the 1.5 MiB of objects
        clone = small / "clone"
        r = subprocess.run(["potluck", "clone", str(hub), str(clone)], capture_output=True)
        err = r.stderr.decode()
        assert r.returncode == 1, err
        assert f"not enough disk space to check out {FILE}" in err
        assert f"cloned into {clone}, but 1 file(s) could not be fetched" in err
        assert f"run `potluck pull` in {clone}" in err
        assert "Traceback" not in err
        c = run_in(clone)
        assert c("git", "symbolic-ref", "--short", "HEAD") == "main\n"
        assert c("git", "status", "--porcelain") == ""  # a consistent checkout
        assert is_placeholder(clone / FILE)
        assert list((clone / ".git").rglob("*.part")) == []
        # a pull on the same full disk: the download itself runs out of space
        r = subprocess.run(["potluck", "pull"], cwd=clone, capture_output=True)
        assert r.returncode == 1
        assert (
            "potluck: error: no space left while fetching the objects of HEAD: "
            "No space left on device"
        ) in r.stderr.decode()
        assert "Traceback" not in r.stderr.decode()
        assert is_placeholder(clone / FILE)
        # room is made: the one documented command finishes the clone
        subprocess.run(["mount", "-o", "remount,size=16m", str(small)], check=True)
        c("potluck", "pull")
        assert sha(clone / FILE) == sha(repo / FILE)
        assert c("git", "status", "--porcelain") == ""
        assert list((clone / ".git").rglob("*.part")) == []


# -- issue 15 item 1: the selection of a partial clone --------------------------------------------


def test_partial_clone_selection_hints_and_pull_include_all_clears_it(
    repo: Path, git: Run, hub: Path, rng: np.random.Generator, tmp_path: Path
) -> None:
    m1 = model(rng)
    commit_model(git, repo, m1, "v1")
    git("git", "push", "-q", "origin", "main")
    part = tmp_path / "part"
    out = run_in(tmp_path)(
        "potluck", "clone", "--include", "embed", str(hub), str(part), check=False
    )
    hint = (
        "`potluck pull --include '*'` fetches every tensor and checks the files out (the "
        "selection potluck.fetchInclude=embed leaves the others out; that command clears it)"
    )
    assert hint in out  # the checkout's warning names the exact command
    p = run_in(part)
    assert p("potluck", "status").endswith(f"  {hint}\n")
    out = p("potluck", "pull")
    assert f"left as a manifest (tensors not selected): {FILE}\npotluck: {hint}\n" in out
    out = p("potluck", "pull", "--include", "*")
    assert "checkouts and pulls fetch every tensor from now on" in out
    assert sha(part / FILE) == sha(repo / FILE)
    assert p("git", "config", "--get", "potluck.fetchInclude", check=False) == ""
    # a later change of a tensor that was not selected arrives whole with `git pull`
    m2 = dict(m1, **{"layers.2.w": rng.normal(0, 0.02, (64, 64)).astype(np.float32)})
    commit_model(git, repo, m2, "v2")
    git("git", "push", "-q", "origin", "main")
    p("git", "pull", "-q", "--ff-only")
    assert sha(part / FILE) == sha(repo / FILE)
    assert json.loads(p("potluck", "status", "--json"))["not_materialized"] == []


def test_pull_include_narrows_the_kept_selection(
    repo: Path, git: Run, hub: Path, rng: np.random.Generator, tmp_path: Path
) -> None:
    m1 = model(rng)
    commit_model(git, repo, m1, "v1")
    git("git", "push", "-q", "origin", "main")
    part = tmp_path / "part"
    run_in(tmp_path)("potluck", "clone", "--no-data", str(hub), str(part))
    p = run_in(part)
    out = p("potluck", "pull", "--include", "layers.*", "--exclude", "*.b")
    assert "fetch from now on: --include 'layers.*' --exclude '*.b'" in out
    assert p("git", "config", "potluck.fetchInclude") == "layers.*\n"
    assert p("git", "config", "potluck.fetchExclude") == "*.b\n"
    assert p("git", "config", "--get", "potluck.fetchOnCheckout", check=False) == ""
    assert is_placeholder(part / FILE)
    p("potluck", "pull", "--include", "*", "--exclude", "nothing")
    save_st(tmp_path / "want.safetensors", m1)
    assert sha(part / FILE) == sha(tmp_path / "want.safetensors")

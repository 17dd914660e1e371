"""Fault injection on the remote paths (issue 14): real ``git push`` / ``potluck clone`` against
an LFS server (giftless on loopback) and an fsspec store (``faulty://``, testsupport/faultyfs.py)
that drop connections, cut bodies short, answer 5xx, reorder batch answers and go slow.

The invariant, checked after every run: what git says is pushed (the remote's branches) clones
byte-identically; a push or clone that fails says so clearly (no traceback), moves no branch
past its objects and loses nothing (a rerun without faults completes)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from conftest import Run, model, save_st
from test_sync import FILE
from test_sync_servers import use_lfs
from testsupport.faultyfs import fault_env
from testsupport.servers import LfsServer, lfs, lfs_server  # noqa: F401

Env = dict[str, str]


def runner(cwd: Path) -> Callable[..., subprocess.CompletedProcess[bytes]]:
    def run(*args: str, env: Env) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(args, cwd=cwd, capture_output=True, env=env)

    return run


def versions(rng: np.random.Generator, n: int) -> list[dict[str, np.ndarray]]:
    """A model and ``n - 1`` sparse edits of it (deltas travel encoded, with base chains)."""
    out = [model(rng, d=96)]
    for _ in range(n - 1):
        m = {k: v.copy() for k, v in out[-1].items()}
        flat = m["embed"].reshape(-1)
        idx = rng.choice(flat.size, flat.size // 50, replace=False)
        flat[idx] = rng.normal(0, 0.02, idx.size).astype(np.float32)
        out.append(m)
    return out


def clear_failure(r: subprocess.CompletedProcess[bytes]) -> str:
    """The stderr of a failed run, checked to be a message, not a traceback."""
    err = r.stderr.decode()
    assert r.returncode != 0
    assert "Traceback" not in err and "potluck: error:" in err, err
    return err


def check_pushed(hub: Path, expected: dict[str, bytes], tmp: Path, name: str) -> None:
    """The invariant: the branch git says is pushed clones (without faults) byte-identically."""
    head = (
        subprocess.run(["git", "rev-parse", "--verify", "-q", "main"], cwd=hub, capture_output=True)
        .stdout.decode()
        .strip()
    )
    if not head:
        return  # nothing pushed yet
    clone = tmp / name
    r = runner(tmp)("potluck", "clone", str(hub), str(clone), env=fault_env(None))
    assert r.returncode == 0, r.stderr.decode()
    assert (clone / FILE).read_bytes() == expected[head]


def push_clone_cycle(
    git: Run, repo: Path, hub: Path, tmp: Path, rng: np.random.Generator,
    faults: Callable[[bool], Env], n_versions: int = 3,
) -> None:  # fmt: skip
    """Commit and push each version under faults, checking the invariant after each push;
    then clone under faults. A failed push is retried calmly and must then succeed.
    ``faults(on)`` switches the faults on or off and gives the environment for the run."""
    expected: dict[str, bytes] = {}
    g = runner(repo)
    for i, m in enumerate(versions(rng, n_versions)):
        expected_bytes = save_st(repo / FILE, m)
        git("git", "add", FILE)
        git("git", "commit", "-q", "-m", f"v{i}")
        expected[git("git", "rev-parse", "HEAD").strip()] = expected_bytes
        before = runner(hub)("git", "rev-parse", "-q", "--verify", "main", env=faults(False))
        r = g("git", "push", "origin", "main", env=faults(True))
        calm = faults(False)
        if r.returncode != 0:
            clear_failure(r)
            after = runner(hub)("git", "rev-parse", "-q", "--verify", "main", env=calm)
            assert after.stdout == before.stdout  # the branch did not move past its objects
        check_pushed(hub, expected, tmp, f"check{i}")
        if r.returncode != 0:
            r = g("git", "push", "origin", "main", env=calm)
            assert r.returncode == 0, r.stderr.decode()
            check_pushed(hub, expected, tmp, f"recheck{i}")
    clone = tmp / "faulty-clone"
    r = runner(tmp)("potluck", "clone", str(hub), str(clone), env=faults(True))
    calm = faults(False)
    if r.returncode != 0:
        clear_failure(r)
        r = runner(clone)("potluck", "pull", env=calm)
        assert r.returncode == 0, r.stderr.decode()
    assert (clone / FILE).read_bytes() == expected[git("git", "rev-parse", "HEAD").strip()]
    assert runner(clone)("git", "status", "--porcelain", env=calm).stdout == b""


def use_faulty_store(git: Run, repo: Path, store: Path) -> None:
    (repo / ".lfsconfig").write_text(f'[lfs]\n\turl = "faulty://{store}"\n')
    git("git", "add", ".lfsconfig")
    git("git", "commit", "-q", "-m", "object store")


@pytest.mark.parametrize("seed", [1])
def test_fsspec_store_faults_keep_the_invariant(
    repo: Path, git: Run, hub: Path, rng: np.random.Generator, tmp_path: Path, seed: int
) -> None:
    use_faulty_store(git, repo, tmp_path / "store")
    log = tmp_path / "faults.log"
    push_clone_cycle(
        git, repo, hub, tmp_path, rng, lambda on: fault_env(seed if on else None, 0.2, 0, log), 1
    )  # fmt: skip
    assert len(log.read_text().splitlines()) >= 2  # faults were injected


@pytest.mark.parametrize("seed", [1])
def test_lfs_server_faults_keep_the_invariant(
    repo: Path,
    git: Run,
    hub: Path,
    lfs: LfsServer,  # noqa: F811
    rng: np.random.Generator,
    tmp_path: Path,
    seed: int,
) -> None:
    use_lfs(git, repo, lfs)
    lfs.serve_ranges = True

    def faults(on: bool) -> Env:
        lfs.chaos(seed if on else None, 0.2, 0.002)
        return fault_env(None)

    push_clone_cycle(git, repo, hub, tmp_path, rng, faults, 2)
    assert len([r for r in lfs.requests if r[2] >= 500]) >= 3  # faults were injected


@pytest.mark.heavy
@pytest.mark.parametrize("seed", range(2, 5))
@pytest.mark.parametrize("rate", [0.3, 0.6])
def test_fsspec_store_heavy_faults_keep_the_invariant(
    repo: Path,
    git: Run,
    hub: Path,
    rng: np.random.Generator,
    tmp_path: Path,
    seed: int,
    rate: float,
) -> None:
    use_faulty_store(git, repo, tmp_path / "store")
    push_clone_cycle(
        git, repo, hub, tmp_path, rng, lambda on: fault_env(seed if on else None, rate), 4
    )  # fmt: skip


@pytest.mark.heavy
@pytest.mark.parametrize("seed", range(2, 4))
def test_lfs_server_heavy_faults_keep_the_invariant(
    repo: Path,
    git: Run,
    hub: Path,
    lfs: LfsServer,  # noqa: F811
    rng: np.random.Generator,
    tmp_path: Path,
    seed: int,
) -> None:
    use_lfs(git, repo, lfs)

    def faults(on: bool) -> Env:
        lfs.chaos(seed if on else None, 0.5, 0.002)
        return fault_env(None)

    push_clone_cycle(git, repo, hub, tmp_path, rng, faults, 4)

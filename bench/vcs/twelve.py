"""Checkout of an older version: twelve random fp32 matrices, one of them changed (issue 19).

v1 holds twelve N(0, 0.02) float32 matrices of 1536 x 4096 (302 MB; ``--rows`` scales them),
v2 changes one of them; each tool adds and commits both, then checks out v1 (the previous
commit) and main again. With potluck, the v1 checkout is run once more under cProfile (the
filter process: ``git-potluck filter-process`` started by ``python -m cProfile``) and the
profile of its main thread is summarised by where the time goes: waiting for the decode
workers (chunks decode on a thread pool, which cProfile does not see), handing chunks to the
hash thread, writing pkt-lines to git, reading from git (waiting on it).
Run: ``python -m bench.vcs.twelve [--rows 1536] [--tools potluck,git-lfs]``.
"""

from __future__ import annotations

import argparse
import os
import pstats
import shutil
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from bench.common.checkpoints import CKPT, MB, file_sha256
from bench.common.measure import CommandError, fmt, render_table, scratch
from bench.common.paths import POTLUCK_BIN
from bench.common.tools import TOOLS, Repo, StepResult

N_MATRICES = 12
COLS = 4096
#: profile rows: (label, substrings of "file:function" whose cumulative time counts)
BUCKETS = [
    ("start-up imports", ("<frozen importlib._bootstrap>:_find_and_load",)),
    ("decode in this thread", ("encoding.py:_decode_chunk",)),
    ("wait for decode workers", ("_base.py:result",)),
    ("hash hand-off and check", ("odb.py:update", "odb.py:hexdigest")),
    ("write pkt-lines to git", ("pktline.py:write_packet", "pktline.py:write")),
    ("read from git", ("pktline.py:read_packet",)),
]


def build(out: Path, rows: int) -> list[Path]:
    rng = np.random.default_rng(12)
    sd = {
        f"m{i:02d}": rng.standard_normal((rows, COLS), dtype=np.float32) * np.float32(0.02)
        for i in range(N_MATRICES)
    }
    v1 = out / "v1.safetensors"
    save_file(sd, str(v1))
    sd["m05"] = sd["m05"] + rng.standard_normal((rows, COLS), dtype=np.float32) * np.float32(1e-3)
    v2 = out / "v2.safetensors"
    save_file(sd, str(v2))
    return [v1, v2]


def run_tool(name: str, versions: list[Path], args: argparse.Namespace) -> list[StepResult]:
    steps: list[StepResult] = []
    with scratch(f"twelve-{name}-", args.workdir, keep=False) as root:
        repo = Repo(TOOLS[name], root, args.threads, args.timeout)
        if name == "potluck" and args.potluck_src is not None:
            repo.env["PYTHONPATH"] = str(args.potluck_src)  # before/after comparisons
        repo.setup()
        ckpt = repo.path / CKPT
        for n, path in enumerate(versions, 1):
            shutil.copyfile(path, ckpt)
            step, _ = repo.measure(
                f"add v{n}", [["git", "add", CKPT], ["git", "commit", "-qm", "v"]]
            )
            steps.append(step)
        checks = [
            ("checkout v1 (previous)", "HEAD~1", versions[0]),
            ("checkout back", "main", versions[1]),
        ]
        for label, rev, want in checks:
            step, _ = repo.measure(label, [["git", "checkout", "-q", rev]])
            step.ok = file_sha256(ckpt) == file_sha256(want)
            steps.append(step)
        if name == "potluck" and args.profile:
            profile_checkout(repo, root / "filter.prof")
            print(summarise(root / "filter.prof"))
    return steps


def profile_checkout(repo: Repo, out: Path) -> None:
    """Check out v1 again with the filter process under cProfile."""
    filt = f"{sys.executable} -m cProfile -o {out} {POTLUCK_BIN / 'git-potluck'} filter-process"
    repo.check(["git", "config", "filter.potluck.process", filt])
    (repo.path / CKPT).unlink()
    repo.check(["git", "checkout", "-q", "HEAD~1", "--", CKPT])


def summarise(prof: Path) -> str:
    stats = pstats.Stats(str(prof))
    raw = stats.stats  # type: ignore[attr-defined]
    total = max(ct for (_, _, _), (_, _, _, ct, _) in raw.items())
    rows = []
    for label, keys in BUCKETS:
        secs = 0.0
        for (file, _line, func), (_cc, _nc, _tt, ct, _callers) in raw.items():
            where = f"{os.path.basename(file) if file.startswith('/') else file}:{func}"
            if any(k in where for k in keys):
                secs += ct
        rows.append([label, fmt(secs, ".2f"), fmt(100 * secs / total, ".0f")])
    rows.append(["filter process total", fmt(total, ".2f"), "100"])
    return render_table(rows, [["where (cProfile, cumulative)", "s", "%"]])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1536, help="rows of each matrix (1536: 302 MB)")
    ap.add_argument("--tools", default="potluck,git-lfs")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--no-profile", dest="profile", action="store_false")
    ap.add_argument(
        "--potluck-src",
        type=Path,
        help="run potluck from this source tree (PYTHONPATH; e.g. a `git archive` of a commit's "
        "src/), as bench.remote --potluck-src",
    )
    args = ap.parse_args()
    print(f"# load: {os.getloadavg()}")
    with scratch("twelve-ckpt-", args.workdir, keep=False) as tmp:
        versions = build(tmp, args.rows)
        size = versions[0].stat().st_size
        results = {}
        for name in args.tools.split(","):
            try:
                results[name] = run_tool(name, versions, args)
            except CommandError as exc:
                print(f"{name}: {exc}")
    labels = [s.step for s in next(iter(results.values()))] if results else []
    rows = []
    for i, label in enumerate(labels):
        row = [label]
        for steps in results.values():
            s = steps[i]
            row += [fmt(s.wall_s, ".2f") + ("" if s.ok else "!"), fmt(s.cpu_s, ".2f")]
        if {"potluck", "git-lfs"} <= results.keys():
            row.append(fmt(results["potluck"][i].wall_s / results["git-lfs"][i].wall_s, ".2f"))
        rows.append(row)
    top = ["step", *[c for n in results for c in (n, "")], "potluck/lfs"]
    sub = ["", *["wall s", "CPU s"] * len(results), "wall"]
    if len(results) < 2:
        top, sub = top[:-1], sub[:-1]
    print(f"checkpoint {size / MB:.0f} MB, {N_MATRICES} matrices of {args.rows}x{COLS} fp32")
    print(render_table(rows, [top, sub]))


if __name__ == "__main__":
    main()

"""Benchmark potluck against git-lfs and git-theta on a GPT-2-shaped checkpoint history.

One command builds the checkpoints, replays the same five-commit history with every
tool in a fresh temporary repository, times checkout and status, and prints a table
per dtype plus the potluck targets. See bench/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from bench.common.checkpoints import (
    CKPT,
    MB,
    SIZES,
    Version,
    build_history,
    describe_history,
    file_sha256,
)
from bench.common.measure import (
    CommandError,
    capture,
    error_tail,
    fmt,
    machine_info,
    render_table,
    scratch,
    thread_env,
)
from bench.common.paths import POTLUCK_BIN, THETA_BIN
from bench.common.tools import TOOLS, Repo, StepResult, Tool, probe_tool

# --------------------------------------------------------------------------- tools


def tool_versions() -> dict[str, str]:
    meta = "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))"
    return {
        "git": capture(["git", "--version"]),
        "git-lfs": capture(["git", "lfs", "version"]),
        "git-theta": capture([str(THETA_BIN / "python"), "-c", meta, "git-theta"]),
        "torch (git-theta venv)": capture([str(THETA_BIN / "python"), "-c", meta, "torch"]),
        "potluck": capture([str(POTLUCK_BIN / "potluck"), "--version"]),
    }


# --------------------------------------------------------------------------- one tool run


@dataclasses.dataclass
class ToolRun:
    tool: str
    dtype: str
    steps: list[StepResult] = dataclasses.field(default_factory=list)
    skipped: str = ""
    error: str = ""


def verify_file(step: StepResult, path: Path, want: Version) -> None:
    if not path.exists():
        step.ok, step.note = False, f"{CKPT} missing after checkout"
    elif file_sha256(path) != want.sha256:
        step.ok, step.note = False, f"{CKPT} bytes differ from {want.path.stem}"


def replay_history(repo: Repo, versions: list[Version], run: ToolRun) -> None:
    ckpt = repo.path / CKPT
    commits: list[str] = []
    for n, version in enumerate(versions, 1):
        shutil.copyfile(version.path, ckpt)
        cmds = [["git", "add", CKPT], ["git", "commit", "-q", "-m", f"v{n}"]]
        step, _ = repo.measure(version.label, cmds)
        run.steps.append(step)
        commits.append(repo.head())
    step, _ = repo.measure("checkout v1", [["git", "checkout", "-q", commits[0]]])
    verify_file(step, ckpt, versions[0])
    run.steps.append(step)
    step, _ = repo.measure("checkout back", [["git", "checkout", "-q", "main"]])
    verify_file(step, ckpt, versions[-1])
    run.steps.append(step)
    os.utime(ckpt)
    step, out = repo.measure("status after touch", [["git", "status", "--porcelain"]])
    if out.strip():
        step.ok, step.note = False, f"status not clean: {out.strip()[:80]}"
    run.steps.append(step)


def run_tool(tool: Tool, dtype: str, versions: list[Version], args: argparse.Namespace) -> ToolRun:
    run = ToolRun(tool.name, dtype)
    with scratch(f"vcs-{tool.name}-{dtype}-", args.workdir, args.keep) as root:
        try:
            repo = Repo(tool, root, args.threads, args.timeout)
            repo.setup()
            replay_history(repo, versions, run)
        except CommandError as exc:
            run.error = str(exc)
    return run


# --------------------------------------------------------------------------- report


def step_cells(step: StepResult | None, ckpt_bytes: int) -> list[str]:
    if step is None:
        return ["-"] * 5
    mark = "" if step.ok else "!"
    return [
        fmt(step.wall_s, ".2f") + mark,
        fmt(step.cpu_s, ".2f"),
        fmt(step.peak_rss / MB, ".0f"),
        fmt(step.growth / MB, ".1f"),
        fmt(100 * step.growth / ckpt_bytes, ".1f"),
    ]


def dtype_table(runs: list[ToolRun], versions: list[Version]) -> str:
    ckpt = versions[0].nbytes
    labels = [v.label for v in versions] + ["checkout v1", "checkout back", "status after touch"]
    cols = ["wall s", "CPU s", "RSS MB", "grow MB", "grow %"]
    top = ["step"] + [c for r in runs for c in [r.tool] + [""] * 4]
    sub = [""] + cols * len(runs)
    rows = []
    for label in labels:
        row = [label]
        for run in runs:
            step = next((s for s in run.steps if s.step == label), None)
            row += step_cells(step, ckpt)
        rows.append(row)
    return render_table(rows, [top, sub])


def find_step(runs: list[ToolRun], tool: str, label_prefix: str) -> StepResult | None:
    for run in runs:
        if run.tool == tool and not run.skipped:
            for step in run.steps:
                if step.step.startswith(label_prefix):
                    return step
    return None


# --------------------------------------------------------------------------- targets


@dataclasses.dataclass
class Target:
    name: str
    limit: str
    ratio: float | None
    passed: bool | None


def wall_ratio(runs: list[ToolRun], label: str, num: str, den: str) -> float | None:
    a, b = find_step(runs, num, label), find_step(runs, den, label)
    if a is None or b is None or not (a.ok and b.ok) or b.wall_s <= 0:
        return None
    return a.wall_s / b.wall_s


def growth_ratio(runs: list[ToolRun], label: str, ckpt: int) -> float | None:
    step = find_step(runs, "potluck", label)
    return None if step is None else step.growth / ckpt


def peak_ratio(runs: list[ToolRun], ckpt: int, children_only: bool = False) -> float | None:
    pot = next((r for r in runs if r.tool == "potluck" and r.steps), None)
    if pot is None:
        return None
    peaks = [s.peak_rss_children if children_only else s.peak_rss for s in pot.steps]
    return max(peaks) / ckpt


def judge(name: str, limit: str, ratio: float | None, ok: Callable[[float], bool]) -> Target:
    return Target(name, limit, ratio, None if ratio is None else ok(ratio))


def evaluate_targets(runs: list[ToolRun], ckpt: int) -> list[Target]:
    def at_most(limit: float) -> Callable[[float], bool]:
        return lambda r: r <= limit

    rows: list[tuple[str, str, float | None, Callable[[float], bool]]] = [
        (
            "add new ckpt: potluck / git-lfs wall",
            "<= 1.5",
            wall_ratio(runs, "v1 ", "potluck", "git-lfs"),
            at_most(1.5),
        ),
        (
            "add new ckpt: git-theta / potluck wall",
            ">= 10",
            wall_ratio(runs, "v1 ", "git-theta", "potluck"),
            lambda r: r >= 10,
        ),
        ("peak RSS (all steps) / checkpoint", "<= 0.5", peak_ratio(runs, ckpt), at_most(0.5)),
        (
            "  info: same without git's own RSS",
            "<= 0.5",
            peak_ratio(runs, ckpt, children_only=True),
            at_most(0.5),
        ),
        (
            "growth sparse 1% (v3) / checkpoint",
            "<= 0.02",
            growth_ratio(runs, "v3", ckpt),
            at_most(0.02),
        ),
        (
            "growth dense (v2) / checkpoint",
            "<= 0.65",
            growth_ratio(runs, "v2", ckpt),
            at_most(0.65),
        ),
        (
            "checkout v1: potluck / git-lfs wall",
            "<= 1.5",
            wall_ratio(runs, "checkout v1", "potluck", "git-lfs"),
            at_most(1.5),
        ),
    ]
    return [judge(*row) for row in rows]


def targets_table(targets: list[Target]) -> str:
    rows = []
    for t in targets:
        verdict = "n/a" if t.passed is None else ("PASS" if t.passed else "FAIL")
        rows.append(
            [t.name, t.limit, fmt(t.ratio if t.ratio is not None else math.nan, ".3f"), verdict]
        )
    return render_table(rows, [["target (potluck)", "limit", "measured", "result"]])


# --------------------------------------------------------------------------- main


def print_header(info: dict[str, str], versions: dict[str, str], args: argparse.Namespace) -> None:
    print(f"# potluck VCS benchmark: size={args.size} dtype={args.dtype} tools={args.tools}")
    print(f"# threads fixed to {args.threads} for every tool (see 'threads' below)")
    for key, value in {**info, **versions}.items():
        print(f"#   {key:<22} {value}")
    print()


def print_runs(runs: list[ToolRun], versions: list[Version]) -> None:
    active = [r for r in runs if not r.skipped]
    if active:
        print(dtype_table(active, versions))
    for run in runs:
        if run.skipped:
            print(f"! {run.tool}: skipped: {run.skipped}")
        if run.error:
            print(f"! {run.tool} ({run.dtype}) failed:\n    {error_tail(run.error, 5)}")
        for step in run.steps:
            if not step.ok:
                print(f"! {run.tool} {step.step}: {step.note}")
    print("  ('!' after a wall time: the step ran but its result was wrong, see notes)")
    print("  RSS = peak summed RSS of git and all its descendants; grow = store + .git/objects")
    print()


def bench_dtype(
    dtype: str, tools: list[Tool], skips: dict[str, str], args: argparse.Namespace
) -> dict[str, object]:
    ckpt_dir = Path(tempfile.mkdtemp(prefix=f"vcs-ckpt-{dtype}-", dir=args.workdir))
    try:
        versions = build_history(args.size, dtype, ckpt_dir)
        describe_history(dtype, versions)
        runs: list[ToolRun] = []
        for tool in tools:
            if tool.name in skips:
                runs.append(ToolRun(tool.name, dtype, skipped=skips[tool.name]))
                continue
            print(f"  running {tool.name} ({dtype}) ...", file=sys.stderr, flush=True)
            runs.append(run_tool(tool, dtype, versions, args))
        print_runs(runs, versions)
        targets = evaluate_targets(runs, versions[0].nbytes)
        print(targets_table(targets))
        print()
    finally:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    meta = [
        {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(x).items()}
        for x in versions
    ]
    return {
        "versions": meta,
        "runs": [dataclasses.asdict(r) for r in runs],
        "targets": [dataclasses.asdict(t) for t in targets],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.vcs", description=__doc__)
    p.add_argument("--size", choices=sorted(SIZES), default="gpt2")
    p.add_argument("--dtype", choices=["f32", "bf16", "both"], default="both")
    p.add_argument("--tools", default=",".join(TOOLS), help="comma list of " + ",".join(TOOLS))
    p.add_argument("--threads", type=int, default=2, help="thread count forced on every tool")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per git command")
    p.add_argument("--json", type=Path, help="also write all results to this JSON file")
    p.add_argument("--workdir", type=Path, help="parent of the temp dirs (default: system tmp)")
    p.add_argument("--keep", action="store_true", help="keep the temp repositories")
    args = p.parse_args(argv)
    unknown = [t for t in args.tools.split(",") if t not in TOOLS]
    if unknown:
        p.error(f"unknown tool(s) {unknown}; choose from {list(TOOLS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.update(thread_env(args.threads))
    tools = [TOOLS[name] for name in args.tools.split(",")]
    skips = {t.name: msg for t in tools if (msg := probe_tool(t, args.threads)) is not None}
    for name, msg in skips.items():
        print(f"! skipping {name}: {msg}", file=sys.stderr)
    info, versions = machine_info(args.threads), tool_versions()
    print_header(info, versions, args)
    dtypes = ["f32", "bf16"] if args.dtype == "both" else [args.dtype]
    results = {d: bench_dtype(d, tools, skips, args) for d in dtypes}
    if args.json is not None:
        doc: dict[str, object] = {
            "args": {k: str(v) for k, v in vars(args).items()},
            "machine": info,
            "tool_versions": versions,
            "results": results,
        }
        args.json.write_text(json.dumps(doc, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

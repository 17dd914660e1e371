"""Scale benchmark (issue 14, items 6 and 18): many small tensors and one huge tensor.

Two checkpoint histories, each replayed with potluck and with git-lfs in fresh repositories:

* **many**: one safetensors file with 20k F32[275] tensors (~22 MB), then 2k of them changed;
* **big**: one F32 tensor of 256 MiB (``--big``: 2 GiB) and a small one, then a sparse change.

Steps: first ``git add``, ``potluck diff`` (index vs work tree, with and without stats),
``git diff``, second add, ``git checkout`` of the first version, the store's size against the
data; for the big file also ``potluck merge``, ``patch create`` and ``patch apply``. Every step
runs ``--repeat`` times (fresh repository each time); the table shows medians of wall time and
of the peak RSS of potluck's own processes (the filter or driver under git: git's buffer of the
whole file is left out; the ``potluck`` command itself otherwise), and ratios to git-lfs from
the same run. Thread counts are fixed (``--threads``); the load average is printed.

    .venv/bin/python -m bench.scale            # 20k tensors + 256 MiB tensor, 3 repeats
    .venv/bin/python -m bench.scale --quick    # 2k tensors + 64 MiB tensor, 1 repeat
    .venv/bin/python -m bench.scale --big      # the 2 GiB tensor (needs ~12 GB of disk)
    .venv/bin/python -m bench.scale --cases llama --llama-gb 20   # issue 19: bench/scale/llama.py
"""

from __future__ import annotations

import argparse
import dataclasses
import filecmp
import json
import os
import shutil
import statistics
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from bench.common.measure import CommandError, capture, fmt, machine_info, render_table, scratch
from bench.common.tools import TOOLS, Repo, StepResult, probe_tool
from bench.scale import llama

MiB = 1 << 20
FILE = "m.safetensors"


# --------------------------------------------------------------------------- checkpoints


def _header(tensors: list[tuple[str, str, list[int], int]]) -> bytes:
    """A safetensors header for (name, dtype, shape, nbytes) in file order, padded to 8."""
    meta, pos = {}, 0
    for name, dtype, shape, nbytes in tensors:
        meta[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    raw = json.dumps(meta, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def write_many(folder: Path, n: int, changed: int) -> tuple[Path, Path]:
    """v1: ``n`` tensors F32[275]; v2: the first ``changed`` of them perturbed."""
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((n, 275)).astype(np.float32)
    head = _header([(f"layers.{i:05d}.w", "F32", [275], 1100) for i in range(n)])
    v1, v2 = folder / "many-v1.safetensors", folder / "many-v2.safetensors"
    v1.write_bytes(head + rows.tobytes())
    rows[:changed] += np.float32(0.01) * rng.standard_normal((changed, 275)).astype(np.float32)
    v2.write_bytes(head + rows.tobytes())
    return v1, v2


def _big_blocks(elements: int, block: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(v1, v2) blocks of the big tensor: v2 changes every 97th element of v1."""
    rng = np.random.default_rng(1)
    for start in range(0, elements, block):
        a = rng.standard_normal(min(block, elements - start), dtype=np.float32)
        b = a.copy()
        b[::97] += np.float32(1e-3)
        yield a, b


def write_big(folder: Path, mib: int) -> tuple[Path, Path]:
    """v1 and v2 of a file with one ``mib`` MiB F32 tensor (written in blocks)."""
    elements = mib * MiB // 4
    head = _header([("b", "F32", [16], 64), ("w", "F32", [elements], elements * 4)])
    v1, v2 = folder / "big-v1.safetensors", folder / "big-v2.safetensors"
    small = np.arange(16, dtype=np.float32).tobytes()
    with open(v1, "wb") as f1, open(v2, "wb") as f2:
        for f in (f1, f2):
            f.write(head + small)
        for a, b in _big_blocks(elements, 8 * MiB):
            f1.write(a.tobytes())
            f2.write(b.tobytes())
    return v1, v2


# --------------------------------------------------------------------------- measuring


@dataclasses.dataclass
class Step:
    """One measured step of one repeat (RSS: potluck's or git-lfs's own processes)."""

    case: str
    tool: str
    step: str
    wall_s: float
    rss: int
    ok: bool = True
    cpu_s: float = 0.0  # user + system time of the processes the step started


def store_size(repo: Repo) -> tuple[int, int]:
    """(apparent bytes, allocated bytes) of the tool's object store."""
    rel = ".git/potluck/objects" if repo.tool.name == "potluck" else ".git/lfs/objects"
    apparent = allocated = 0
    for root, dirs, files in os.walk(repo.path / rel):
        dirs[:] = [d for d in dirs if d not in ("tmp", "incomplete")]
        for name in files:
            st = os.lstat(os.path.join(root, name))
            apparent += st.st_size
            allocated += st.st_blocks * 512
    return apparent, allocated


class Runner:
    """One repository of one tool; records its steps."""

    def __init__(self, repo: Repo, case: str, out: list[Step]) -> None:
        self.repo, self.case, self.out = repo, case, out

    def step(self, label: str, cmds: list[list[str]], *, own: bool = False) -> str:
        """Run ``cmds`` as one step; ``own``: the command is the tool itself (RSS of the whole
        tree), else git runs the tool (RSS of git's children)."""
        res: StepResult
        res, text = self.repo.measure(label, cmds)
        rss = res.peak_rss if own else res.peak_rss_children
        tool = self.repo.tool.name
        self.out.append(Step(self.case, tool, label, res.wall_s, rss, res.ok, res.cpu_s))
        return text

    def value(self, label: str, number: float) -> None:
        """Record a number that is not a timing (a size in bytes)."""
        self.out.append(Step(self.case, self.repo.tool.name, label, number, 0))


def replay(runner: Runner, v1: Path, v2: Path, big: bool) -> None:
    """The history: add v1, diffs against v2, add v2, checkout v1 (+ merge/patch for big)."""
    repo, path = runner.repo, runner.repo.path / FILE
    potluck = repo.tool.name == "potluck"
    shutil.copyfile(v1, path)
    runner.step("add v1", [["git", "add", FILE]])
    apparent, allocated = store_size(repo)
    runner.value("store bytes (apparent)", apparent)
    runner.value("store bytes (allocated)", allocated)
    repo.check(["git", "commit", "-q", "-m", "v1"])
    shutil.copyfile(v2, path)
    if potluck:
        runner.step("potluck diff --no-stats", [["potluck", "diff", "--no-stats"]], own=True)
        runner.step("potluck diff", [["potluck", "diff"]], own=True)
    runner.step("git diff", [["git", "diff"]])
    runner.step("add v2", [["git", "add", FILE]])
    repo.check(["git", "commit", "-q", "-m", "v2"])
    runner.step("checkout v1", [["git", "checkout", "-q", "HEAD~1"]])
    runner.out[-1].ok = filecmp.cmp(v1, path, shallow=False)
    repo.check(["git", "checkout", "-q", "main"])
    if potluck and big:
        merge_and_patch(runner)


def merge_and_patch(runner: Runner) -> None:
    """Memory of merge and patch on the big file (another area of issue 14: measured here)."""
    old, new = f"{FILE}@HEAD~1", f"{FILE}@HEAD"
    merge = ["potluck", "merge", "--method", "linear", old, new, "-o", "../merged"]
    merge += ["--workers", "2"]
    runner.step("potluck merge linear", [merge], own=True)
    patch = ["potluck", "patch", "create", old, new, "-o", "../p.patch"]
    runner.step("potluck patch create", [patch], own=True)
    apply = ["potluck", "patch", "apply", old, "../p.patch", "-o", "../applied.safetensors"]
    runner.step("potluck patch apply", [apply], own=True)


def run_case(case: str, files: tuple[Path, Path], args: argparse.Namespace) -> list[Step]:
    """Every tool, ``args.repeat`` times, in fresh repositories."""
    out: list[Step] = []
    for rep in range(args.repeat):
        for name in args.tools:
            with scratch(f"scale-{case}-{name}-", args.workdir, args.keep) as root:
                repo = Repo(TOOLS[name], root, args.threads, args.timeout)
                try:
                    repo.setup()
                    replay(Runner(repo, case, out), *files, big=case == "big")
                except CommandError as exc:
                    print(f"  {case}/{name} repeat {rep + 1}: {exc}", file=sys.stderr)
            print(f"  {case}/{name} repeat {rep + 1} done, load {load()}", file=sys.stderr)
    return out


# --------------------------------------------------------------------------- report


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def median(steps: list[Step], case: str, tool: str, step: str, field: str) -> float | None:
    vals = [getattr(s, field) for s in steps if (s.case, s.tool, s.step) == (case, tool, step)]
    return statistics.median(vals) if vals else None


def _cell(value: float | None, spec: str, scale: float = 1) -> str:
    return "-" if value is None else fmt(value / scale, spec)


def case_table(steps: list[Step], case: str, data_bytes: int) -> str:
    labels = list(dict.fromkeys(s.step for s in steps if s.case == case))
    rows = [_row(steps, case, label, data_bytes) for label in labels]
    header = [
        ["", "potluck", "", "", "git-lfs", "", "", "potluck/git-lfs", "", ""],
        ["step", "wall s|MiB", "CPU s", "RSS MiB", "wall s|MiB", "CPU s", "RSS MiB", "wall",
         "CPU", ""],
    ]  # fmt: skip
    return render_table(rows, header)


def _row(steps: list[Step], case: str, label: str, data_bytes: int) -> list[str]:
    def m(tool: str, field: str) -> float | None:
        return median(steps, case, tool, label, field)

    pot, lfs = m("potluck", "wall_s"), m("git-lfs", "wall_s")
    if label.startswith("store"):
        per_data = _cell(pot, ".2f", data_bytes) + "x data"
        return [label, _cell(pot, ".1f", MiB), "", "", _cell(lfs, ".1f", MiB), "", "",
                _ratio(pot, lfs), "", per_data]  # fmt: skip
    bad = any(not s.ok for s in steps if (s.case, s.step) == (case, label))
    pcpu, lcpu = m("potluck", "cpu_s"), m("git-lfs", "cpu_s")
    return [label + ("!" if bad else ""),
            _cell(pot, ".2f"), _cell(pcpu, ".2f"), _cell(m("potluck", "rss"), ".0f", MiB),
            _cell(lfs, ".2f"), _cell(lcpu, ".2f"), _cell(m("git-lfs", "rss"), ".0f", MiB),
            _ratio(pot, lfs), _ratio(pcpu, lcpu), ""]  # fmt: skip


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or b <= 0 else f"{a / b:.2f}"


def targets(steps: list[Step], data: dict[str, int]) -> list[tuple[str, str, bool | None]]:
    """The issue's targets, judged on the medians of this run."""

    def m(case: str, tool: str, step: str, field: str = "wall_s") -> float | None:
        return median(steps, case, tool, step, field)

    out: list[tuple[str, str, bool | None]] = []

    def judge(name: str, value: float | None, limit: float, unit: str) -> None:
        shown = "-" if value is None else f"{value:.2f}{unit}"
        out.append((f"{name} <= {limit:g}{unit}", shown, None if value is None else value <= limit))

    pot, lfs = m("many", "potluck", "add v1"), m("many", "git-lfs", "add v1")
    judge("many: first add / git-lfs", None if not (pot and lfs) else pot / lfs, 3, "x")
    pot, lfs = m("many", "potluck", "add v1", "cpu_s"), m("many", "git-lfs", "add v1", "cpu_s")
    judge("many: first add / git-lfs, CPU time", None if not (pot and lfs) else pot / lfs, 3, "x")
    judge("many: potluck diff (changed tensors)", m("many", "potluck", "potluck diff"), 5, " s")
    stored = m("many", "potluck", "store bytes (allocated)")
    judge("many: store / data", None if stored is None else stored / data["many"], 1.2, "x")
    for label in ("add v1", "potluck diff", "git diff", "checkout v1"):
        rss = m("big", "potluck", label, "rss")
        judge(f"big: {label} RSS", None if rss is None else rss / MiB, 512, " MiB")
    return out


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="2k tensors, 64 MiB tensor, 1 repeat")
    p.add_argument("--big", action="store_true", help="the big tensor is 2 GiB (default 256 MiB)")
    p.add_argument("--tensors", type=int, default=None, help="many: tensors (default 20000)")
    p.add_argument("--changed", type=int, default=None, help="many: changed (default 10%%)")
    p.add_argument("--big-mib", type=int, default=None, help="big: tensor size in MiB")
    p.add_argument("--cases", default="many,big", help="many,big,llama")
    p.add_argument("--llama-gb", type=float, default=20, help="llama: model size in GB")
    p.add_argument("--llama-shard-gb", type=float, default=5, help="llama: largest shard, GB")
    p.add_argument("--llama-max-memory", default="auto", help="llama: merge bound (0.3x)")
    p.add_argument("--llama-reserve-gb", type=float, default=15, help="llama: disk left free")
    p.add_argument("--repeat", type=int, default=None, help="repeats (default 3; quick 1)")
    p.add_argument("--tools", default="potluck,git-lfs", help="potluck,git-lfs")
    p.add_argument("--threads", type=int, default=2, help="threads of every tool (default 2)")
    p.add_argument("--timeout", type=float, default=1800, help="per command, seconds")
    p.add_argument("--workdir", type=Path, default=None, help="where the temp dirs go")
    p.add_argument("--keep", action="store_true", help="keep the temp repositories")
    p.add_argument("--json", type=Path, default=None, help="also write every step as JSON")
    args = p.parse_args(argv)
    args.tensors = args.tensors or (2000 if args.quick else 20000)
    args.changed = args.changed or max(1, args.tensors // 10)
    args.big_mib = args.big_mib or (2048 if args.big else 64 if args.quick else 256)
    args.repeat = args.repeat or (1 if args.quick else 3)
    args.tools = [t for t in args.tools.split(",") if t]
    args.cases = [c for c in args.cases.split(",") if c]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for name in list(args.tools):
        why = probe_tool(TOOLS[name], args.threads)
        if why:
            print(f"skipping {name}: {why}", file=sys.stderr)
            args.tools.remove(name)
    if "llama" in args.cases:  # one run of its own (bench/scale/llama.py); --repeat is ignored
        args.cases.remove("llama")
        rc = llama.run(args)
        if rc or not args.cases:
            return rc
    print(f"uptime before: {capture(['uptime'])}")
    steps: list[Step] = []
    data: dict[str, int] = {}
    with scratch("scale-data-", args.workdir, args.keep) as folder:
        makers: dict[str, Callable[[], tuple[Path, Path]]] = {
            "many": lambda: write_many(folder, args.tensors, args.changed),
            "big": lambda: write_big(folder, args.big_mib),
        }
        for case in args.cases:
            files = makers[case]()
            data[case] = files[0].stat().st_size
            steps += run_case(case, files, args)
            for f in files:
                f.unlink()
    report(steps, data, args)
    return 0


def report(steps: list[Step], data: dict[str, int], args: argparse.Namespace) -> None:
    info = machine_info(args.threads)
    print(f"uptime after: {capture(['uptime'])}")
    print(f"machine: {info['nproc']} CPUs, {info['memory']}, {info['cpu']}; threads {args.threads}")
    print(f"medians over {args.repeat} repeat(s); RSS: the tool's own processes (not git)")
    what = {
        "many": f"{args.tensors} tensors F32[275], {args.changed} changed",
        "big": f"one {args.big_mib} MiB F32 tensor, every 97th element changed",
    }
    for case in args.cases:
        print(f"\n== {case}: {what[case]} ({data[case] / MiB:.1f} MiB) ==")
        print(case_table(steps, case, data[case]))
    print("\n== targets ==")
    for name, value, ok in targets(steps, data):
        mark = "-" if ok is None else "PASS" if ok else "FAIL"
        print(f"{mark:4}  {name}: {value}")
    if args.json:
        rows = [dataclasses.asdict(s) for s in steps]
        args.json.write_text(json.dumps({"data": data, "steps": rows}, indent=1))


if __name__ == "__main__":
    raise SystemExit(main())

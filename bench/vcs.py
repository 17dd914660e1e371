#!/usr/bin/env python3
"""Benchmark potluck against git-lfs and git-theta on a GPT-2-shaped checkpoint history.

One command builds the checkpoints, replays the same five-commit history with every
tool in a fresh temporary repository, times checkout and status, and prints a table
per dtype plus the potluck targets. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np
import psutil
from safetensors.numpy import save_file

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
POTLUCK_BIN = REPO_ROOT / ".venv" / "bin"
THETA_BIN = BENCH_DIR / ".venv-theta" / "bin"
CKPT = "model.safetensors"
MB = 1e6
SEED = 20240601
SAMPLE_INTERVAL_S = 0.02
DTYPES: dict[str, np.dtype] = {
    "f32": np.dtype(np.float32),
    "bf16": np.dtype(ml_dtypes.bfloat16),
}
# (n_layer, d_model, vocab, n_ctx)
SIZES: dict[str, tuple[int, int, int, int]] = {
    "gpt2": (12, 768, 50257, 1024),
    "small": (4, 256, 8192, 512),
}
StateDict = dict[str, np.ndarray]


# --------------------------------------------------------------------------- checkpoints


def gpt2_shapes(n_layer: int, d: int, vocab: int, n_ctx: int) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a GPT-2 (HF transformers layout, Conv1D = (in, out))."""
    shapes: dict[str, tuple[int, ...]] = {"wte.weight": (vocab, d), "wpe.weight": (n_ctx, d)}
    for i in range(n_layer):
        p = f"h.{i}."
        for ln in ("ln_1", "ln_2"):
            shapes[p + ln + ".weight"] = (d,)
            shapes[p + ln + ".bias"] = (d,)
        for name, (fan_in, fan_out) in {
            "attn.c_attn": (d, 3 * d),
            "attn.c_proj": (d, d),
            "mlp.c_fc": (d, 4 * d),
            "mlp.c_proj": (4 * d, d),
        }.items():
            shapes[p + name + ".weight"] = (fan_in, fan_out)
            shapes[p + name + ".bias"] = (fan_out,)
    shapes["ln_f.weight"] = (d,)
    shapes["ln_f.bias"] = (d,)
    return shapes


def normal(rng: np.random.Generator, shape: tuple[int, ...], scale: float) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)


def initial_state(
    shapes: dict[str, tuple[int, ...]], dtype: np.dtype, rng: np.random.Generator
) -> StateDict:
    """Trained-looking values: N(0, 0.02) everywhere, LayerNorm gains around 1."""
    sd: StateDict = {}
    for name, shape in shapes.items():
        w = normal(rng, shape, 0.02)
        if ".ln_" in name or name.startswith("ln_f"):
            w += np.float32(1.0) if name.endswith(".weight") else np.float32(0.0)
        sd[name] = w.astype(dtype)
    return sd


def dense_update(sd: StateDict, rng: np.random.Generator) -> None:
    """v2: every tensor gets w += 1e-3 * |w| * N(0, 1), rounded to the checkpoint dtype."""
    for name, w in sd.items():
        w32 = w.astype(np.float32)
        w32 += np.float32(1e-3) * np.abs(w32) * rng.standard_normal(w.shape, dtype=np.float32)
        sd[name] = w32.astype(w.dtype)


def sparse_update(sd: StateDict, rng: np.random.Generator) -> None:
    """v3: 1% of the entries of 4 matrices get fresh N(0, 0.02) values."""
    layers = layer_count(sd)
    picks = [
        "h.0.attn.c_attn.weight",
        f"h.{layers // 3}.mlp.c_fc.weight",
        f"h.{2 * layers // 3}.mlp.c_proj.weight",
        f"h.{layers - 1}.attn.c_proj.weight",
    ]
    for name in picks:
        flat = sd[name].reshape(-1)
        idx = rng.choice(flat.size, size=flat.size // 100, replace=False)
        flat[idx] = normal(rng, (idx.size,), 0.02).astype(flat.dtype)


def replace_update(sd: StateDict, rng: np.random.Generator) -> None:
    """v4: two tensors are replaced by new random ones."""
    for name in ("wpe.weight", f"h.{layer_count(sd) // 2}.mlp.c_fc.weight"):
        sd[name] = normal(rng, sd[name].shape, 0.02).astype(sd[name].dtype)


def lora_update(sd: StateDict, rng: np.random.Generator, rank: int = 8) -> None:
    """v5: merge a rank-8 LoRA (alpha 16) into c_attn and c_proj of every layer."""
    scale = np.float32(16 / rank)
    for i in range(layer_count(sd)):
        for name in (f"h.{i}.attn.c_attn.weight", f"h.{i}.attn.c_proj.weight"):
            w = sd[name]
            b = normal(rng, (w.shape[0], rank), 0.02)
            a = normal(rng, (rank, w.shape[1]), 0.02)
            sd[name] = (w.astype(np.float32) + (b @ a) * scale).astype(w.dtype)


def layer_count(sd: StateDict) -> int:
    return sum(1 for name in sd if name.endswith(".ln_1.weight"))


UPDATES: list[tuple[str, Callable[[StateDict, np.random.Generator], None]]] = [
    ("v2 dense update", dense_update),
    ("v3 sparse 1% x4", sparse_update),
    ("v4 replace 2 tensors", replace_update),
    ("v5 LoRA r8 merge", lora_update),
]


@dataclasses.dataclass
class Version:
    label: str
    path: Path
    nbytes: int
    sha256: str
    changed_frac: float  # fraction of all entries that differ from the previous version


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def changed_fraction(old: StateDict, new: StateDict) -> float:
    total = sum(w.size for w in new.values())
    changed = 0
    for name, w in new.items():
        a, b = old[name].view(np.uint8), w.view(np.uint8)
        itemsize = w.dtype.itemsize
        changed += int(np.any((a != b).reshape(-1, itemsize), axis=1).sum())
    return changed / total


def build_history(size: str, dtype_key: str, out_dir: Path) -> list[Version]:
    """Write v1..v5 of the checkpoint into out_dir (deterministic for size and dtype)."""
    rng = np.random.default_rng(SEED)
    out_dir.mkdir(parents=True, exist_ok=True)
    sd = initial_state(gpt2_shapes(*SIZES[size]), DTYPES[dtype_key], rng)
    versions: list[Version] = []
    steps: list[tuple[str, Callable[[StateDict, np.random.Generator], None] | None]] = [
        ("v1 add+commit (new)", None),
        *UPDATES,
    ]
    for n, (label, update) in enumerate(steps, 1):
        prev = {k: v.copy() for k, v in sd.items()}
        if update is not None:
            update(sd, rng)
        path = out_dir / f"v{n}.safetensors"
        save_file(sd, str(path))
        frac = 1.0 if update is None else changed_fraction(prev, sd)
        versions.append(Version(label, path, path.stat().st_size, file_sha256(path), frac))
    return versions


# --------------------------------------------------------------------------- measuring


class TreeRssSampler:
    """Samples the summed RSS of a process and all its descendants every ~20 ms."""

    def __init__(self) -> None:
        self.peak = 0
        self.peak_descendants = 0  # without the watched git process itself
        self._root: psutil.Process | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> TreeRssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def watch(self, pid: int) -> None:
        try:
            self._root = psutil.Process(pid)
        except psutil.NoSuchProcess:
            self._root = None
        self._sample()

    def _loop(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL_S):
            self._sample()

    def _sample(self) -> None:
        root = self._root
        if root is None:
            return
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        sizes = []
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                sizes.append(proc.memory_info().rss)
        self.peak = max(self.peak, sum(sizes))
        self.peak_descendants = max(self.peak_descendants, sum(sizes[1:]))


def children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def dir_bytes(path: Path) -> int:
    """Apparent size of every regular file below path (like du --apparent-size -b)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


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


class CommandError(RuntimeError):
    pass


def run_command(
    cmd: list[str],
    cwd: Path,
    env: dict[str, str],
    timeout: float,
    log: Path,
    on_start: Callable[[int], None] | None = None,
) -> tuple[int, str]:
    """Run one command in its own session; returns (returncode, stdout)."""
    with tempfile.TemporaryFile() as out, log.open("ab") as err:
        err.write(f"\n$ {' '.join(cmd)}\n".encode())
        err.flush()
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=out, stderr=err, start_new_session=True
        )
        if on_start is not None:
            on_start(proc.pid)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise CommandError(f"timeout after {timeout:.0f}s: {' '.join(cmd)}") from None
        out.seek(0)
        return rc, out.read().decode(errors="replace")


def log_tail(log: Path, lines: int = 15) -> str:
    try:
        text = log.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return ""
    return "\n".join(text[-lines:])


# --------------------------------------------------------------------------- tools


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


def thread_env(threads: int) -> dict[str, str]:
    n = str(threads)
    names = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
    extra = ("NUMEXPR_NUM_THREADS", "RAYON_NUM_THREADS", "GOMAXPROCS")
    return {k: n for k in (*names, *extra)}


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


def capture(cmd: list[str], env: dict[str, str] | None = None) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc.__class__.__name__})"
    text = (proc.stdout or proc.stderr).strip().splitlines()
    return text[0] if proc.returncode == 0 and text else "unavailable"


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
    root = Path(tempfile.mkdtemp(prefix=f"vcs-{tool.name}-{dtype}-", dir=args.workdir))
    try:
        repo = Repo(tool, root, args.threads, args.timeout)
        repo.setup()
        replay_history(repo, versions, run)
    except CommandError as exc:
        run.error = str(exc)
    finally:
        if args.keep:
            print(f"  kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    return run


# --------------------------------------------------------------------------- report


def fmt(value: float, spec: str) -> str:
    return "-" if value is None or math.isnan(value) else format(value, spec)


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


def render_table(rows: list[list[str]], header: list[list[str]]) -> str:
    table = [*header, *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = []
    for n, row in enumerate(table):
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append(" | ".join(cells))
        if n == len(header) - 1:
            lines.append("-+-".join("-" * w for w in widths))
    return "\n".join(lines)


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


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(threads: int) -> dict[str, str]:
    return {
        "nproc": str(len(os.sched_getaffinity(0))),
        "cpu": cpu_model(),
        "memory": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
        "os": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "threads": f"{threads} (OMP/MKL/OPENBLAS/NUMEXPR/RAYON_NUM_THREADS, GOMAXPROCS)",
    }


def print_header(info: dict[str, str], versions: dict[str, str], args: argparse.Namespace) -> None:
    print(f"# potluck VCS benchmark: size={args.size} dtype={args.dtype} tools={args.tools}")
    print(f"# threads fixed to {args.threads} for every tool (see 'threads' below)")
    for key, value in {**info, **versions}.items():
        print(f"#   {key:<22} {value}")
    print()


def describe_history(dtype: str, versions: list[Version]) -> None:
    v1 = versions[0]
    print(f"## dtype {dtype}: checkpoint {v1.nbytes / MB:.1f} MB ({CKPT})")
    for v in versions:
        print(f"#   {v.label:<22} {100 * v.changed_frac:6.2f}% of entries changed")


def print_runs(runs: list[ToolRun], versions: list[Version]) -> None:
    active = [r for r in runs if not r.skipped]
    if active:
        print(dtype_table(active, versions))
    for run in runs:
        if run.skipped:
            print(f"! {run.tool}: skipped: {run.skipped}")
        if run.error:
            lines = run.error.splitlines()
            tail = "\n    ".join(lines[:1] + lines[1:][-5:])
            print(f"! {run.tool} ({run.dtype}) failed:\n    {tail}")
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
    p = argparse.ArgumentParser(description=__doc__)
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

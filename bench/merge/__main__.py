"""bench.merge: ``potluck merge`` vs mergekit (``mergekit-yaml``) on ~1 GB Llama-shaped models.

One command::

    .venv/bin/python -m bench.merge [--size-gb 1] [--threads 2] [--only mergekit|potluck|both]
                                    [--methods linear,ties] [--mergekit-venv /work/venvs/mergekit]
                                    [--max-memory 2GB] [--json bench/results/merge.json]

It generates (once, cached under ``bench/results/merge-models/``) a base and 3 fine-tunes in the
Hugging Face layout (``config.json`` of a LlamaConfig + one ``model.safetensors``, float32; at
``--size-gb 1``: hidden 1024, intermediate 2816, 16 layers, vocab 32000, 271 M parameters,
1.08 GB each), writes one mergekit YAML per method (``linear``: weights 0.5/0.3/0.2; ``ties``:
base + 3 models, density 0.2, weight 1) and runs each tool on it in a subprocess:

* mergekit: ``mergekit-yaml CONFIG OUT --lazy-unpickle --no-copy-tokenizer --random-seed 0
  --num-threads T --quiet`` (``--num-threads`` calls ``torch.set_num_threads(T)`` and
  ``torch.set_num_interop_threads(T)``); CPU (mergekit's default, no ``--cuda``); default
  ``--out-shard-size`` (5B parameters: one output file here), no ``--async-write``.
* potluck: ``.venv/bin/potluck merge CONFIG OUT --workers T`` (+ ``--max-memory`` if given); the
  command line is built in ``potluck_command`` only.

Both get ``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``, ``OPENBLAS_NUM_THREADS``,
``NUMEXPR_NUM_THREADS``, ``RAYON_NUM_THREADS`` and ``GOMAXPROCS`` = T, ``HF_HUB_OFFLINE=1``.
Wall time is ``perf_counter`` around the subprocess; peak RSS is the largest *sum* of the RSS of
the process and all its descendants, polled with psutil every 20 ms (not
``getrusage(RUSAGE_CHILDREN)``, whose ``ru_maxrss`` is a maximum over all children ever waited
for, so it is wrong for the second of two sequential children; nor ``/usr/bin/time -v``, which
reports only the largest single process). RSS counts the pages of memory-mapped input files each
tool has touched, as the kernel does.

The outputs are compared tensor by tensor (names, shapes, dtypes, max |Δ|): a value agrees when
|potluck − mergekit| ≤ 16·ε₃₂·max|mergekit tensor| (ε₃₂ = 2⁻²³; mergekit computes in float32,
potluck in float64, each rounding a few times). For ``ties``, entries whose magnitudes tie at the
top-k cut may be chosen differently (torch ``argsort`` vs numpy ``argpartition``), so a handful of
mismatched entries is reported, not hidden. The table ends with the ratios potluck/mergekit
against the targets (≤ 0.5× wall, ≤ 0.5× peak RSS).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from bench.common.llama import llama_config, llama_shapes
from bench.common.measure import TreeRssSampler, cpu_model, fmt, scratch, thread_env
from bench.common.paths import POTLUCK_BIN, RESULTS

CACHE = RESULTS / "merge-models"
HEADS = 16
SEED = 20251123
GB = 1e9
EPS32 = float(np.finfo(np.float32).eps)
TOL_ULPS = 16
TARGET_RATIO = 0.5
METHODS = ("linear", "ties")


# ── the tool invocations: the one place to change how each tool is run ─────────────────────────


def potluck_command(config: Path, out: Path, threads: int, max_memory: str | None) -> list[str]:
    """``potluck merge CONFIG OUT --workers T [--max-memory M]`` (the lead's planned CLI)."""
    cmd = [str(POTLUCK_BIN / "potluck"), "merge", str(config), str(out), "--workers", str(threads)]
    return cmd + (["--max-memory", max_memory] if max_memory else [])


def mergekit_command(venv: Path, config: Path, out: Path, threads: int) -> list[str]:
    """``mergekit-yaml`` on the CPU with its low-memory flags and a fixed thread count."""
    return [
        str(venv / "bin" / "mergekit-yaml"), str(config), str(out), "--lazy-unpickle",
        "--no-copy-tokenizer", "--random-seed", "0", "--num-threads", str(threads), "--quiet",
    ]  # fmt: skip


def tool_env(threads: int) -> dict[str, str]:
    """The environment of every tool: fixed thread counts, no hub access."""
    offline = {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    return {**os.environ, **thread_env(threads), **offline}


# ── synthetic models ────────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class Shape:
    """A Llama shape; ``for_size`` scales layers and vocabulary with the target size."""

    hidden: int = 1024
    inter: int = 2816
    layers: int = 16
    vocab: int = 32000

    @classmethod
    def for_size(cls, size_gb: float) -> Shape:
        """16 layers and a 32000 vocabulary per GB (at least 1 layer, 256 tokens)."""
        layers, vocab = max(1, round(16 * size_gb)), max(256, round(32000 * min(1, size_gb)))
        return cls(layers=layers, vocab=vocab)

    def tensors(self) -> dict[str, tuple[int, ...]]:
        """Names and shapes (Hugging Face Llama layout, no GQA, untied lm_head)."""
        return llama_shapes(self.hidden, self.layers, HEADS, HEADS, self.inter, self.vocab)

    def config(self) -> dict[str, Any]:
        """A LlamaConfig as config.json."""
        config = llama_config(self.hidden, self.layers, HEADS, HEADS, self.inter, self.vocab, 2048)
        return {**config, "dtype": "float32"}

    def nbytes(self) -> int:
        """float32 bytes of one model."""
        return 4 * sum(int(np.prod(s)) for s in self.tensors().values())


def _tensor_rng(model: int, index: int) -> np.random.Generator:
    return np.random.default_rng([SEED, model, index])


def _base_tensor(index: int, shape: tuple[int, ...]) -> np.ndarray:
    x = _tensor_rng(0, index).standard_normal(shape, dtype=np.float32) * np.float32(0.02)
    return x + np.float32(1.0) if len(shape) == 1 else x


def _finetune_tensor(model: int, index: int, base: np.ndarray) -> np.ndarray:
    """base + a delta: ft1 dense, ft2 half the entries and opposed to ft1 there, ft3 10 % sparse."""
    rng = _tensor_rng(model, index)
    delta = rng.standard_normal(base.shape, dtype=np.float32) * np.float32(0.002)
    if model == 2:
        own = _tensor_rng(1, index).standard_normal(base.shape, dtype=np.float32)
        delta = np.where(rng.random(base.shape, dtype=np.float32) < 0.5, delta - 0.0012 * own, 0)
    elif model == 3:
        delta = np.where(rng.random(base.shape, dtype=np.float32) < 0.1, delta * 2, 0)
    return (base + delta.astype(np.float32)).astype(np.float32)


def make_models(shape: Shape, root: Path) -> dict[str, Path]:
    """base, ft1..ft3 under ``root`` (reused when complete)."""
    from safetensors.numpy import save_file

    paths = {name: root / name for name in ("base", "ft1", "ft2", "ft3")}
    if all((p / "model.safetensors").exists() for p in paths.values()):
        return paths
    names = list(shape.tensors().items())
    for model, (key, path) in enumerate(paths.items()):
        print(f"generating {key} ({shape.nbytes() / GB:.2f} GB) in {path}", file=sys.stderr)
        tensors = {}
        for index, (name, dims) in enumerate(names):
            base = _base_tensor(index, dims)
            tensors[name] = base if model == 0 else _finetune_tensor(model, index, base)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(shape.config(), indent=2) + "\n")
        save_file(tensors, str(path / "model.safetensors.tmp"), metadata={"format": "pt"})
        os.replace(path / "model.safetensors.tmp", path / "model.safetensors")
        del tensors
    return paths


def write_config(method: str, models: dict[str, Path], path: Path) -> Path:
    """The mergekit YAML both tools read."""
    import yaml

    fts = [str(models[k]) for k in ("ft1", "ft2", "ft3")]
    if method == "linear":
        weights = (0.5, 0.3, 0.2)
        entries = [
            {"model": m, "parameters": {"weight": w}} for m, w in zip(fts, weights, strict=True)
        ]
        cfg: dict[str, Any] = {"merge_method": "linear", "models": entries, "dtype": "float32"}
    elif method == "ties":
        entries = [{"model": m, "parameters": {"weight": 1.0, "density": 0.2}} for m in fts]
        cfg = {"merge_method": "ties", "base_model": str(models["base"]), "models": entries,
               "dtype": "float32"}  # fmt: skip
    else:
        raise SystemExit(f"unknown method {method!r} (known: {', '.join(METHODS)})")
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# ── running and measuring ───────────────────────────────────────────────────────────────────────


@dataclass
class Run:
    """One tool on one method."""

    tool: str
    method: str
    wall_s: float = float("nan")
    peak_rss_mb: float = float("nan")
    rc: int | None = None
    error: str = ""
    out_dir: str = ""


def measure(tool: str, method: str, cmd: list[str], env: dict[str, str], out: Path) -> Run:
    """Run ``cmd``, recording wall time and peak tree RSS; stderr is kept for errors."""
    run = Run(tool, method, out_dir=str(out))
    print(f"[{tool} {method}] {' '.join(cmd)}", file=sys.stderr)
    start = time.perf_counter()
    try:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    except OSError as e:
        run.error = f"cannot start: {e}"
        return run
    with TreeRssSampler() as sampler:
        sampler.watch(proc.pid)
        _, err = proc.communicate()
    run.wall_s = time.perf_counter() - start
    run.peak_rss_mb = sampler.peak / 1e6
    run.rc = proc.returncode
    if proc.returncode != 0:
        run.error = err.decode(errors="replace").strip().splitlines()[-1:][0] if err else "failed"
    return run


# ── comparing outputs ───────────────────────────────────────────────────────────────────────────


@dataclass
class Comparison:
    """potluck's output against mergekit's."""

    method: str
    tensors: int = 0
    max_abs_diff: float = 0.0
    worst_tensor: str = ""
    tensors_over_tol: int = 0
    entries_over_tol: int = 0
    problems: list[str] = field(default_factory=list)


def _open_dir(path: Path) -> dict[str, Path]:
    """tensor name → shard file, for a Hugging Face output directory."""
    from safetensors import safe_open

    where = {}
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(str(shard), "np") as f:
            where.update(dict.fromkeys(f.keys(), shard))
    return where


def compare_outputs(method: str, ours: Path, ref: Path) -> Comparison:
    """Names, shapes, dtypes and values (tolerance: see the module docstring)."""
    from safetensors import safe_open

    cmp = Comparison(method)
    a_files, b_files = _open_dir(ours), _open_dir(ref)
    if set(a_files) != set(b_files):
        cmp.problems.append(
            f"names differ: only potluck {sorted(set(a_files) - set(b_files))[:3]}, "
            f"only mergekit {sorted(set(b_files) - set(a_files))[:3]}"
        )
    for name in sorted(set(a_files) & set(b_files)):
        with safe_open(str(a_files[name]), "np") as fa, safe_open(str(b_files[name]), "np") as fb:
            a, b = fa.get_tensor(name), fb.get_tensor(name)
        cmp.tensors += 1
        if a.shape != b.shape or a.dtype != b.dtype:
            cmp.problems.append(f"{name}: {a.dtype}{a.shape} vs mergekit {b.dtype}{b.shape}")
            continue
        diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
        worst = float(diff.max()) if diff.size else 0.0
        over = int((diff > TOL_ULPS * EPS32 * float(np.abs(b).max(initial=0))).sum())
        if worst > cmp.max_abs_diff:
            cmp.max_abs_diff, cmp.worst_tensor = worst, name
        cmp.tensors_over_tol += over > 0
        cmp.entries_over_tol += over
    return cmp


# ── the table ───────────────────────────────────────────────────────────────────────────────────


def _row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _verdict(ratio: float) -> str:
    return f"{ratio:.2f}x ({'PASS' if ratio <= TARGET_RATIO else 'FAIL'})"


def table(runs: list[Run], comparisons: list[Comparison], header: str) -> str:
    """The result table, the ratios potluck/mergekit against the targets, the comparison."""
    lines = [header, "", _row("method", "tool", "wall s", "peak RSS MB", "status")]
    lines.append(_row("---", "---", "---:", "---:", "---"))
    for r in runs:
        status = "ok" if r.rc == 0 else (r.error or f"rc={r.rc}")
        lines.append(
            _row(r.method, r.tool, fmt(r.wall_s, ".1f"), fmt(r.peak_rss_mb, ".0f"), status)
        )
    by = {(r.tool, r.method): r for r in runs}
    ratios = []
    for method in dict.fromkeys(r.method for r in runs):
        p, m = by.get(("potluck", method)), by.get(("mergekit", method))
        if p and m and p.rc == 0 and m.rc == 0:
            wall, rss = p.wall_s / m.wall_s, p.peak_rss_mb / m.peak_rss_mb
            ratios.append(_row(method, _verdict(wall), _verdict(rss)))
    if ratios:
        target = f"(target <= {TARGET_RATIO}x)"
        lines += ["", _row("method", f"wall potluck/mergekit {target}", f"peak RSS {target}")]
        lines += [_row("---", "---", "---"), *ratios]
    if comparisons:
        over_tol = f"tensors/entries over tol ({TOL_ULPS} ulp f32)"
        lines += ["", _row("method", "tensors", "max |diff|", "worst tensor", over_tol, "problems")]
        lines.append(_row("---", "---:", "---:", "---", "---", "---"))
        for c in comparisons:
            over = f"{c.tensors_over_tol}/{c.entries_over_tol}"
            probs = "; ".join(c.problems[:3]) or "-"
            lines.append(_row(c.method, c.tensors, f"{c.max_abs_diff:.3g}", c.worst_tensor or "-",
                              over, probs))  # fmt: skip
    return "\n".join(lines)


def machine() -> str:
    """CPU model, cores, memory."""
    mem, python = psutil.virtual_memory().total / GB, platform.python_version()
    return f"{cpu_model()}, {os.cpu_count()} cores, {mem:.0f} GB RAM, Python {python}"


def parse_args() -> argparse.Namespace:
    """The command line (see the module docstring)."""
    ap = argparse.ArgumentParser(
        prog="python -m bench.merge", description=(__doc__ or "").split("\n")[0]
    )
    ap.add_argument("--size-gb", type=float, default=1.0, help="size of each model (default 1)")
    ap.add_argument("--threads", type=int, default=2, help="threads for both tools (default 2)")
    ap.add_argument("--only", choices=("mergekit", "potluck", "both"), default="both")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma list (default linear,ties)")
    ap.add_argument("--mergekit-venv", type=Path, default=Path("/work/venvs/mergekit"))
    ap.add_argument("--max-memory", default=None, help="passed to potluck merge --max-memory")
    ap.add_argument("--cache", type=Path, default=CACHE, help="where the models are kept")
    ap.add_argument("--workdir", type=Path, default=None, help="where outputs go (temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the merged outputs")
    ap.add_argument("--json", type=Path, default=None, help="also write every number here")
    return ap.parse_args()


def run_method(
    args: argparse.Namespace, method: str, models: dict[str, Path], work: Path
) -> tuple[list[Run], Comparison | None]:
    """Each selected tool on one method; the comparison when both succeeded."""
    config = write_config(method, models, work / f"{method}.yaml")
    tools = ("mergekit", "potluck") if args.only == "both" else (args.only,)
    env = tool_env(args.threads)
    done: dict[str, Run] = {}
    for tool in tools:
        out = work / f"{method}-{tool}"
        if tool == "mergekit":
            cmd = mergekit_command(args.mergekit_venv, config, out, args.threads)
        else:
            cmd = potluck_command(config, out, args.threads, args.max_memory)
        done[tool] = measure(tool, method, cmd, env, out)
    if not all(t in done and done[t].rc == 0 for t in ("mergekit", "potluck")):
        return list(done.values()), None
    cmp = compare_outputs(method, work / f"{method}-potluck", work / f"{method}-mergekit")
    return list(done.values()), cmp


def describe(args: argparse.Namespace, shape: Shape) -> str:
    """The table header: sizes, thread settings, machine, how RSS is measured."""
    t = args.threads
    return (
        f"merge bench: {len(shape.tensors())} tensors, {shape.nbytes() / GB:.2f} GB fp32 per "
        f"model (hidden {shape.hidden}, inter {shape.inter}, {shape.layers} layers, vocab "
        f"{shape.vocab}), base + 3 fine-tunes\n"
        f"threads: {t} (mergekit --num-threads {t} = torch.set_num_threads/interop; potluck "
        f"--workers {t}; OMP/MKL/OPENBLAS/NUMEXPR/RAYON_NUM_THREADS={t})\n"
        f"machine: {machine()}, load average {os.getloadavg()[0]:.1f} at the end\n"
        "peak RSS: psutil-polled sum over the process tree (20 ms)"
    )


def main() -> None:
    """Generate, run, compare, print (and optionally write JSON)."""
    args = parse_args()
    shape = Shape.for_size(args.size_gb)
    models = make_models(shape, args.cache / f"h{shape.hidden}-l{shape.layers}-v{shape.vocab}")
    runs: list[Run] = []
    comparisons: list[Comparison] = []
    with scratch("bench-merge-", args.workdir, args.keep) as work:
        for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
            method_runs, cmp = run_method(args, method, models, work)
            runs += method_runs
            comparisons += [cmp] if cmp else []
        header = describe(args, shape)
        print(table(runs, comparisons, header))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            data = {"header": header, "runs": [asdict(r) for r in runs],
                    "comparisons": [asdict(c) for c in comparisons]}  # fmt: skip
            args.json.write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()

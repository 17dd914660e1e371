"""bench.task_masks: a merge with per-task parts on the real all-MiniLM-L6-v2 layout.

One command::

    .venv/bin/python -m bench.task_masks [--tasks 5] [--methods emr,tall_masks] [--threads 2]

The base is the shipped all-MiniLM-L6-v2 ``model.safetensors`` (104 tensors, 22.7 M
parameters, float32). The fine-tunes are synthetic (cached under ``bench/results/task-masks/``):
each moves a random 30 % of every tensor's entries by N(0, (0.05·std of the tensor)²), seeded
per task, so sizes and times are those of the real tensor layout; the quality of the rebuilt
tasks needs real fine-tunes (bench.quality) and is not measured here. For each method it runs
``potluck merge --method M --base BASE ft0 … -o OUT --json`` and
``potluck patch apply OUT OUT/tasks/ft0.patch -o REBUILT`` in subprocesses (wall time with
``perf_counter``), and prints per method the merge and apply times, and per task patch its size
and bits per parameter (the mask alone is 1 bit per parameter; the rest is the header), with the
target ≤ 1.1 bits per parameter per task.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np

from bench.common.measure import thread_env
from bench.common.model import base_weights
from bench.common.paths import POTLUCK_BIN, RESULTS

TARGET_BITS = 1.1


def make_tasks(root: Path, tasks: int) -> list[Path]:
    """The synthetic fine-tunes (cached): 30 % of each tensor moved, seeded per task."""
    from safetensors.numpy import load_file, save_file

    base = load_file(str(base_weights()))
    out = []
    for t in range(tasks):
        path = root / f"ft{t}.safetensors"
        if not path.exists():
            rng = np.random.default_rng(1000 + t)
            ft = {}
            for name, arr in base.items():
                if arr.dtype.kind != "f":
                    ft[name] = arr
                    continue
                step = rng.normal(0, 0.05 * float(arr.std() or 1.0), arr.shape)
                ft[name] = (arr + step * (rng.random(arr.shape) < 0.3)).astype(arr.dtype)
            save_file(ft, str(path))
        out.append(path)
    return out


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, str]:
    """(wall seconds, stdout) of one command; a failure stops the benchmark."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return wall, proc.stdout


def run_method(method: str, root: Path, fts: list[Path], env: dict[str, str]) -> dict[str, object]:
    """Merge with ``method``, apply the first task's patch; sizes and times."""
    out, rebuilt = root / f"out-{method}", root / f"rebuilt-{method}"
    for d in (out, rebuilt):
        shutil.rmtree(d, ignore_errors=True)
    potluck = str(POTLUCK_BIN / "potluck")
    cmd = [potluck, "merge", "--method", method, "--base", str(base_weights())]
    merge_s, text = timed([*cmd, *map(str, fts), "-o", str(out), "--json"], root, env)
    report = json.loads(text)
    patch = out / "tasks" / f"{fts[0].stem}.patch"
    apply_s, _ = timed([potluck, "patch", "apply", str(out), str(patch), "-o", str(rebuilt)],
                       root, env)  # fmt: skip
    return {"method": method, "merge_s": merge_s, "apply_s": apply_s, "tasks": report["tasks"]}


def main() -> None:
    """Run the benchmark and print its table (see the module docstring)."""
    ap = argparse.ArgumentParser(prog="python -m bench.task_masks", description=__doc__)
    ap.add_argument("--tasks", type=int, default=5)
    ap.add_argument("--methods", default="emr,tall_masks")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    root = RESULTS / "task-masks"
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **thread_env(args.threads)}
    fts = make_tasks(root, args.tasks)
    print(f"load: {os.getloadavg()}; base {base_weights().name}, {args.tasks} synthetic tasks")
    worst = 0.0
    for method in args.methods.split(","):
        r = run_method(method, root, fts, env)
        print(f"{method}: merge {r['merge_s']:.1f} s, apply one task {r['apply_s']:.1f} s")
        for name, t in sorted(r["tasks"].items()):  # type: ignore[attr-defined]
            worst = max(worst, t["bits_per_parameter"])
            print(f"  tasks/{name}.patch: {t['bytes']} bytes, {t['bits_per_parameter']:.4f} "
                  f"bits/parameter (mask {t['mask_bits_per_parameter']:.4f}) over "
                  f"{t['parameters']} parameters")  # fmt: skip
    verdict = "PASS" if worst <= TARGET_BITS else "FAIL"
    print(f"target ≤ {TARGET_BITS} bits/parameter/task: worst {worst:.4f} → {verdict}")


if __name__ == "__main__":
    main()

"""``python -m bench.task_masks.quality``: gain kept by merged model + per-task masks, one seed.

bench.quality's protocol (its fine-tunes, linear probes, test evaluator, heads kept): the five
all-MiniLM-L6-v2 full fine-tunes of one seed (200 steps, cached in ``bench/results/quality``)
are merged with ``tall_masks`` (task arithmetic, λ = 1; ``mask_lambda`` ∈ {0.2, 0.4, 0.6}
picked per task on validation, as the paper picks λₜ) and with ``emr`` (tuning-free); each task
is rebuilt with ``potluck patch apply OUT OUT/tasks/<task>.patch`` and scored on test with its
own head. Printed per task: probe, fine-tune and rebuilt accuracy, gain kept
(rebuilt − probe) / (fine-tune − probe), and the mean gain kept over the tasks whose fine-tune
beats the probe by ≥ 5 points (``report.gain_tasks``); with the bits per parameter of each task
patch. Target: ≥ 95 % of the gain at ≤ 1.1 bits per parameter per task. Results:
``bench/results/task-masks/quality-s<seed>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.common import data, finetune, model
from bench.common.paths import POTLUCK_BIN, RESULTS
from bench.quality import report, stages

TASKS = ("fortune_topic", "fortune_lang", "fortune_topic_es", "vader_words", "tweet_sentiment")
MASK_LAMBDAS = (0.2, 0.4, 0.6)


def potluck(*args: str) -> str:
    """Run the potluck CLI; stop on failure."""
    proc = subprocess.run([str(POTLUCK_BIN / "potluck"), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"potluck {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return proc.stdout


def merge_and_rebuild(
    method: str, params: list[str], inputs: list[Path], work: Path
) -> tuple[dict[str, Path], dict[str, Any], float]:
    """Merge ``inputs`` (named by task) with ``method``; rebuild every task; (paths, report, s)."""
    out = work / "out"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    text = potluck("merge", "--method", method, "--base", str(model.base_weights()),
                   *map(str, inputs), "-o", str(out), "--json", *params)  # fmt: skip
    merge_s = time.perf_counter() - t0
    rebuilt = {}
    for f in inputs:
        task = f.stem
        potluck("patch", "apply", str(out), str(out / "tasks" / f"{task}.patch"),
                "-o", str(work / task))  # fmt: skip
        rebuilt[task] = work / task / "model.safetensors"
    return rebuilt, json.loads(text), merge_s


def main(argv: list[str] | None = None) -> int:
    """Run the check and print its table (see the module docstring)."""
    ap = argparse.ArgumentParser(prog="python -m bench.task_masks.quality", description=__doc__)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--mask-lambdas", default=",".join(map(str, MASK_LAMBDAS)))
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    root = RESULTS / "task-masks"
    tasks = [data.load_task(n, seed=args.seed) for n in TASKS]
    runs = {}
    for t in reversed(tasks):  # the order bench.quality trains in (shares its cache)
        cfg = stages.finetune_config(t.name, args.seed, args.steps)
        runs[t.name] = stages.cached_finetune(cfg, stages.RESULTS / "finetunes")
    probe = stages.probes(tasks, args.seed, stages.RESULTS)
    heads = {n: finetune.load_head(r.head) for n, r in runs.items()}
    val, test = stages.Evaluator(tasks, "val"), stages.Evaluator(tasks, "test")
    individual = {n: test.scores(r.encoder, heads, [n])[n] for n, r in runs.items()}
    links = root / f"inputs-s{args.seed}"
    links.mkdir(parents=True, exist_ok=True)
    inputs = []
    for n, r in runs.items():  # task patches are named after the input files
        link = links / f"{n}.safetensors"
        if not link.exists():
            os.symlink(r.encoder, link)
        inputs.append(link)
    results: dict[str, Any] = {"probe": probe, "individual": individual, "methods": {}}
    lambdas = [float(x) for x in args.mask_lambdas.split(",")]
    results["methods"]["tall_masks"] = _tall_masks(inputs, root, val, test, heads, lambdas)
    rebuilt, rep, merge_s = merge_and_rebuild("emr", [], inputs, root / "emr")
    results["methods"]["emr"] = {
        "test": {n: test.scores(p, heads, [n])[n] for n, p in rebuilt.items()},
        "tasks": rep["tasks"], "merge_s": merge_s,
    }  # fmt: skip
    results["load"] = os.getloadavg()
    tag = f"s{args.seed}" + ("" if args.steps == 200 else f"-steps{args.steps}")
    (root / f"quality-{tag}.json").write_text(json.dumps(results, indent=2) + "\n")
    _print(results)
    return 0


def _tall_masks(
    inputs: list[Path],
    root: Path,
    val: Any,
    test: Any,
    heads: dict[str, Any],
    lambdas: list[float],
) -> dict[str, Any]:
    """tall_masks with mask_lambda picked per task on validation."""
    best: dict[str, tuple[float, float, float]] = {}
    sizes, merge_s = {}, 0.0
    for lam in lambdas:
        rebuilt, rep, secs = merge_and_rebuild(
            "tall_masks", ["-p", f"mask_lambda={lam}"], inputs, root / f"tall-{lam}"
        )
        merge_s += secs
        sizes = rep["tasks"]
        for n, p in rebuilt.items():
            v = val.scores(p, heads, [n])[n]
            if n not in best or v > best[n][0]:
                best[n] = (v, test.scores(p, heads, [n])[n], lam)
    return {
        "test": {n: b[1] for n, b in best.items()},
        "mask_lambda": {n: b[2] for n, b in best.items()},
        "tasks": sizes, "merge_s": merge_s,
    }  # fmt: skip


def _print(r: dict[str, Any]) -> None:
    gains = report.gain_tasks(r)
    print(f"load {r['load']}; gain tasks (fine-tune ≥ probe + 5 points): {gains}")
    for method, m in r["methods"].items():
        print(f"\n{method} (merge {m['merge_s']:.0f} s)")
        print("| task | probe | fine-tune | rebuilt | gain kept | bits/param |")
        print("|---|---|---|---|---|---|")
        kept = []
        for n, acc in m["test"].items():
            p, tuned = r["probe"][n]["test_acc"], r["individual"][n]
            g = report.gain_kept(acc, p, tuned)
            if n in gains:
                kept.append(g)
            bits = m["tasks"][n]["bits_per_parameter"]
            print(f"| {n} | {p:.3f} | {tuned:.3f} | {acc:.3f} | {g:.1%} | {bits:.4f} |")
        mean = sum(kept) / len(kept) if kept else float("nan")
        print(f"mean gain kept over the gain tasks: {mean:.1%} (target ≥ 95 %)")


if __name__ == "__main__":
    raise SystemExit(main())

"""Merged model + per-task parts (``tall_masks``, ``emr``) in bench.quality's protocol.

The contributors' encoders are hard-linked as ``<task>.safetensors`` (task patches are named
after their inputs), merged in-process (``run_merge``) and every task is rebuilt with
``apply_patch(OUT, OUT/tasks/<task>.patch)``, then scored on test with its own head — the
accuracy a user gets who serves the merged model and swaps in a task's 1-bit mask.

* ``tall_masks``: task arithmetic λ = 1 (the paper's multi-task vector), ``mask_lambda`` ∈
  {0.2, 0.3, 0.4, 0.5, 0.6} picked **per task on validation** — the authors' grid and rule
  (their code tries λₜ ∈ {0.2, …, 0.6} in steps of 0.1 and keeps each task's best on its
  validation split; until 2026-12-08 the bench tried {0.2, 0.4, 0.6});
* ``emr``: tuning-free.

Each row records the test accuracies (rebuilt tasks), the patch sizes (bytes, bits per
parameter), the merge wall times and the config, in the shape of a ``merges`` entry so
``report`` tables and ``report --seeds`` include it.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.common import model

from .grams import link_file
from .merges import Contributor, save_json
from .stages import log

MASK_LAMBDAS = (0.2, 0.3, 0.4, 0.5, 0.6)
Scorer = Callable[[Path, str], float]


def link_inputs(contributors: Sequence[Contributor], folder: Path) -> list[Path]:
    """``folder/<task>.safetensors`` hard links (or copies) of the contributors' encoders."""
    folder.mkdir(parents=True, exist_ok=True)
    return [link_file(c.encoder, folder / f"{c.task}.safetensors") for c in contributors]


def _config(
    method: str, inputs: Sequence[Path], per_model: Mapping[str, Any], seed: int
) -> tuple[dict[str, Any], Any]:
    from potluck.ops.merge.config import parse_config

    cfg: dict[str, Any] = {
        "merge_method": method,
        "base_model": str(model.base_weights()),
        "models": [{"model": str(p), "parameters": dict(per_model)} for p in inputs],
        "parameters": {"lambda": 1.0} if method == "tall_masks" else {},
        "dtype": "float32",
        "seed": seed,
    }
    return cfg, parse_config(dict(cfg))


def merge_and_rebuild(
    method: str, inputs: Sequence[Path], per_model: Mapping[str, Any], work: Path, seed: int
) -> tuple[dict[str, Path], dict[str, Any], float, dict[str, Any]]:
    """Merge; rebuild every task from ``OUT/tasks/<task>.patch``: (rebuilt encoder files,
    the patch sizes per task, merge seconds, the config dict)."""
    from potluck.ops.merge.run import run_merge
    from potluck.ops.patch.apply import apply_patch

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cfg, parsed = _config(method, inputs, per_model, seed)
    t0 = time.perf_counter()
    rep = run_merge(parsed, work / "out", workers=2)
    merge_s = time.perf_counter() - t0
    rebuilt = {}
    for p in inputs:
        task = p.name.removesuffix(".safetensors")
        apply_patch(work / "out", work / "out" / "tasks" / f"{task}.patch", work / task)
        rebuilt[task] = work / task / "model.safetensors"  # the merged model is a directory
    return rebuilt, rep.tasks, merge_s, cfg


def _sizes(tasks: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    keep = ("bytes", "parameters", "bits_per_parameter", "mask_bits_per_parameter")
    return {n: {k: w[k] for k in keep} for n, w in tasks.items()}


def tall_masks(
    inputs: Sequence[Path], work: Path, val: Scorer, test: Scorer, seed: int
) -> dict[str, Any]:
    """``tall_masks`` with ``mask_lambda`` picked per task on validation."""
    best: dict[str, tuple[float, float, float]] = {}
    sizes: dict[str, Any] = {}
    grid: list[dict[str, Any]] = []
    merge_s: list[float] = []
    cfg: dict[str, Any] = {}
    for lam in MASK_LAMBDAS:
        rebuilt, tasks, secs, cfg = merge_and_rebuild(
            "tall_masks", inputs, {"weight": 1.0, "mask_lambda": lam}, work / f"tall-{lam}", seed
        )
        merge_s.append(round(secs, 1))
        sizes = _sizes(tasks)
        scores = {}
        for n, p in rebuilt.items():
            v = val(p, n)
            scores[n] = v
            if n not in best or v > best[n][0]:
                best[n] = (v, test(p, n), lam)
        grid.append({"mask_lambda": lam, "val": scores, "merge_s": round(secs, 1)})
        log(f"  tall_masks mask_lambda={lam}: val {scores} (merge {secs:.1f} s)")
        shutil.rmtree(work / f"tall-{lam}")
    chosen = {n: b[2] for n, b in best.items()}
    cfg["models"][0]["parameters"] = {"mask_lambda": "per task on val"}
    return {"test": {n: b[1] for n, b in best.items()}, "val": {n: b[0] for n, b in best.items()},
            "mask_lambda": chosen, "tasks": sizes, "merge_s": merge_s[-1],
            "merge_s_all": merge_s, "grid": grid, "config": cfg}  # fmt: skip


def emr(inputs: Sequence[Path], work: Path, test: Scorer, seed: int) -> dict[str, Any]:
    """``emr`` (tuning-free): every rebuilt task scored on test."""
    rebuilt, tasks, secs, cfg = merge_and_rebuild("emr", inputs, {"weight": 1.0}, work, seed)
    log(f"  emr: merge {secs:.1f} s")
    out = {"test": {n: test(p, n) for n, p in rebuilt.items()}, "tasks": _sizes(tasks),
           "merge_s": round(secs, 1), "config": cfg}  # fmt: skip
    shutil.rmtree(work)
    return out


def mask_grid(row: Mapping[str, Any]) -> list[float]:
    """The ``mask_lambda`` values a ``tall_masks`` row tried, in order."""
    return [float(g["mask_lambda"]) for g in row["grid"]]


def run(
    contributors: Sequence[Contributor], work: Path, val: Scorer, test: Scorer, seed: int
) -> dict[str, dict[str, Any]]:
    """Both methods (cached per method in ``work/<method>.json``): {method: merges entry}.
    A cached ``tall_masks`` row of another ``mask_lambda`` grid is moved to
    ``tall_masks-grid<N>.json`` (N its grid's size) and the row is computed again."""
    inputs = link_inputs(contributors, work / "inputs")
    out: dict[str, dict[str, Any]] = {}
    for method in ("tall_masks", "emr"):
        cache = work / f"{method}.json"
        if cache.is_file():
            row = json.loads(cache.read_text())
            if method != "tall_masks" or mask_grid(row) == list(MASK_LAMBDAS):
                out[method] = row
                continue
            cache.rename(work / f"{method}-grid{len(mask_grid(row))}.json")
        if method == "tall_masks":
            out[method] = tall_masks(inputs, work / method, val, test, seed)
        else:
            out[method] = emr(inputs, work / method, test, seed)
        save_json(cache, out[method])
        log(f"  {method}: test {out[method]['test']}")
    return out

"""Merging the contributors' encoders with every potluck method; grid search on validation.

Every merge goes through ``potluck.ops.merge.run.run_merge`` with a mergekit-style config; the
data-aware methods read the statistics files the contributors published.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import model

from .stages import log

#: method → grid of (top-level parameters, per-model parameters). λ / density only.
GRID: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]] = {
    "linear": [({}, {"weight": 1.0})],
    "task_arithmetic": [({"lambda": lam}, {"weight": 1.0}) for lam in (0.3, 0.5, 0.7, 1.0)],
    "ties": [
        ({"lambda": lam}, {"weight": 1.0, "density": d}) for d in (0.2, 0.5) for lam in (0.7, 1.0)
    ],
    "dare_linear": [({"lambda": lam}, {"weight": 1.0, "density": 0.5}) for lam in (0.3, 0.5)],
    "dare_ties": [({"lambda": lam}, {"weight": 1.0, "density": 0.5}) for lam in (0.7, 1.0)],
    "breadcrumbs_ties": [
        ({"lambda": lam}, {"weight": 1.0, "density": 0.8, "gamma": 0.01}) for lam in (0.7, 1.0)
    ],
    # the int64 position_ids buffer has no Fisher: averaged (it is equal in all models)
    "fisher": [({"missing": "average"}, {"weight": 1.0})],
    "regmean": [({"alpha": a}, {"weight": 1.0}) for a in (0.5, 0.9)],
    # potluck's extension: RegMean also over the embeddings, from their lookup counts
    # (``potluck stats gram --embeddings``); same α grid. Added after the first runs.
    "regmean_emb": [({"alpha": a}, {"weight": 1.0}) for a in (0.5, 0.9)],
    # TSV-Merge (added with the method, after the first runs); the paper uses α = 1
    "tsv": [({"alpha": a}, {"weight": 1.0}) for a in (0.7, 1.0)],
    # issue 16's methods (added after the TSV runs). Iso-C / Iso-CTS: the paper tunes α on
    # held-out data; these three points bracket the neutral 1.
    "iso_c": [({"alpha": a}, {"weight": 1.0}) for a in (0.7, 1.0, 1.3)],
    "iso_cts": [({"alpha": a}, {"weight": 1.0}) for a in (0.7, 1.0, 1.3)],
    # LiNeS on task arithmetic and on TIES (λ and density at their usual best here)
    "ta_lines": [({"lambda": 1.0, "lines": {"alpha": a, "beta": 1.0 - a}}, {"weight": 1.0})
                 for a in (0.2, 0.4)],
    "ties_lines": [({"lambda": 1.0, "lines": {"alpha": a, "beta": 1.0 - a}},
                    {"weight": 1.0, "density": 0.2}) for a in (0.2, 0.4)],
    # TALL-mask consensus (k = 2, mask_lambda 0.4) on task arithmetic and on TIES
    "consensus": [
        ({"base_method": "task_arithmetic", "lambda": lam, "k": 2}, {"weight": 1.0})
        for lam in (0.5, 1.0)
    ] + [({"base_method": "ties", "lambda": 1.0, "k": 2}, {"weight": 1.0, "density": 0.2})],
    # AdaMerging, layer-wise (added after the issue-16 runs): λ learned on each task's unlabelled
    # training texts with the bench's own forward (``adamerging``), 100 Adam steps from the
    # paper's init 0.3; lr is the grid (the paper: 1e-3 over 500 steps)
    "adamerging": [({"init": 0.3, "lr": lr, "steps": 100}, {}) for lr in (1e-3, 1e-2)],
}  # fmt: skip
#: Methods whose per-model weights are learned before the merge (grid point → config).
LEARNED = ("adamerging",)
STATS_KIND = {"fisher": "fisher", "regmean": "gram", "regmean_emb": "gram_emb"}
#: Methods whose merge is θ_base + s·M with M independent of the grid's scale parameter ``s``
#: (Iso-C and Iso-CTS: θ_base + α·σ̄·U·Vᵀ per matrix, θ_base + α·mean τ elsewhere): the first
#: grid point is merged, the others are θ_base + (s / s₀)·(merged − θ_base) (``scaled_copy``;
#: equal to a merge at s up to float32 rounding) — their SVDs cost minutes per merge here.
LINEAR_IN = {"iso_c": "alpha", "iso_cts": "alpha"}
#: grid name → potluck merge method, where they differ
METHOD_OF = {"regmean_emb": "regmean", "ta_lines": "task_arithmetic", "ties_lines": "ties"}


@dataclass(frozen=True)
class Contributor:
    """One fine-tune: its task, encoder file, head file and statistics files."""

    task: str
    encoder: Path
    head: Path
    stats: Mapping[str, Path]


def merge_config(
    method: str,
    top: Mapping[str, Any],
    per_model: Mapping[str, Any],
    contributors: Sequence[Contributor],
    seed: int,
) -> dict[str, Any]:
    """A mergekit-style config dict for merging the contributors' encoders."""
    kind = STATS_KIND.get(method)
    models = []
    for c in contributors:
        entry: dict[str, Any] = {"model": str(c.encoder), "parameters": dict(per_model)}
        if kind:
            entry["stats"] = str(c.stats[kind])
        models.append(entry)
    real = METHOD_OF.get(method, method)
    cfg: dict[str, Any] = {"merge_method": real, "models": models, "seed": seed}
    cfg["parameters"] = dict(top)
    if real not in ("linear", "fisher", "regmean"):
        cfg["base_model"] = str(model.base_weights())
    cfg["dtype"] = "float32"
    return cfg


#: Merge worker processes (``--threads`` of ``python -m bench.quality`` sets it).
WORKERS = 2


def run_one(cfg: Mapping[str, Any], out: Path) -> Path:
    """Run ``potluck merge`` on ``cfg`` (bench records under ``adamerging`` left out); the
    merged weights file."""
    from potluck.ops.merge.config import parse_config
    from potluck.ops.merge.run import run_merge

    if out.exists():
        shutil.rmtree(out)
    merge_cfg = {k: v for k, v in cfg.items() if k != "adamerging"}
    run_merge(parse_config(merge_cfg), out, workers=WORKERS)
    files = sorted(out.glob("*.safetensors"))
    if len(files) != 1:
        raise RuntimeError(f"{out}: expected one safetensors file, got {files}")
    return files[0]


def scaled_copy(merged: Path, factor: float, out: Path) -> Path:
    """``out/<name>``: θ_base + factor·(merged − θ_base) for the floating tensors of ``merged``
    (others copied), in ``merged``'s dtypes."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    base, got = load_file(str(model.base_weights())), load_file(str(merged))
    result = {}
    for name, arr in got.items():
        if np.issubdtype(arr.dtype, np.floating):
            b = base[name].astype(np.float64)
            arr = (b + factor * (arr.astype(np.float64) - b)).astype(arr.dtype)
        result[name] = arr
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    save_file(result, str(out / merged.name), metadata={"format": "pt"})
    return out / merged.name


Scorer = Callable[[Path], dict[str, float]]


def grid_search(
    method: str,
    contributors: Sequence[Contributor],
    work: Path,
    val_scores: Scorer,
    seed: int,
) -> dict[str, Any]:
    """Every grid point of ``method`` merged and scored on validation; the best kept on disk."""
    best: dict[str, Any] = {}
    tried = []
    first: tuple[Path, float] | None = None  # LINEAR_IN: (merged weights kept, its scale)
    key = LINEAR_IN.get(method)
    for i, (top, per_model) in enumerate(GRID[method]):
        t0 = time.perf_counter()
        cfg = merge_config(method, top, per_model, contributors, seed)
        if method in LEARNED:
            from . import adamerging

            cfg = adamerging.with_learned_weights(cfg, contributors, seed)
        if key and first:
            weights = scaled_copy(first[0], float(top[key]) / first[1], work / f"{method}-{i}")
        else:
            weights = run_one(cfg, work / f"{method}-{i}")
            if key:
                kept = work / f"{method}-first"
                first = (scaled_copy(weights, 1.0, kept), float(top[key]))
        merge_s = time.perf_counter() - t0
        val = val_scores(weights)
        mean = sum(val.values()) / len(val)
        tried.append({"top": top, "per_model": per_model, "val_mean": mean, "val": val,
                      "merge_s": round(merge_s, 1)})  # fmt: skip
        log(f"  {method} {top} {per_model}: val {mean:.4f}  (merge {merge_s:.1f} s)")
        if not best or mean > best["val_mean"]:
            if best:
                shutil.rmtree(best["dir"])
            best = {"dir": str(weights.parent), "weights": str(weights), "config": cfg,
                    "val_mean": mean, "val": val, "merge_s": round(merge_s, 1)}  # fmt: skip
        else:
            shutil.rmtree(weights.parent)
    if first:
        shutil.rmtree(first[0].parent)
        best["merge_s"] = tried[0]["merge_s"]  # the one real merge (others are rescaled copies)
    best["grid"] = tried
    return best


def save_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")

"""Import lm-evaluation-harness output: ``results_*.json`` and, when given, the per-task
``samples_<task>_*.jsonl`` files written with ``--log_samples``.

Every ``METRIC,FILTER`` value of a task becomes a ``community`` record (potluck did not run it)
with its ``METRIC_stderr,FILTER``, the sample count, batch size, device and seed from the run's
config. A task's suite digest covers the harness's own task hash (dataset and prompt), the task
version, dataset path/name/split, prompt template, few-shot count, metric and filter. With a
samples file the per-item values of the metric become an outcomes object (items keyed by
``doc_id``); without one the record has no outcomes and the gate cannot run a paired test.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from potluck.errors import UserError
from potluck.ops.evals.records import EvalRecord, Outcomes, make_outcomes
from potluck.ops.evals.suite import task_digest


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read lm-eval results ({e})", path=str(path)) from e
    if not isinstance(doc, dict) or not isinstance(doc.get("results"), dict):
        raise UserError(
            f"{path}: not an lm-evaluation-harness results file (no 'results' object)",
            hint="give the results_*.json that lm_eval --output_path wrote",
        )
    return doc


def _suite(doc: Mapping[str, Any], task: str, metric: str, filt: str) -> dict[str, Any]:
    cfg = doc.get("configs", {}).get(task, {}) or {}
    template = cfg.get("doc_to_text")
    described = {
        "task": task, "version": str(doc.get("versions", {}).get(task, "?")),
        "dataset": {
            "lm_eval_task_hash": doc.get("task_hashes", {}).get(task),
            "path": cfg.get("dataset_path"), "name": cfg.get("dataset_name"),
            "split": cfg.get("test_split") or cfg.get("validation_split"),
        },
        "metric": metric, "filter": filt, "n_shot": doc.get("n-shot", {}).get(task),
        "direction": _direction(doc, task, metric),
        "prompt_template": template if isinstance(template, str) else None,
    }  # fmt: skip
    return {**described, "digest": task_digest(described)}


def _direction(doc: Mapping[str, Any], task: str, metric: str) -> str:
    hib = doc.get("higher_is_better", {}).get(task, {}).get(metric, True)
    return "higher" if hib is not False else "lower"


def _n(doc: Mapping[str, Any], task: str) -> int:
    ns = doc.get("n-samples", {}).get(task, {})
    n = ns.get("effective", ns.get("original", 0)) if isinstance(ns, Mapping) else 0
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else 0


def _samples(path: Path, metric: str, filt: str) -> Outcomes:
    ids: list[str] = []
    values: list[float] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise UserError(f"{path}:{lineno}: not JSON", path=str(path)) from None
            if row.get("filter", filt) != filt:
                continue
            v = row.get(metric)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise UserError(
                    f"{path}:{lineno}: no numeric {metric!r} for doc {row.get('doc_id')}",
                    hint="give the samples file of the same run",
                )
            ids.append(str(row.get("doc_id")))
            values.append(float(v))
    return make_outcomes(ids, values)


def _config(doc: Mapping[str, Any]) -> tuple[str | None, int | None, list[int]]:
    cfg = doc.get("config", {}) or {}
    bs = cfg.get("batch_size")
    seeds = [s for s in (cfg.get("random_seed"), cfg.get("numpy_seed"), cfg.get("torch_seed"))
             if isinstance(s, int) and not isinstance(s, bool)]  # fmt: skip
    device = cfg.get("device")
    return (
        device if isinstance(device, str) else None,
        bs if isinstance(bs, int) and not isinstance(bs, bool) else None,
        list(dict.fromkeys(seeds)),
    )


def import_results(
    results: str | Path, samples: Sequence[str | Path], weights: str
) -> list[tuple[EvalRecord, Outcomes | None]]:
    """Records (and outcomes where a samples file covers the task) for the weights digest
    ``weights``. A samples file is matched to its task by the ``samples_<task>_`` file name."""
    doc = _read_json(Path(results))
    device, bs, seeds = _config(doc)
    by_task = {_sample_task(Path(p), doc["results"]): Path(p) for p in samples}
    runner = {"name": "lm-evaluation-harness", "version": doc.get("lm_eval_version"),
              "model": doc.get("model_name"), "git_hash": doc.get("git_hash")}  # fmt: skip
    out: list[tuple[EvalRecord, Outcomes | None]] = []
    for task, metrics in sorted(doc["results"].items()):
        for key, value in sorted(metrics.items()):
            metric, sep, filt = key.partition(",")
            if not sep or metric.endswith("_stderr") or not isinstance(value, int | float):
                continue
            se = metrics.get(f"{metric}_stderr,{filt}")
            oc = _samples(by_task[task], metric, filt) if task in by_task else None
            rec = EvalRecord(
                weights=weights, suite=_suite(doc, task, metric, filt), metric=metric,
                direction=_direction(doc, task, metric), value=float(value),
                stderr=float(se) if isinstance(se, int | float) and math.isfinite(se) else None,
                n=_n(doc, task) or (0 if oc is None else int(oc.values.size)),
                trust="community", runner=runner, seeds=seeds, device=device, batch_size=bs,
                outcomes=None if oc is None else oc.oid,
            )  # fmt: skip
            out.append((rec, oc))
    if not out:
        raise UserError(f"{results}: no metric values found", hint="check the results file")
    return out


def _sample_task(path: Path, tasks: Mapping[str, Any]) -> str:
    name = path.name
    for task in sorted(tasks, key=len, reverse=True):
        if name.startswith(f"samples_{task}_") or name == f"samples_{task}.jsonl":
            return task
    raise UserError(
        f"{path}: not a samples file of a task in the results ({', '.join(sorted(tasks))})",
        hint="lm_eval --log_samples writes samples_<task>_<date>.jsonl next to the results",
    )

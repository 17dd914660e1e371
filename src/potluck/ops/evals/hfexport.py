"""Records as Hugging Face Hub evaluation metadata: ``.eval_results/*.yaml`` files and a
``model-index`` block for a model card's YAML front matter.

The Hub formats have no field for a weights digest, standard error, sample count or seeds; they
go into each result's ``source``/``notes`` text and the ``verified`` flag maps from ``trust``,
so nothing potluck knows is dropped silently.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from potluck.fileio import atomic_writer
from potluck.ops.evals.records import EvalRecord

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _dataset(rec: EvalRecord) -> dict[str, Any]:
    ds = rec.suite.get("dataset", {}) or {}
    name = ds.get("path") or ds.get("file") or ds.get("package") or rec.task
    out: dict[str, Any] = {"name": str(rec.task), "type": str(name)}
    if ds.get("split"):
        out["split"] = str(ds["split"])
    if ds.get("name"):
        out["config"] = str(ds["name"])
    return out


def _notes(rec: EvalRecord) -> str:
    se = "" if rec.stderr is None else f" ± {rec.stderr:.4g} (stderr)"
    return (
        f"potluck record {rec.id[:12]}: weights {rec.weights}, suite {rec.suite_digest}, "
        f"n={rec.n}{se}, seeds={list(rec.seeds)}, runner {rec.runner.get('name')}"
    )


def model_index(model_name: str, records: Sequence[EvalRecord]) -> dict[str, Any]:
    """The ``model-index`` block (one result per task and metric)."""
    results = []
    for rec in records:
        if rec.kind != "score":
            continue
        results.append({
            "task": {"type": "text-classification" if rec.metric == "accuracy" else "other",
                     "name": rec.task},
            "dataset": _dataset(rec),
            "metrics": [{"type": rec.metric, "value": rec.value, "name": rec.metric,
                         "verified": rec.trust == "verified"}],
            "source": {"name": "potluck", "url": f"potluck:{rec.id}"},
        })  # fmt: skip
    return {"model-index": [{"name": model_name, "results": results}]}


def eval_result_doc(rec: EvalRecord) -> dict[str, Any]:
    """One ``.eval_results`` document (list of results, as the Hub reads them)."""
    ds = _dataset(rec)
    entry: dict[str, Any] = {
        "dataset": {"id": ds["type"], "task_id": rec.task},
        "value": rec.value,
        "notes": _notes(rec),
        "source": {"name": f"potluck record {rec.id[:12]}"},
    }
    return entry


def write_hf(out_dir: Path, model_name: str, records: Sequence[EvalRecord]) -> list[Path]:
    """Write ``.eval_results/<task>.yaml`` (one file per task) and ``model-index.yaml``."""
    scores = [r for r in records if r.kind == "score"]
    by_task: dict[str, list[dict[str, Any]]] = {}
    for rec in scores:
        by_task.setdefault(rec.task, []).append(eval_result_doc(rec))
    written = []
    for task, entries in sorted(by_task.items()):
        path = out_dir / ".eval_results" / f"{_SAFE.sub('_', task)}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_writer(path) as f:
            f.write(yaml.safe_dump(entries, sort_keys=False, allow_unicode=True).encode())
        written.append(path)
    index = out_dir / "model-index.yaml"
    with atomic_writer(index) as f:
        f.write(yaml.safe_dump(model_index(model_name, scores), sort_keys=False).encode())
    return [*written, index]

"""Running a suite on a model directory: per-item outcomes and one record per task.

The suite's loader (``module:function``) gets the model directory and returns ``predict``, a
function from a list of items (dicts; ``prompt`` added when the task has a template) to one
prediction per item. ``accuracy`` scores ``prediction == item["label"]`` (0/1 per item);
``score`` takes the prediction itself as the item's number. Built-in loader:
``potluck.ops.evals.hf:sequence_classifier`` (torch + transformers).
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from potluck.errors import UserError
from potluck.ops.evals.records import EvalRecord, Outcomes, make_outcomes, potluck_version
from potluck.ops.evals.stats import mean_stderr
from potluck.ops.evals.suite import Item, Suite, Task, resolve

Predict = Callable[[list[Item]], Sequence[Any]]


@dataclass(frozen=True)
class TaskResult:
    """A task's record and its outcomes object."""

    record: EvalRecord
    outcomes: Outcomes


def _prompted(items: Sequence[Item], template: str | None) -> list[Item]:
    if template is None:
        return list(items)
    out = []
    for it in items:
        try:
            out.append({**it, "prompt": template.format(**it)})
        except (KeyError, IndexError, ValueError) as e:
            raise UserError(
                f"item {it.get('id')}: prompt template {template!r} does not fit ({e})",
                hint="name the item's fields in {braces}",
            ) from e
    return out


def _outcome(task: Task, item: Item, pred: Any) -> float:
    if task.metric == "accuracy":
        if "label" not in item:
            raise UserError(f"task {task.name}: item {item['id']} has no label")
        return float(bool(np.all(np.asarray(pred) == np.asarray(item["label"]))))
    try:
        value = float(pred)
    except (TypeError, ValueError):
        raise UserError(f"task {task.name}: the model's score {pred!r} is not a number") from None
    return value


def task_outcomes(task: Task, predict: Predict) -> Outcomes:
    """Run ``predict`` over the task's items in batches of ``task.batch_size``."""
    items = _prompted(task.items, task.prompt_template)
    values: list[float] = []
    for start in range(0, len(items), task.batch_size):
        batch = items[start : start + task.batch_size]
        preds = list(predict(batch))
        if len(preds) != len(batch):
            raise UserError(
                f"task {task.name}: the model gave {len(preds)} predictions for {len(batch)} items",
                hint="predict returns one prediction per item",
            )
        values += [_outcome(task, it, p) for it, p in zip(batch, preds, strict=True)]
    return make_outcomes([str(it["id"]) for it in items], values)


def task_record(
    task: Task, outcomes: Outcomes, weights: str, *, loader: str, device: str
) -> EvalRecord:
    """The ``verified`` record of ``outcomes`` (potluck ran it)."""
    value, se = mean_stderr(outcomes.values)
    return EvalRecord(
        weights=weights, suite=task.suite_field(), metric=task.metric,
        direction=task.direction, value=value, stderr=se, n=int(outcomes.values.size),
        trust="verified", seeds=[task.seed], device=device, batch_size=task.batch_size,
        outcomes=outcomes.oid,
        runner={"name": "potluck", "version": potluck_version(), "loader": loader,
                "python": platform.python_version()},
    )  # fmt: skip


def run_suite(
    suite: Suite,
    model_dir: Path,
    weights: str,
    *,
    tasks: Sequence[Task] | None = None,
    device: str = "cpu",
) -> list[TaskResult]:
    """Evaluate the model in ``model_dir`` (weights digest ``weights``) on the suite's tasks."""
    if suite.loader is None:
        raise UserError(f"suite {suite.name}: no loader", hint="add 'loader: module:function'")
    predict = resolve(suite.loader, f"suite {suite.name}")(model_dir)
    out = []
    for task in tasks if tasks is not None else suite.tasks:
        oc = task_outcomes(task, predict)
        out.append(
            TaskResult(task_record(task, oc, weights, loader=suite.loader, device=device), oc)
        )
    return out

"""Evaluation suites: a small YAML/JSON file naming tasks, their datasets, metrics and a model
loader, and each task's digest (what two records must share to be compared).

::

    potluck_suite: 1
    name: demo
    loader: potluck.demo.communal_story:load_model     # module:function(model_dir) -> predict
    tasks:
      - name: copy
        version: 1
        dataset: {path: copy.jsonl, split: test}        # or {npz: x.npz} / {package: mod:fn}
        metric: accuracy                                # accuracy | score (+ direction)
        prompt_template: "{text}"
        tolerance: 0.01
        batch_size: 16
      - name: hellaswag                                 # external: records imported or run
        digest: 5f0c...                                 # elsewhere, compared by this digest

A task's digest is the sha256 of the canonical JSON of its name, version, the sha256 of the
dataset's bytes (or of a packaged dataset's canonical items), split, prompt template, metric and
direction. Device, batch size and the loader are recorded but not part of the digest.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from potluck.errors import UserError
from potluck.tensors.digests import canonical_json

SUITE_SCHEMA = 1
METRICS = {"accuracy": "higher", "score": None}
Item = dict[str, Any]


def task_digest(described: Mapping[str, Any]) -> str:
    """A task's digest: sha256 of the canonical JSON of what it measures."""
    doc = {"potluck_suite_task": "1", **described}
    return hashlib.sha256(canonical_json(doc).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Task:
    """One task of a suite, with its items loaded and its digest computed."""

    name: str
    version: str
    dataset: Mapping[str, Any]
    items: tuple[Item, ...]
    metric: str
    direction: str
    prompt_template: str | None
    tolerance: float
    batch_size: int
    seed: int
    external: str | None = None

    def describe(self) -> dict[str, Any]:
        """The fields the digest covers (stored in every record as ``suite``)."""
        return {
            "task": self.name, "version": self.version, "dataset": dict(self.dataset),
            "metric": self.metric, "direction": self.direction,
            "prompt_template": self.prompt_template,
        }  # fmt: skip

    @property
    def digest(self) -> str:
        """sha256 of the canonical JSON of ``describe()`` (an external task: the digest the
        suite names)."""
        return self.external or task_digest(self.describe())

    def suite_field(self) -> dict[str, Any]:
        """``describe()`` plus the digest: a record's ``suite`` value."""
        return {**self.describe(), "digest": self.digest}


@dataclass(frozen=True)
class Suite:
    """A suite file: its tasks and the model loader (``module:function``)."""

    name: str
    loader: str | None
    tasks: tuple[Task, ...]


def _err(where: str, msg: str, hint: str = "see docs/evaluations.md") -> UserError:
    return UserError(f"{where}: {msg}", hint=hint, path=where)


def resolve(spec: str, where: str) -> Callable[..., Any]:
    """``module:function`` → the function."""
    mod, _, fn = spec.partition(":")
    try:
        found = getattr(importlib.import_module(mod), fn) if mod and fn else None
    except ImportError as e:
        raise _err(where, f"cannot import {spec!r} ({e})") from e
    if not callable(found):
        raise _err(where, f"{spec!r} is not a module:function", "write e.g. mypkg.models:load")
    return found  # type: ignore[no-any-return]


def _jsonl_items(path: Path) -> list[Item]:
    items: list[Item] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise _err(f"{path}:{lineno}", "not JSON", "one JSON object per line") from None
            if not isinstance(row, dict):
                raise _err(f"{path}:{lineno}", "not a JSON object", "one JSON object per line")
            row.setdefault("id", str(len(items)))
            items.append(row)
    return items


def _npz_items(path: Path) -> list[Item]:
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: np.asarray(z[k]) for k in z.files}
    sizes = {len(v) for v in arrays.values() if v.ndim > 0}
    if len(sizes) != 1:
        raise _err(str(path), "arrays of different lengths", "one row per item in every array")
    ids = [str(x) for x in arrays.pop("id", np.arange(sizes.pop()))]
    return [{"id": i, **{k: v[n] for k, v in arrays.items()}} for n, i in enumerate(ids)]


def _dataset(spec: object, base: Path, where: str) -> tuple[dict[str, Any], list[Item]]:
    if not isinstance(spec, Mapping):
        raise _err(where, "dataset must be {path|npz|package: ..., split: ...}")
    split = str(spec.get("split", "test"))
    if "package" in spec:
        items = list(resolve(str(spec["package"]), where)(split))
        sha = hashlib.sha256(canonical_json(items).encode("utf-8")).hexdigest()
        return {"package": str(spec["package"]), "sha256": sha, "split": split}, items
    key = "npz" if "npz" in spec else "path"
    path = base / str(spec.get(key, ""))
    if not path.is_file():
        raise _err(where, f"dataset file {path} does not exist", "paths are relative to the suite")
    items = _npz_items(path) if key == "npz" or path.suffix == ".npz" else _jsonl_items(path)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    return {"file": path.name, "sha256": sha, "split": split}, items


def _external(raw: Mapping[str, Any], where: str, default_tol: float) -> Task:
    digest, tol = raw.get("digest"), raw.get("tolerance", default_tol)
    if not isinstance(digest, str) or len(digest) != 64 or set(digest) - set("0123456789abcdef"):
        raise _err(where, "an external task's digest is a 64-hex suite digest")
    if not isinstance(tol, int | float) or tol < 0:
        raise _err(where, "tolerance is a number >= 0")
    return Task(
        str(raw["name"]), "", {}, (), "", "higher", None, float(tol), 1,
        int(raw.get("seed", 0)), external=digest,
    )  # fmt: skip


def _task(raw: object, base: Path, where: str, default_tol: float) -> Task:
    if not isinstance(raw, Mapping) or not isinstance(raw.get("name"), str):
        raise _err(where, "each task needs a name")
    where = f"{where}: task {raw['name']}"
    if "digest" in raw:
        return _external(raw, where, default_tol)
    metric = str(raw.get("metric", "accuracy"))
    if metric not in METRICS:
        raise _err(where, f"unknown metric {metric!r}", "accuracy, or score with a direction")
    direction = str(raw.get("direction", METRICS[metric] or ""))
    if direction not in ("higher", "lower"):
        raise _err(where, "metric 'score' needs direction: higher|lower")
    dataset, items = _dataset(raw.get("dataset"), base, where)
    if not items:
        raise _err(where, "the dataset has no items")
    tol, bs, seed = raw.get("tolerance", default_tol), raw.get("batch_size", 32), raw.get("seed", 0)
    if not isinstance(tol, int | float) or tol < 0 or not isinstance(bs, int) or bs < 1:
        raise _err(where, "tolerance is a number >= 0, batch_size an integer >= 1")
    template = raw.get("prompt_template")
    return Task(
        raw["name"], str(raw.get("version", "1")), dataset, tuple(items), metric, direction,
        None if template is None else str(template), float(tol), bs, int(seed),
    )  # fmt: skip


def load_suite(path: str | Path, tolerance: float = 0.0) -> Suite:
    """Read and check a suite file, load its datasets; ``tolerance`` is the default margin."""
    p = Path(path)
    try:
        doc = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise _err(str(p), f"cannot read the suite ({e})") from e
    if not isinstance(doc, Mapping) or doc.get("potluck_suite") != SUITE_SCHEMA:
        raise _err(str(p), "not a suite file (needs 'potluck_suite: 1')")
    tasks = doc.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise _err(str(p), "no tasks")
    loader = doc.get("loader")
    built = tuple(_task(t, p.parent, str(p), tolerance) for t in tasks)
    if len({t.name for t in built}) != len(built):
        raise _err(str(p), "two tasks have the same name")
    return Suite(str(doc.get("name", p.stem)), None if loader is None else str(loader), built)

"""Evaluation records (schema ``potluck_eval: 1``) and per-item outcome objects.

A record says: these exact weights (``weights``, a ``weights_digest``) scored ``value`` on this
exact task (``suite``: its digest pins the dataset content, split, task version, prompt template
and metric), with standard error, sample count, seeds, device, batch size, the runner, whether
potluck ran it (``verified``) or it was imported/typed in (``community``), and the id of the
per-item outcomes object when there is one. A record's id is the sha256 of its canonical JSON,
so the same record written twice is one record. See docs/evaluations.md.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from potluck.errors import UserError
from potluck.tensors.digests import canonical_json

SCHEMA = "1"
OUTCOMES_SCHEMA = "1"
TRUST = ("verified", "community")
DIRECTIONS = ("higher", "lower")
KINDS = ("score", "gate")
_HEX = frozenset("0123456789abcdef")


def potluck_version() -> str:
    """The installed potluck's version (a runner field of every record potluck writes)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("potluck")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0.0.0"


def is_digest(value: object) -> bool:
    """A lowercase 64-hex sha256."""
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX


def _bad(what: str, value: object, hint: str) -> UserError:
    return UserError(f"evaluation record: bad {what} {value!r}", hint=hint, field=what)


@dataclass(frozen=True)
class EvalRecord:
    """One evaluation of one task on exact weights (or one gate verdict, ``kind="gate"``)."""

    weights: str
    suite: Mapping[str, Any]
    metric: str
    direction: str
    value: float
    stderr: float | None
    n: int
    trust: str
    runner: Mapping[str, Any]
    seeds: Sequence[int] = ()
    device: str | None = None
    batch_size: int | None = None
    outcomes: str | None = None
    kind: str = "score"
    gate: Mapping[str, Any] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def suite_digest(self) -> str:
        """The digest of the task this record is about."""
        return str(self.suite["digest"])

    @property
    def task(self) -> str:
        """The task's name."""
        return str(self.suite.get("task", "?"))

    def to_dict(self) -> dict[str, Any]:
        """The canonical JSON-ready form (what is stored)."""
        doc: dict[str, Any] = {
            "potluck_eval": SCHEMA, "kind": self.kind, "weights": self.weights,
            "suite": dict(self.suite), "metric": self.metric, "direction": self.direction,
            "value": self.value, "stderr": self.stderr, "n": self.n, "seeds": list(self.seeds),
            "device": self.device, "batch_size": self.batch_size, "outcomes": self.outcomes,
            "runner": dict(self.runner), "trust": self.trust,
        }  # fmt: skip
        if self.gate is not None:
            doc["gate"] = dict(self.gate)
        if self.extra:
            doc["extra"] = dict(self.extra)
        return doc

    def dumps(self) -> bytes:
        """Canonical JSON bytes (sorted keys, compact) and a newline."""
        return (canonical_json(self.to_dict()) + "\n").encode("utf-8")

    @property
    def id(self) -> str:
        """sha256 of the canonical bytes."""
        return hashlib.sha256(self.dumps()).hexdigest()


def _finite(what: str, v: object, *, optional: bool = False) -> float | None:
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise _bad(what, v, f"{what} is a finite number")
    return float(v)


def _count(what: str, v: object, *, optional: bool = False) -> int | None:
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise _bad(what, v, f"{what} is a non-negative integer")
    return v


def _choice(what: str, v: object, allowed: Sequence[str]) -> str:
    if v not in allowed:
        raise _bad(what, v, f"{what} is one of {', '.join(allowed)}")
    return str(v)


def _suite(v: object) -> dict[str, Any]:
    if not isinstance(v, Mapping) or not is_digest(v.get("digest")):
        raise _bad("suite", v, "suite is an object with a sha256 'digest' and the task's fields")
    return dict(v)


def _seeds(v: object) -> list[int]:
    if not isinstance(v, list) or not all(
        isinstance(s, int) and not isinstance(s, bool) for s in v
    ):
        raise _bad("seeds", v, "seeds is a list of integers")
    return list(v)


def record_from_dict(doc: object) -> EvalRecord:
    """Validate a stored or imported record; ``UserError`` naming the first bad field."""
    if not isinstance(doc, Mapping) or doc.get("potluck_eval") != SCHEMA:
        raise UserError(
            "not a potluck evaluation record (schema 'potluck_eval': '1')",
            hint="see docs/evaluations.md for the schema",
        )
    if not is_digest(doc.get("weights")):
        raise _bad("weights", doc.get("weights"), "weights is the sha256 weights digest")
    for key in ("outcomes",):
        if doc.get(key) is not None and not is_digest(doc.get(key)):
            raise _bad(key, doc.get(key), f"{key} is null or a sha256 object id")
    runner, metric = doc.get("runner"), doc.get("metric")
    if not isinstance(runner, Mapping) or not isinstance(metric, str) or not metric:
        raise _bad("runner/metric", (runner, metric), "runner is an object, metric a name")
    gate, extra = doc.get("gate"), doc.get("extra", {})
    if (gate is not None and not isinstance(gate, Mapping)) or not isinstance(extra, Mapping):
        raise _bad("gate/extra", (gate, extra), "gate and extra are objects")
    device = doc.get("device")
    if device is not None and not isinstance(device, str):
        raise _bad("device", device, "device is text or null")
    return EvalRecord(
        weights=str(doc["weights"]), suite=_suite(doc.get("suite")), metric=metric,
        direction=_choice("direction", doc.get("direction"), DIRECTIONS),
        value=float(_finite("value", doc.get("value")) or 0.0),
        stderr=_finite("stderr", doc.get("stderr"), optional=True),
        n=int(_count("n", doc.get("n")) or 0), trust=_choice("trust", doc.get("trust"), TRUST),
        runner=dict(runner), seeds=_seeds(doc.get("seeds", [])), device=device,
        batch_size=_count("batch_size", doc.get("batch_size"), optional=True),
        outcomes=doc.get("outcomes"), kind=_choice("kind", doc.get("kind", "score"), KINDS),
        gate=None if gate is None else dict(gate), extra=dict(extra),
    )  # fmt: skip


def record_from_bytes(data: bytes, source: str) -> EvalRecord:
    """Parse stored record bytes (``source`` names them in errors)."""
    try:
        doc = json.loads(data)
    except ValueError as e:
        raise UserError(f"{source}: not JSON ({e})", hint="see docs/evaluations.md") from e
    try:
        return record_from_dict(doc)
    except UserError as e:
        raise UserError(f"{source}: {e.message}", hint=e.hint, **e.data) from e


@dataclass(frozen=True)
class Outcomes:
    """Per-item outcomes of one task: item ids and one number per item."""

    ids: tuple[str, ...]
    values: np.ndarray

    def dumps(self) -> bytes:
        """Canonical JSON bytes of the object (``potluck_outcomes: 1``)."""
        doc = {"potluck_outcomes": OUTCOMES_SCHEMA, "ids": list(self.ids),
               "values": [float(v) for v in self.values]}  # fmt: skip
        return (canonical_json(doc) + "\n").encode("utf-8")

    @property
    def oid(self) -> str:
        """sha256 of the canonical bytes (the id a record references)."""
        return hashlib.sha256(self.dumps()).hexdigest()


def make_outcomes(ids: Sequence[str], values: Sequence[float] | np.ndarray) -> Outcomes:
    """Outcomes with unique ids and finite values, one per item."""
    vals = np.asarray(values, np.float64)
    if len(ids) != vals.size or len(set(ids)) != len(ids):
        raise UserError(
            "per-item outcomes need one value per item and unique item ids",
            hint="check the dataset's ids",
        )
    if not np.all(np.isfinite(vals)):
        raise UserError("per-item outcomes must be finite numbers", hint="check the metric")
    return Outcomes(tuple(str(i) for i in ids), vals)


def outcomes_from_bytes(data: bytes, source: str) -> Outcomes:
    """Parse a stored outcomes object."""
    try:
        doc = json.loads(data)
        if doc.get("potluck_outcomes") != OUTCOMES_SCHEMA:
            raise ValueError("not a potluck_outcomes object")
        return make_outcomes(doc["ids"], doc["values"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(
            f"{source}: bad outcomes object ({e})", hint="see docs/evaluations.md"
        ) from e


def paired(base: Outcomes, cand: Outcomes) -> tuple[np.ndarray, np.ndarray]:
    """The two outcome vectors on the items both have, in ``base``'s order.

    Items only one side has are an error: a paired test needs the same items.
    """
    if set(base.ids) != set(cand.ids):
        missing = len(set(base.ids) ^ set(cand.ids))
        raise UserError(
            f"the two evaluations cover different items ({missing} not in both)",
            hint="evaluate both models on the same suite",
        )
    pos = {i: k for k, i in enumerate(cand.ids)}
    order = np.array([pos[i] for i in base.ids], dtype=np.int64)
    return base.values, cand.values[order]

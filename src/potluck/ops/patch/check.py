"""The quality check of ``patch create --check``: how far the patched tensors are from TARGET.

For each changed tensor the payload is decoded against the base exactly as ``patch apply`` does
(in the tensor's storage dtype, so the final rounding is included) and compared with the target
in float64: ``rel_to_delta`` = ‖decoded − target‖ / ‖target − base‖ and ``rel_to_target`` =
‖decoded − target‖ / ‖target‖ (Frobenius norms; base = 0 for added and reshaped tensors).
``compare_outputs`` measures the change in a model's outputs on an eval set (``OutputChange``;
the torch side that produces the outputs is ``potluck.ops.patch.evaluate``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "OutputChange",
    "QualityReport",
    "TensorQuality",
    "compare_outputs",
    "measure",
    "summarize",
]


@dataclass(frozen=True)
class TensorQuality:
    """The error of one decoded tensor against its target (norms in float64)."""

    name: str
    codec: str
    size: int
    error_norm: float
    delta_norm: float
    target_norm: float

    @property
    def rel_to_delta(self) -> float:
        """‖decoded − target‖ / ‖target − base‖ (0 when both are 0, inf when only Δ is 0)."""
        return _ratio(self.error_norm, self.delta_norm)

    @property
    def rel_to_target(self) -> float:
        """‖decoded − target‖ / ‖target‖ (0 when both are 0, inf when only the target is 0)."""
        return _ratio(self.error_norm, self.target_norm)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (inf becomes null)."""
        return {
            "name": self.name,
            "codec": self.codec,
            "size": self.size,
            "error_norm": self.error_norm,
            "rel_to_delta": _finite(self.rel_to_delta),
            "rel_to_target": _finite(self.rel_to_target),
        }


@dataclass(frozen=True)
class OutputChange:
    """How far the patched model's outputs are from the target model's on an eval set.

    ``output`` names the per-example vector compared (``logits`` of a classifier, else the
    ``mean-pooled logits`` / ``mean-pooled last hidden state`` over non-padding tokens).
    Cosines are per example; ``max_abs_diff`` is the largest |patched − target| element of those
    vectors; ``changed_predictions`` counts examples whose argmax differs (classifiers only).
    """

    task: str
    output: str
    examples: int
    mean_cosine: float
    min_cosine: float
    max_abs_diff: float
    changed_predictions: int | None

    @property
    def changed_fraction(self) -> float | None:
        """``changed_predictions`` / ``examples`` (None without a classification head)."""
        if self.changed_predictions is None:
            return None
        return self.changed_predictions / self.examples if self.examples else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "task": self.task,
            "output": self.output,
            "examples": self.examples,
            "mean_cosine": self.mean_cosine,
            "min_cosine": self.min_cosine,
            "max_abs_diff": self.max_abs_diff,
            "changed_predictions": self.changed_predictions,
            "changed_fraction": self.changed_fraction,
        }


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    """cos(a, b) in float64; 1 for bit-identical vectors, 0 when one of them is all zeros."""
    if np.array_equal(a, b):
        return 1.0
    den = float(np.linalg.norm(a)) * float(np.linalg.norm(b))
    return 0.0 if den == 0 else float(np.clip(np.dot(a, b) / den, -1.0, 1.0))


def compare_outputs(
    target: np.ndarray, patched: np.ndarray, *, task: str, output: str, classify: bool
) -> OutputChange:
    """The ``OutputChange`` between two [N, D] output arrays (row n: example n of each model)."""
    if target.shape != patched.shape or target.ndim != 2:
        raise ValueError(f"output shapes differ or are not [N, D]: {target.shape}, {patched.shape}")
    t64, p64 = target.astype(np.float64), patched.astype(np.float64)
    cos = [_cosine(t, p) for t, p in zip(t64, p64, strict=True)]
    diff = float(np.max(np.abs(t64 - p64))) if t64.size else 0.0
    changed = None
    if classify:
        changed = int(np.count_nonzero(np.argmax(t64, axis=1) != np.argmax(p64, axis=1)))
    return OutputChange(
        task=task,
        output=output,
        examples=len(cos),
        mean_cosine=float(np.mean(cos)) if cos else 1.0,
        min_cosine=min(cos, default=1.0),
        max_abs_diff=diff,
        changed_predictions=changed,
    )


@dataclass(frozen=True)
class QualityReport:
    """Per-tensor errors and their summary.

    ``weighted_rel_to_delta`` / ``weighted_rel_to_target`` are the per-tensor relative errors
    averaged with the tensors' element counts as weights; ``overall_rel_to_delta`` is
    √(Σ‖decoded − target‖²) / √(Σ‖target − base‖²) over all changed tensors. ``outputs`` is the
    change in the model's outputs on an eval set, when one was run (``--check --eval``).
    """

    tensors: list[TensorQuality]
    outputs: OutputChange | None = None

    @property
    def worst(self) -> TensorQuality | None:
        """The tensor with the largest ``rel_to_delta`` (first by name on ties)."""
        return max(self.tensors, key=lambda t: t.rel_to_delta, default=None)

    def weighted(self, attr: str) -> float:
        """Element-count-weighted mean of ``rel_to_delta`` or ``rel_to_target``."""
        total = sum(t.size for t in self.tensors)
        if not total:
            return 0.0
        return sum(t.size * float(getattr(t, attr)) for t in self.tensors) / total

    @property
    def overall_rel_to_delta(self) -> float:
        """Global ‖error‖ / ‖Δ‖ over every changed tensor."""
        err = math.sqrt(sum(t.error_norm**2 for t in self.tensors))
        return _ratio(err, math.sqrt(sum(t.delta_norm**2 for t in self.tensors)))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form: ``tensors``, ``summary`` and ``outputs`` (None when not measured)."""
        worst = self.worst
        return {
            "tensors": [t.to_dict() for t in self.tensors],
            "summary": {
                "worst": None if worst is None else worst.name,
                "worst_rel_to_delta": None if worst is None else _finite(worst.rel_to_delta),
                "weighted_rel_to_delta": _finite(self.weighted("rel_to_delta")),
                "weighted_rel_to_target": _finite(self.weighted("rel_to_target")),
                "overall_rel_to_delta": _finite(self.overall_rel_to_delta),
            },
            "outputs": None if self.outputs is None else self.outputs.to_dict(),
        }


def _ratio(num: float, den: float) -> float:
    if den > 0:
        return num / den
    return 0.0 if num == 0 else math.inf


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _wide(a: np.ndarray) -> np.ndarray:
    return a.astype(np.complex128 if np.iscomplexobj(a) else np.float64)


def _norm(a: np.ndarray) -> float:
    return float(np.linalg.norm(a.reshape(-1)))


def measure(
    name: str, codec: str, decoded: np.ndarray, target: np.ndarray, base: np.ndarray | None
) -> TensorQuality:
    """The ``TensorQuality`` of ``decoded`` against ``target``; ``base`` None means zeros."""
    t64 = _wide(target)
    same = decoded.shape == target.shape and decoded.dtype == target.dtype
    same = (
        same and np.ascontiguousarray(decoded).tobytes() == np.ascontiguousarray(target).tobytes()
    )
    err = 0.0 if same else _norm(_wide(decoded) - t64)  # bit-identical: 0 even with NaNs
    delta = _norm(t64) if base is None else _norm(t64 - _wide(base))
    return TensorQuality(name, codec, int(target.size), err, delta, _norm(t64))


def summarize(items: Sequence[TensorQuality]) -> QualityReport:
    """A report over ``items`` sorted by name."""
    return QualityReport(sorted(items, key=lambda t: t.name))

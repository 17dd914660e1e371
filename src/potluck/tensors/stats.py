"""Summary statistics of a change between two arrays (pure numpy)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class DeltaStats:
    """How ``new`` differs from ``old`` (same shape): norms are of float64 copies."""

    l2: float  # ‖new − old‖₂
    rel: float  # ‖new − old‖₂ / ‖old‖₂ (inf when old is zero and the change is not)
    frac_changed: float  # fraction of entries whose bit pattern changed
    max_abs: float  # max |new − old|
    numel: int

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON output."""
        return asdict(self)


def _as_float(a: np.ndarray) -> np.ndarray:
    """float64 copy (complex tensors keep their complex values as complex128)."""
    return a.astype(np.complex128 if a.dtype.kind == "c" else np.float64)


def delta_stats(old: np.ndarray, new: np.ndarray) -> DeltaStats:
    """Statistics of ``new - old``; both must have the same shape (dtype may differ)."""
    if old.shape != new.shape:
        raise ValueError(f"shape mismatch {old.shape} vs {new.shape}")
    n = int(old.size)
    if n == 0:
        return DeltaStats(0.0, 0.0, 0.0, 0.0, 0)
    if old.dtype == new.dtype:
        ob = old.reshape(-1).view(np.uint8).reshape(n, -1)
        nb = new.reshape(-1).view(np.uint8).reshape(n, -1)
        changed = int(np.count_nonzero((ob != nb).any(axis=1)))
    else:
        changed = int(np.count_nonzero(_as_float(old) != _as_float(new)))
    d = _as_float(new) - _as_float(old)
    with np.errstate(invalid="ignore", over="ignore"):
        l2 = float(np.sqrt(np.sum(np.abs(d) ** 2)))
        base = float(np.sqrt(np.sum(np.abs(_as_float(old)) ** 2)))
        max_abs = float(np.max(np.abs(d)))
    rel = l2 / base if base > 0 else (0.0 if l2 == 0 else float("inf"))
    return DeltaStats(l2, rel, changed / n, max_abs, n)

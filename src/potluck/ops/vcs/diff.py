"""Tensor-level diff of two manifests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from potluck.objects.manifest import Manifest
from potluck.tensors.stats import DeltaStats, delta_stats

Loader = Callable[[str], np.ndarray]


@dataclass(frozen=True)
class TensorChange:
    """One tensor that differs: ``status`` is added, removed, changed, reshaped or retyped."""

    name: str
    status: str
    old: str | None  # "F32[768,768]"
    new: str | None
    stats: DeltaStats | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON output."""
        d: dict[str, Any] = {
            "name": self.name,
            "status": self.status,
            "old": self.old,
            "new": self.new,
        }
        d["stats"] = self.stats.to_dict() if self.stats else None
        return d


def _sig(dtype: str, shape: tuple[int, ...]) -> str:
    return f"{dtype}[{','.join(map(str, shape))}]"


def _described(m: Manifest) -> dict[str, tuple[str, tuple[int, ...], str]]:
    """name → (dtype, shape, identity key) for tensors and views."""
    out = {n: (e.dtype, e.shape, e.oid) for n, e in m.tensors().items()}
    t = m.tensors()
    for v in m.views:
        st = t.get(v.storage)
        key = f"{st.oid if st else '?'}:{v.offset}:{v.stride}"
        out[v.name] = (v.dtype, v.shape, key)
    return out


def diff_manifests(
    old: Manifest | None,
    new: Manifest | None,
    load_old: Loader | None = None,
    load_new: Loader | None = None,
) -> list[TensorChange]:
    """Tensors added, removed or changed from ``old`` to ``new`` (sorted by name).

    With loaders, changed tensors of equal shape get ``DeltaStats`` (one tensor in memory at a
    time per side).
    """
    a = _described(old) if old else {}
    b = _described(new) if new else {}
    changes: list[TensorChange] = []
    for name in sorted(set(a) | set(b)):
        if name not in b:
            changes.append(TensorChange(name, "removed", _sig(*a[name][:2]), None))
        elif name not in a:
            changes.append(TensorChange(name, "added", None, _sig(*b[name][:2])))
        elif a[name] != b[name]:
            changes.append(_changed(name, a[name], b[name], load_old, load_new))
    return changes


def _changed(
    name: str,
    a: tuple[str, tuple[int, ...], str],
    b: tuple[str, tuple[int, ...], str],
    load_old: Loader | None,
    load_new: Loader | None,
) -> TensorChange:
    status = "changed"
    if a[1] != b[1]:
        status = "reshaped"
    elif a[0] != b[0]:
        status = "retyped"
    stats = None
    if a[1] == b[1] and load_old is not None and load_new is not None:
        stats = delta_stats(load_old(name), load_new(name))
    return TensorChange(name, status, _sig(*a[:2]), _sig(*b[:2]), stats)


def unchanged_count(old: Manifest | None, new: Manifest | None) -> int:
    """Number of tensors identical on both sides."""
    if old is None or new is None:
        return 0
    a, b = _described(old), _described(new)
    return sum(1 for n in a if n in b and a[n] == b[n])


__all__ = ["TensorChange", "diff_manifests", "unchanged_count"]

"""Merge a tensor in row blocks, with the same result as merging it whole.

A merge executor cannot hold every input of a huge tensor (an embedding of a large vocabulary) as
float64 copies. Most methods are elementwise once one per-tensor quantity is known: linear and
task arithmetic need nothing; TIES' trim needs, per model, where the top-k cut falls
(``steps.trim_cut``, computed over the whole task vector one model at a time); sign election and
the disjoint mean are per element. ``blockwise(method, params)`` returns a ``BlockMerge`` for
those cases (None for the rest: random drops, two-tailed masks, L1 rescaling, SLERP, model
stock, data-aware methods), whose ``prepare`` reads the whole inputs once and whose ``block``
merges any row range; the pieces are bit-identical to ``MergeMethod.merge`` on the whole tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from potluck.merging.base import MergeInputs, MergeMethod, all_values, model_value
from potluck.merging.lines import scale_task_vector
from potluck.merging.steps import TrimCut, apply_cut, rescale, streamed_cut
from potluck.merging.task_arithmetic import generalized_task_arithmetic
from potluck.merging.validate import COMPUTE_DTYPE

__all__ = ["BlockMerge", "blockwise"]

#: Methods of the task-vector family, by whether they elect signs (TIES-style) or not.
_GTA = {
    "task_arithmetic": False,
    "ties": True,
    "dare_linear": False,
    "dare_ties": True,
    "breadcrumbs": False,
    "breadcrumbs_ties": True,
    "della": True,
    "della_linear": False,
}


@dataclass
class BlockMerge:
    """Row-block merging of one tensor (see the module docstring). Not thread-safe: one tensor's
    blocks go through one ``BlockMerge`` in row order."""

    method: MergeMethod
    params: dict[str, Any]
    weights: np.ndarray | None
    name: str
    seed: int
    trim_density: tuple[float, ...] | None = None
    cuts: list[TrimCut | None] = field(default_factory=list)
    used: list[int] = field(default_factory=list)

    def prepare(
        self,
        models: Sequence[np.ndarray],
        base: np.ndarray | None,
        done: Callable[[int], None] | None = None,
        step: int | None = None,
    ) -> None:
        """Read the whole inputs, one model at a time (TIES: where each trim cuts, from
        ``step`` rows at a time: a few passes over each model, never a whole float64 copy);
        ``done(i)`` is called when model ``i`` has been read."""
        one_row = [m[:1] for m in models]  # validates weights, dtypes and parameters cheaply
        self.method.merge(
            one_row, None if base is None else base[:1], self._weights(), name=self.name,
            seed=self.seed, **self.params,
        )  # fmt: skip
        if self.trim_density is None:
            return
        assert base is not None
        rows = max(1, step or len(base))
        for i, m in enumerate(models):
            density = self.trim_density[i if len(self.trim_density) > 1 else 0]
            self.cuts.append(streamed_cut(_magnitudes(m, base, rows), m.size, density))
            if done is not None:
                done(i)
        self.used = [0] * len(models)

    def block(self, models: Sequence[np.ndarray], base: np.ndarray | None) -> np.ndarray:
        """The merged rows for these input rows (float64)."""
        if self.trim_density is None:
            return self.method.merge(
                list(models), base, self._weights(), name=self.name, seed=self.seed,
                **self.params,
            )  # fmt: skip
        assert base is not None
        stacked = np.stack([np.asarray(m, dtype=COMPUTE_DTYPE) for m in models])
        b = np.asarray(base, dtype=COMPUTE_DTYPE)
        w = self.weights if self.weights is not None else np.ones(len(models), COMPUTE_DTYPE)
        resolved = self.method.resolve_params(self.params)
        inputs = MergeInputs(stacked, b, w, self.name, self.seed, self.weights is not None)
        merged = generalized_task_arithmetic(
            inputs, resolved, method=self.method.name, sparsifier=self._cut,
            consensus=_GTA[self.method.name],
        )  # fmt: skip
        return scale_task_vector(merged, b, float(resolved.get("lines", 1.0)))  # LiNeS

    def _weights(self) -> list[float] | None:
        return None if self.weights is None else [float(x) for x in self.weights]

    def _cut(
        self, tau: np.ndarray, i: int, inputs: MergeInputs, p: Mapping[str, Any]
    ) -> np.ndarray:
        kept, self.used[i] = apply_cut(tau, self.cuts[i], self.used[i])
        return rescale(kept, tau, model_value(p, "density", i), str(p["rescale"]))


def _magnitudes(
    model: np.ndarray, base: np.ndarray, rows: int
) -> Callable[[], Iterator[np.ndarray]]:
    """The blocks of ``|model - base|`` (float64, ``rows`` rows each, flat order), anew on
    each call."""

    def blocks() -> Iterator[np.ndarray]:
        for r in range(0, max(1, len(base)), rows):
            mags = np.subtract(model[r : r + rows], base[r : r + rows], dtype=COMPUTE_DTYPE)
            yield np.abs(mags, out=mags).reshape(-1)

    return blocks


def blockwise(
    method: MergeMethod,
    params: Mapping[str, Any],
    weights: Sequence[float] | None,
    *,
    name: str,
    seed: int,
) -> BlockMerge | None:
    """A ``BlockMerge`` when ``method`` with ``params`` can run in row blocks, else None."""
    w = None if weights is None else np.asarray(weights, dtype=COMPUTE_DTYPE)
    if method.name in ("linear", "passthrough"):
        return BlockMerge(method, dict(params), w, name, seed)
    if method.name not in _GTA:
        return None
    resolved = method.resolve_params(params)
    densities = all_values(resolved, "density") if "density" in resolved else (1.0,)
    if min(densities) >= 1:
        return BlockMerge(method, dict(params), w, name, seed)
    if method.name == "ties" and resolved["rescale"] != "l1":
        return BlockMerge(method, dict(params), w, name, seed, trim_density=densities)
    return None

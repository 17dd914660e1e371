"""The shape of a merge method: a name, the paper, a parameter schema and a pure function.

A ``MergeMethod`` validates everything it is given (models, base, weights, parameters) before it
computes anything, then calls its implementation on float64 copies. The result is float64: casting
back to the checkpoint's dtype is the caller's job (``ops.merge`` does ``astype(ours.dtype)``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from potluck.errors import UserError
from potluck.merging.validate import (
    COMPUTE_DTYPE,
    STATS_KINDS,
    StatsEntry,
    TensorStats,
    prepare_inputs,
    prepare_stats,
)
from potluck.params import Param

__all__ = [
    "COMPUTE_DTYPE",
    "STATS_KINDS",
    "Combine",
    "MergeFn",
    "MergeInputs",
    "MergeMethod",
    "StatsEntry",
    "TensorStats",
    "all_values",
    "model_value",
    "three_way_combine",
]


@dataclass(frozen=True)
class MergeInputs:
    """What an implementation receives, already validated.

    ``models`` is the stacked float64 array of shape ``(k, *shape)``; ``base`` is float64 or None;
    ``weights`` is a float64 vector of length ``k`` (all ones when the caller gave none).
    ``name`` and ``seed`` key the random generators of stochastic methods. ``stats`` is ``None``
    when the caller gave no statistics, else one validated ``TensorStats`` (float64) or ``None``
    per model (only for methods with ``needs_stats``).
    """

    models: np.ndarray
    base: np.ndarray | None
    weights: np.ndarray
    name: str
    seed: int
    weights_given: bool = False
    stats: tuple[TensorStats | None, ...] | None = None


MergeFn = Callable[[MergeInputs, Mapping[str, Any]], np.ndarray]


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method (see the module docstring).

    ``min_models``/``max_models`` bound the number of models (``None``: no upper bound);
    ``uses_weights`` says whether per-model weights mean anything to it (passing weights to a
    method that ignores them is an error, never silently dropped); ``any_dtype`` lets a method
    take non-float tensors (only ``passthrough``); ``needs_stats`` names the per-model statistics
    a data-aware method reads (``"fisher"``: diagonal Fisher, ``"gram"``: input Gram matrix XᵀX;
    see ``docs/merging-stats.md``). Statistics given to a method without ``needs_stats`` are an
    error, never silently dropped.
    """

    name: str
    reference_url: str
    description: str
    fn: MergeFn
    params: Mapping[str, Param] = field(default_factory=dict)
    needs_base: bool = False
    min_models: int = 1
    max_models: int | None = None
    uses_weights: bool = True
    any_dtype: bool = False
    needs_stats: str | None = None
    per_model: tuple[str, ...] = ()

    def resolve_params(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults overlaid with ``given``, each checked; unknown names are a ``UserError``."""
        unknown = sorted(set(given) - set(self.params))
        if unknown:
            valid = ", ".join(sorted(self.params)) or "(none)"
            raise UserError(
                f"merge method {self.name!r} has no parameter {', '.join(map(repr, unknown))}",
                hint=f"valid parameters: {valid}",
                method=self.name,
                unknown=unknown,
                valid=sorted(self.params),
            )
        resolved = {k: p.default for k, p in self.params.items()}
        for key, value in given.items():
            spec = self.params[key]
            if key in self.per_model and isinstance(value, (list, tuple)):
                resolved[key] = tuple(spec.check(self.name, key, v) for v in value)
            else:
                resolved[key] = spec.check(self.name, key, value)
        return resolved

    def _check_per_model(self, resolved: Mapping[str, Any], count: int, name: str) -> None:
        for key in self.per_model:
            value = resolved.get(key)
            if isinstance(value, tuple) and len(value) != count:
                raise UserError(
                    f"merge method {self.name!r}: {len(value)} values of {key!r} for {count} "
                    f"models (tensor {name!r})",
                    hint=f"give one {key} per model, or a single value for all",
                    method=self.name,
                    param=key,
                    tensor=name,
                )

    def merge(
        self,
        tensors: Sequence[np.ndarray],
        base: np.ndarray | None,
        weights: Sequence[float] | None,
        *,
        name: str,
        seed: int,
        stats: Sequence[StatsEntry] | None = None,
        **params: Any,
    ) -> np.ndarray:
        """Merge one tensor ``name`` of several models; returns float64 (cast back: caller's job).

        ``seed`` keys the randomness of stochastic methods together with ``name`` and the model's
        index (see ``keyed_generator``), so results do not depend on call order or threads.
        ``stats`` (methods with ``needs_stats`` only) holds one entry per model: a
        ``TensorStats`` (what ``ops.merge.statsfile.stats_for`` returns), a bare array, or
        ``None`` where that model has no statistics for this tensor; each is checked (shape,
        finiteness, sign, symmetry).
        """
        resolved = self.resolve_params(params)
        models, base_arr, w, given = prepare_inputs(self, tensors, base, weights, name, seed)
        checked = prepare_stats(self, stats, models.shape[1:], len(models), name)
        self._check_per_model(resolved, len(models), name)
        inputs = MergeInputs(models, base_arr, w, name, seed, given, checked)
        if self.any_dtype:
            return self.fn(inputs, resolved)
        return np.asarray(self.fn(inputs, resolved), dtype=COMPUTE_DTYPE)


def model_value(p: Mapping[str, Any], key: str, i: int) -> float:
    """Parameter ``key`` for model ``i``: its own value when given per model, else the one."""
    value = p[key]
    return float(value[i] if isinstance(value, tuple) else value)


def all_values(p: Mapping[str, Any], key: str) -> tuple[float, ...]:
    """Every value of ``key`` (one, or one per model)."""
    value = p[key]
    return tuple(float(v) for v in value) if isinstance(value, tuple) else (float(value),)


Combine = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def three_way_combine(
    method: MergeMethod,
    name: str,
    *,
    seed: int,
    weights: Sequence[float] | None = None,
    **params: Any,
) -> Combine:
    """``combine(base, ours, theirs)`` for one tensor (``ops.vcs.threeway.merge_manifests``).

    Parameters are checked now, before any tensor is loaded; models are ``[ours, theirs]``
    (model index 0 and 1 for the random keys) and the result is float64.
    """
    method.resolve_params(params)

    def combine(base: np.ndarray, ours: np.ndarray, theirs: np.ndarray) -> np.ndarray:
        return method.merge([ours, theirs], base, weights, name=name, seed=seed, **params)

    return combine

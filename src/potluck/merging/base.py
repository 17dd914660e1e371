"""The shape of a merge method: a name, the paper, a parameter schema and a pure function.

A ``MergeMethod`` validates everything it is given (models, base, weights, parameters) before it
computes anything, then calls its implementation on float64 copies. The result is float64: casting
back to the checkpoint's dtype is the caller's job (``ops.merge`` does ``astype(ours.dtype)``).
"""

from __future__ import annotations

import math
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

__all__ = [
    "COMPUTE_DTYPE",
    "STATS_KINDS",
    "Combine",
    "MergeFn",
    "MergeInputs",
    "MergeMethod",
    "Param",
    "StatsEntry",
    "TensorStats",
    "all_values",
    "model_value",
    "three_way_combine",
]


@dataclass(frozen=True)
class Param:
    """One entry of a method's parameter schema.

    ``type`` is ``bool``, ``int``, ``float`` or ``str``; numbers must lie in [``low``, ``high``]
    (an end is excluded when ``low_open``/``high_open``; ``None`` means unbounded); strings must be
    one of ``choices``.
    """

    type: type
    default: Any
    description: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()

    def allowed(self) -> str:
        """The allowed values in words, e.g. ``"(0, 1]"`` or ``"one of sum, count"``."""
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.type is bool:
            return "true or false"
        if self.type is str:
            return "any text"
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        left = "(" if self.low_open or self.low is None else "["
        right = ")" if self.high_open or self.high is None else "]"
        return f"{left}{lo}, {hi}{right}"

    def check(self, method: str, name: str, value: Any) -> Any:
        """``value`` as this type, or a ``UserError`` saying what is allowed."""
        ok_type = _type_ok(self.type, value)
        if ok_type and self.type in (int, float):
            value = self.type(value)
            ok = math.isfinite(value) and self._in_range(value)
        else:
            ok = ok_type and (not self.choices or value in self.choices)
        if not ok:
            raise UserError(
                f"merge method {method!r}: parameter {name!r} = {value!r} is not allowed",
                hint=f"{name} is {self.type.__name__}, {self.allowed()}: {self.description}",
                method=method,
                param=name,
                value=value,
                allowed=self.allowed(),
            )
        return value

    def _in_range(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return not (
            self.high is not None and (value > self.high or (self.high_open and value == self.high))
        )


def _type_ok(expected: type, value: Any) -> bool:
    """bool is not a number here; an int is accepted where a float is expected."""
    if isinstance(value, (bool, np.bool_)):
        return expected is bool
    if expected is float:
        return isinstance(value, (int, float, np.integer, np.floating))
    if expected is int:
        return isinstance(value, (int, np.integer))
    return isinstance(value, expected)


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

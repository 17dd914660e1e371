"""Input checks shared by every merge method: counts, shapes, dtypes, base, weights, statistics.

Each problem is a ``UserError`` naming the tensor and the offending values; nothing is skipped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from potluck.errors import UserError

if TYPE_CHECKING:
    from potluck.merging.base import MergeMethod

#: The dtype every method computes in, whatever the inputs' dtype (bf16, fp8, f16, f32, f64).
COMPUTE_DTYPE = np.dtype(np.float64)

#: Statistics kinds a method can need: diagonal Fisher (same shape as the tensor) and the Gram
#: matrix XᵀX of a linear layer's inputs (square, one row per input feature).
STATS_KINDS = ("fisher", "gram")

#: Relative tolerance of the Gram checks (symmetry, Cauchy–Schwarz): float32 accumulation of XᵀX
#: is not exactly symmetric.
GRAM_RTOL = 1e-4


@dataclass(frozen=True)
class TensorStats:
    """One model's statistics for one tensor, with what a method needs to read them.

    ``kind`` is ``"fisher"`` or ``"gram"`` (``None``: unchecked, a bare array); ``input_axis``
    (Gram only) is the weight's axis that indexes the layer's input features: 1 for
    ``nn.Linear`` ([out, in], the default), 0 for GPT-2's ``Conv1D`` ([in, out]);
    ``model_norm`` (Fisher only) is ‖F‖₂ over the whole model, for Fisher normalisation.
    """

    array: np.ndarray
    kind: str | None = None
    input_axis: int | None = None
    model_norm: float | None = None


#: What a caller may pass per model: statistics, a bare array, or nothing for this tensor.
StatsEntry = TensorStats | np.ndarray | None


def is_float_dtype(dtype: np.dtype) -> bool:
    """True for numpy floats and ml_dtypes' bfloat16 / float8 / float6 / float4 types."""
    return dtype.kind == "f" or dtype.name.startswith(("bfloat", "float8", "float6", "float4"))


def prepare_inputs(
    method: MergeMethod,
    tensors: Sequence[np.ndarray],
    base: np.ndarray | None,
    weights: Sequence[float] | None,
    name: str,
    seed: int,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, bool]:
    """Validate, then return (stacked models, base, weight vector, weights given) in float64.

    Methods with ``any_dtype`` get the models stacked in their own dtype.
    """
    _check_key(method.name, name, seed)
    arrays = [np.asarray(t) for t in tensors]
    _check_count(method, len(arrays), name)
    base_arr = None if base is None else np.asarray(base)
    _check_base(method, base_arr, name)
    _check_alike(arrays, base_arr, name)
    if not method.any_dtype:
        _check_float(method.name, arrays[0].dtype, name)
    w = _check_weights(method, weights, len(arrays), name)
    dtype = arrays[0].dtype if method.any_dtype else COMPUTE_DTYPE
    models = np.empty((len(arrays), *arrays[0].shape), dtype=dtype)
    for i, a in enumerate(arrays):  # one converting copy each (np.stack of astype makes two)
        models[i] = a
    base64 = None if base_arr is None else base_arr.astype(COMPUTE_DTYPE)
    return models, base64, w, weights is not None


def _check_key(method: str, name: str, seed: int) -> None:
    if not isinstance(name, str):
        raise UserError(
            f"merge method {method!r}: tensor name must be a string, got {name!r}",
            hint="pass name= the tensor's name in the checkpoint",
            method=method,
        )
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise UserError(
            f"merge method {method!r}: seed must be an integer, got {seed!r}",
            hint="pass seed= an int (it keys the random masks of dare/della)",
            method=method,
            tensor=name,
        )


def _check_count(method: MergeMethod, count: int, name: str) -> None:
    lo, hi = method.min_models, method.max_models
    if lo <= count and (hi is None or count <= hi):
        return
    if hi == lo:
        need = f"exactly {lo}"
    elif hi is None:
        need = f"at least {lo}"
    else:
        need = f"between {lo} and {hi}"
    raise UserError(
        f"merge method {method.name!r} needs {need} model(s), got {count} for tensor {name!r}",
        hint=f"give {need} models (the base, if any, is passed separately)",
        method=method.name,
        tensor=name,
        count=count,
    )


def _check_base(method: MergeMethod, base: np.ndarray | None, name: str) -> None:
    if method.needs_base and base is None:
        raise UserError(
            f"merge method {method.name!r} needs a base model (tensor {name!r} has none)",
            hint="pass base= the common ancestor's tensor, or pick a method without a base "
            "(linear, slerp, passthrough)",
            method=method.name,
            tensor=name,
        )


def _check_alike(arrays: list[np.ndarray], base: np.ndarray | None, name: str) -> None:
    """All models (and the base) share one shape and one dtype."""
    labelled = [(f"model {i}", a) for i, a in enumerate(arrays)]
    if base is not None:
        labelled.append(("base", base))
    ref_label, ref = labelled[0]
    for label, a in labelled[1:]:
        if a.shape != ref.shape:
            raise UserError(
                f"tensor {name!r}: {label} has shape {list(a.shape)} but {ref_label} has "
                f"{list(ref.shape)}",
                hint="only tensors of the same shape can be merged",
                tensor=name,
                shapes={lab: list(x.shape) for lab, x in labelled},
            )
        if a.dtype != ref.dtype:
            raise UserError(
                f"tensor {name!r}: {label} has dtype {a.dtype} but {ref_label} has {ref.dtype}",
                hint="cast the inputs to one dtype before merging",
                tensor=name,
                dtypes={lab: str(x.dtype) for lab, x in labelled},
            )


def _check_float(method: str, dtype: np.dtype, name: str) -> None:
    if not is_float_dtype(dtype):
        raise UserError(
            f"merge method {method!r} cannot merge tensor {name!r} of dtype {dtype}",
            hint="only floating-point tensors are merged; use 'passthrough' to take one side",
            method=method,
            tensor=name,
            dtype=str(dtype),
        )


def _check_weights(
    method: MergeMethod, weights: Sequence[float] | None, count: int, name: str
) -> np.ndarray:
    if weights is None:
        return np.ones(count, dtype=COMPUTE_DTYPE)
    if not method.uses_weights:
        raise UserError(
            f"merge method {method.name!r} takes no per-model weights",
            hint="leave weights out (None) for this method",
            method=method.name,
            tensor=name,
        )
    w = list(weights)
    if len(w) != count:
        raise UserError(
            f"tensor {name!r}: {len(w)} weight(s) for {count} model(s)",
            hint="give one weight per model (the base takes none)",
            method=method.name,
            tensor=name,
            weights=len(w),
            models=count,
        )
    bad = [x for x in w if isinstance(x, bool) or not _finite_number(x)]
    if bad:
        raise UserError(
            f"merge method {method.name!r}: weights must be finite numbers, got {bad!r}",
            hint="give one finite float per model",
            method=method.name,
            tensor=name,
        )
    return np.asarray(w, dtype=COMPUTE_DTYPE)


def _finite_number(x: object) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and math.isfinite(float(x))


def prepare_stats(
    method: MergeMethod,
    stats: Sequence[StatsEntry] | None,
    shape: tuple[int, ...],
    count: int,
    name: str,
) -> tuple[TensorStats | None, ...] | None:
    """Validate per-model statistics for tensor ``name`` (of ``shape``); float64 copies.

    Fisher: the tensor's shape, finite, ≥ 0. Gram: a 2-D tensor, square [d, d] with d the size of
    the input axis, finite, symmetric (within ``GRAM_RTOL``, then symmetrised), non-negative
    diagonal and |Gᵢⱼ| ≤ √(GᵢᵢGⱼⱼ) (necessary for PSD, O(d²)).
    """
    if stats is None:
        return None
    kind = method.needs_stats
    if kind is None:
        raise UserError(
            f"merge method {method.name!r} takes no statistics (tensor {name!r})",
            hint="leave stats out (None), or pick a data-aware method (fisher, regmean)",
            method=method.name,
            tensor=name,
        )
    entries = list(stats)
    if len(entries) != count:
        raise UserError(
            f"tensor {name!r}: {len(entries)} statistics entries for {count} model(s)",
            hint="give one entry per model (None where a model has none)",
            method=method.name,
            tensor=name,
            stats=len(entries),
            models=count,
        )
    return tuple(
        None if e is None else _check_entry(method.name, kind, e, i, shape, name)
        for i, e in enumerate(entries)
    )


def _stats_error(method: str, name: str, i: int, what: str, hint: str, **data: object) -> UserError:
    return UserError(
        f"merge method {method!r}: statistics of model {i} for tensor {name!r} {what}",
        hint=hint,
        method=method,
        tensor=name,
        model=i,
        **data,
    )


def _check_entry(
    method: str, kind: str, entry: object, i: int, shape: tuple[int, ...], name: str
) -> TensorStats:
    ts = entry if isinstance(entry, TensorStats) else TensorStats(np.asarray(entry))
    if ts.kind is not None and ts.kind != kind:
        raise _stats_error(
            method,
            name,
            i,
            f"are {ts.kind!r} statistics, but it needs {kind!r}",
            f"compute them with 'potluck stats {kind}'",
            kind=ts.kind,
            needs=kind,
        )
    arr = np.asarray(ts.array)
    if not is_float_dtype(arr.dtype) and arr.dtype.kind not in "iu":
        raise _stats_error(method, name, i, f"have dtype {arr.dtype}", "give float arrays")
    arr = arr.astype(COMPUTE_DTYPE)
    if not np.all(np.isfinite(arr)):
        raise _stats_error(
            method, name, i, "contain NaN or infinity", "recompute the statistics (overflow?)"
        )
    if kind == "fisher":
        return _check_fisher(method, ts, arr, i, shape, name)
    return _check_gram(method, ts, arr, i, shape, name)


def _check_fisher(
    method: str, ts: TensorStats, arr: np.ndarray, i: int, shape: tuple[int, ...], name: str
) -> TensorStats:
    if arr.shape != shape:
        raise _stats_error(
            method,
            name,
            i,
            f"have shape {list(arr.shape)}, the tensor {list(shape)}",
            "a diagonal Fisher has the tensor's shape; was it computed for another model?",
            shape=list(arr.shape),
        )
    if np.any(arr < 0):
        raise _stats_error(
            method, name, i, "have negative Fisher values", "a Fisher diagonal is ≥ 0 (squares)"
        )
    norm = ts.model_norm
    if norm is not None and not (math.isfinite(norm) and norm >= 0):
        raise _stats_error(
            method, name, i, f"have model norm {norm!r}", "the model's Fisher norm is ≥ 0"
        )
    return TensorStats(arr, "fisher", None, None if norm is None else float(norm))


def _check_gram(
    method: str, ts: TensorStats, arr: np.ndarray, i: int, shape: tuple[int, ...], name: str
) -> TensorStats:
    if len(shape) != 2:
        raise _stats_error(
            method,
            name,
            i,
            f"are a Gram matrix, but the tensor has shape {list(shape)}",
            "Gram statistics belong to 2-D linear weights only; leave this tensor's out",
        )
    axis = 1 if ts.input_axis is None else ts.input_axis
    if axis not in (0, 1, -1, -2):
        raise _stats_error(
            method, name, i, f"have input axis {axis}", "input_axis is 1 ([out, in]) or 0"
        )
    axis %= 2
    d = shape[axis]
    if arr.ndim == 1:
        return _check_gram_diagonal(method, arr, axis, i, d, name)
    if arr.shape != (d, d):
        raise _stats_error(
            method,
            name,
            i,
            f"have shape {list(arr.shape)}, but input axis {axis} of {list(shape)} needs "
            f"[{d}, {d}]",
            "the Gram matrix is [in, in]; check the input axis (nn.Linear: 1, Conv1D: 0)",
            shape=list(arr.shape),
        )
    problem = _gram_problem(arr)
    if problem:
        raise _stats_error(method, name, i, f"are not {problem}", _GRAM_HINTS[problem])
    return TensorStats(arr, "gram", axis, None)


def _check_gram_diagonal(
    method: str, arr: np.ndarray, axis: int, i: int, d: int, name: str
) -> TensorStats:
    """A 1-D Gram is the diagonal of one (an embedding's lookup counts): [d], ≥ 0."""
    if arr.shape != (d,):
        raise _stats_error(
            method,
            name,
            i,
            f"are a diagonal Gram of length {arr.shape[0]}, but input axis {axis} has {d} rows",
            "an embedding's diagonal Gram has one count per row of the table",
            shape=list(arr.shape),
        )
    if np.any(arr < 0):
        raise _stats_error(method, name, i, "are not positive semi-definite", _GRAM_HINTS["diag"])
    return TensorStats(arr, "gram", axis, None)


_GRAM_HINTS = {
    "diag": "a diagonal Gram (lookup counts) has no negative entries",
    "symmetric": "a Gram matrix XᵀX is symmetric",
    "positive semi-definite": "a Gram matrix XᵀX has a non-negative diagonal and |Gᵢⱼ| ≤ √(GᵢᵢGⱼⱼ)",
}
#: Rows per block of the Gram checks (bounds the temporaries of an 11008-wide layer to ~90 MB).
_BLOCK = 1024


def _gram_problem(arr: np.ndarray) -> str | None:
    """ "symmetric" / "positive semi-definite" when that check fails, else None; on success
    ``arr`` (a private float64 copy) is symmetrised in place, block by block."""
    d = arr.shape[0]
    if d == 0:
        return None
    diag = np.diag(arr).copy()
    tol = GRAM_RTOL * float(np.abs(diag).max())
    if np.any(diag < -tol):
        return "positive semi-definite"
    root = np.sqrt(np.maximum(diag, 0.0))
    for start in range(0, d, _BLOCK):
        rows = slice(start, min(d, start + _BLOCK))
        block, mirror = arr[rows], arr[:, rows].T
        if float(np.abs(block - mirror).max()) > tol:
            return "symmetric"
        if np.any(np.abs(block) > np.outer(root[rows], root) + tol):
            return "positive semi-definite"
    for start in range(0, d, _BLOCK):  # checks passed: (G + Gᵀ)/2, upper blocks from lower
        rows = slice(start, min(d, start + _BLOCK))
        sym = (arr[rows, start:] + arr[start:, rows].T) / 2
        arr[rows, start:] = sym
        arr[start:, rows] = sym.T
    return None

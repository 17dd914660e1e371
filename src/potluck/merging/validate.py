"""Input checks shared by every merge method: counts, shapes, dtypes, base, weights.

Each problem is a ``UserError`` naming the tensor and the offending values; nothing is skipped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from potluck.errors import UserError

if TYPE_CHECKING:
    from potluck.merging.base import MergeMethod

#: The dtype every method computes in, whatever the inputs' dtype (bf16, fp8, f16, f32, f64).
COMPUTE_DTYPE = np.dtype(np.float64)


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
    models = np.stack([a.astype(dtype, copy=False) for a in arrays])
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

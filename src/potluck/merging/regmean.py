"""RegMean (Jin et al. 2023, https://arxiv.org/abs/2212.09849): regression mean of linear layers.

For a linear layer y = W x with per-model Gram matrices Gᵢ = XᵢᵀXᵢ of its inputs (rows of Xᵢ
are the input vectors the layer saw on model i's data), the merged weight minimises
Σᵢ ‖XᵢWᵀ − XᵢWᵢᵀ‖²:

    Wᵀ = (Σᵢ λᵢG̃ᵢ)⁻¹ Σᵢ λᵢG̃ᵢWᵢᵀ,    G̃ᵢ = α·Gᵢ + (1 − α)·diag(Gᵢ)

(``nn.Linear`` stores W as [out, in]; GPT-2's ``Conv1D`` stores Wᵀ as [in, out], which the
statistics say through ``TensorStats.input_axis``). ``alpha`` scales the off-diagonal entries of
each Gram matrix (the authors' code: ``reduce_non_diag(cov, a)``); α = 1 is the exact
least-squares solution, α = 0 keeps only the diagonals, which makes every input feature's column
a weighted average of the models' columns, weighted by that feature's energy Gᵢ[j, j]. The
authors tune α per model family; their default config applies no reduction (α = 1), public
reimplementations default to 0.9 — so does potluck, which also keeps Σ G̃ᵢ well conditioned.

Weights λᵢ scale each model's Gram matrix (the authors' ``model_coeffs``; their common scale
does not matter). The system is solved with ``np.linalg.solve``; when it is singular (an input
feature no model ever saw) the least-squares correction of the weighted average with the
smallest norm is used instead: directions without data keep the plain average.

An embedding is a linear layer on one-hot inputs, so its Gram matrix is diagonal: the number of
times each row was looked up. Given as a 1-D array (``potluck stats gram --embeddings``), it
makes every row the models' average weighted by λᵢ·countᵢ — a row only one model's data used
takes that model's row — and rows no model used keep the plain average. (A potluck extension;
the paper averages embeddings.) Diagonals mixed with full matrices for one tensor are an error.

Tensors without Gram statistics (biases, norms, and embeddings without counts) are averaged, as
in the paper. A tensor with statistics for only some models is an error
unless ``missing="average"``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from potluck.errors import UserError
from potluck.merging.base import MergeInputs, MergeMethod, TensorStats
from potluck.merging.fisher import MISSING, missing_stats, weighted_average
from potluck.params import Param

#: α used when none is given (see the module docstring).
DEFAULT_ALPHA = 0.9


def shrink_off_diagonal(gram: np.ndarray, alpha: float) -> np.ndarray:
    """G̃ = α·G + (1 − α)·diag(G)."""
    out = alpha * gram
    idx = np.diag_indices_from(gram)
    out[idx] = gram[idx]
    return np.asarray(out)


def solve_spd(a: np.ndarray, b: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """X with A·X = B; if A is singular, ``fallback`` + the min-norm least-squares correction."""
    try:
        x = np.linalg.solve(a, b)
        if np.all(np.isfinite(x)):
            return np.asarray(x)
    except np.linalg.LinAlgError:
        pass
    delta = np.linalg.lstsq(a, b - a @ fallback, rcond=None)[0]
    return np.asarray(fallback + delta)


def _input_axis(inputs: MergeInputs, stats: list[TensorStats]) -> int:
    axes = {s.input_axis for s in stats}
    if len(axes) != 1:
        raise UserError(
            f"regmean: the models' statistics for tensor {inputs.name!r} disagree on the input "
            f"axis ({sorted(a for a in axes if a is not None)})",
            hint="compute every model's statistics with the same potluck version and model class",
            tensor=inputs.name,
        )
    axis = axes.pop()
    return 1 if axis is None else axis


def regmean(inputs: MergeInputs, p: Mapping[str, Any]) -> np.ndarray:
    """RegMean of one tensor (see the module docstring)."""
    if inputs.stats is None or all(s is None for s in inputs.stats):
        return weighted_average(inputs, "regmean")
    if missing_stats(inputs, str(p["missing"]), "regmean"):
        return weighted_average(inputs, "regmean")
    stats = [s for s in inputs.stats if s is not None]
    axis = _input_axis(inputs, stats)
    alpha = float(p["alpha"])
    # work on Wᵀ, [in, out]: rows are input features
    ws = inputs.models if axis == 0 else np.swapaxes(inputs.models, 1, 2)
    average = np.tensordot(inputs.weights, ws, axes=1) / _total(inputs)
    if _diagonal(inputs.name, stats):
        merged = diagonal_solve(inputs.weights, [s.array for s in stats], ws, average)
        return merged if axis == 0 else merged.T
    lhs = np.zeros((ws.shape[1], ws.shape[1]), dtype=np.float64)
    rhs = np.zeros(ws.shape[1:], dtype=np.float64)
    for w, wt, s in zip(inputs.weights, ws, stats, strict=True):
        g = w * shrink_off_diagonal(s.array, alpha)
        lhs += g
        rhs += g @ wt
    merged = solve_spd(lhs, rhs, average)
    return merged if axis == 0 else merged.T


def _diagonal(name: str, stats: list[TensorStats]) -> bool:
    """True when every model's Gram is a 1-D diagonal; mixing the two forms is an error."""
    kinds = {s.array.ndim for s in stats}
    if kinds == {1, 2}:
        raise UserError(
            f"regmean: the models' Gram statistics for tensor {name!r} mix diagonals (embedding "
            "lookup counts) and full matrices",
            hint="compute every model's statistics with the same options (all with or all "
            "without 'potluck stats gram --embeddings')",
            tensor=name,
        )
    return kinds == {1}


def diagonal_solve(
    weights: np.ndarray, diagonals: list[np.ndarray], ws: np.ndarray, average: np.ndarray
) -> np.ndarray:
    """RegMean with diagonal Grams: row j = Σᵢ λᵢgᵢⱼWᵢ[j] / Σᵢ λᵢgᵢⱼ; ``average`` where Σ = 0.

    The same answer as ``solve_spd`` on the diagonal matrices (whose singular rows keep the
    fallback), in O(rows × columns) instead of a rows × rows system.
    """
    coef = np.stack([w * g for w, g in zip(weights, diagonals, strict=True)])  # [n, rows]
    total = coef.sum(axis=0)
    merged = np.array(average, dtype=np.float64, copy=True)
    used = total != 0
    merged[used] = np.einsum("nr,nrc->rc", coef[:, used], ws[:, used]) / total[used, None]
    return merged


def _total(inputs: MergeInputs) -> float:
    total = float(inputs.weights.sum())
    if abs(total) < 1e-8:
        raise UserError(
            f"regmean: weights {inputs.weights.tolist()} sum to zero (tensor {inputs.name!r})",
            hint="give positive weights",
            tensor=inputs.name,
        )
    return total


METHODS: tuple[MergeMethod, ...] = (
    MergeMethod(
        "regmean",
        "https://arxiv.org/abs/2212.09849",
        "RegMean: linear weights solve Σ‖XᵢW − XᵢWᵢ‖² from input Gram matrices; rest averaged.",
        regmean,
        {
            "alpha": Param(
                float, DEFAULT_ALPHA, "scale of the Grams' off-diagonal entries", low=0.0, high=1.0
            ),
            "missing": MISSING,
        },
        needs_stats="gram",
    ),
)

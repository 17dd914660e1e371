"""Output-weighted errors for the budget allocation: a tensor's error by its effect on outputs.

A linear layer y = W x whose weight is off by E changes its outputs over the inputs X (rows:
tokens) by E Xᵀ, with squared size ‖E Xᵀ‖²_F = tr(E G Eᵀ), G = XᵀX the Gram matrix of its
inputs (``potluck stats gram``; RegMean's statistics). For an embedding (a lookup: one-hot
inputs) G is diagonal, the lookup counts c, and the error is Σⱼ cⱼ‖Eⱼ‖². ``InputWeight`` holds
G oriented to a tensor's matrix view (rows = output axis 0 of ``delta.reshape(m, -1)``):

* ``side = "cols"``: G is over the columns (``nn.Linear`` [out, in], input axis 1);
* ``side = "rows"``: G is over the rows (GPT-2 ``Conv1D`` [in, out], an embedding's lookup
  counts; input axis 0);

each [dim, dim], or its diagonal [dim].

For the truncated SVD Δ = Σᵢ σᵢ uᵢ vᵢᵀ the weighted error of keeping r directions is exactly
Σ_{i≥r} σᵢ² gᵢ, gᵢ = vᵢᵀ G vᵢ (cols) or uᵢᵀ G uᵢ (rows), since the other factor is orthonormal.
Rounding noise spread evenly over the input features is weighted by ``mean_diag`` = tr(G)/dim.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from potluck.errors import UserError
from potluck.merging import TensorStats

__all__ = ["InputWeight", "StatsLookup", "input_weight"]

#: Statistics by tensor name (``StatsFile.tensor_stats``), None where the file has none.
StatsLookup = Callable[[str], TensorStats | None]


@dataclass(frozen=True)
class InputWeight:
    """A tensor's input Gram matrix (or diagonal), oriented to its matrix view."""

    gram: np.ndarray
    side: str

    @property
    def diagonal(self) -> bool:
        """True for a diagonal Gram stored as its 1-D diagonal (lookup counts)."""
        return self.gram.ndim == 1

    @property
    def mean_diag(self) -> float:
        """tr(G) / dim: the weight of noise spread evenly over the input features."""
        d = self.gram if self.diagonal else np.diagonal(self.gram)
        return float(np.mean(d)) if d.size else 0.0

    def restrict_rows(self, rows: np.ndarray) -> InputWeight:
        """The weight of the matrix made of rows ``rows`` (``rows="changed"`` factoring)."""
        if self.side != "rows":
            return self
        g = self.gram[rows] if self.diagonal else self.gram[np.ix_(rows, rows)]
        return InputWeight(g, "rows")

    def error(self, e: np.ndarray) -> float:
        """‖E Xᵀ‖²_F of an error matrix ``e`` (m, n), in float64."""
        x = e.astype(np.float64)
        if self.side == "cols":
            x = x.T
        if self.diagonal:
            return float(np.sum(self.gram[:, None] * x * x))
        return float(np.sum((self.gram @ x) * x))

    def direction_weights(self, u: np.ndarray, vt: np.ndarray) -> np.ndarray:
        """gᵢ of each singular direction (u: m × k, vt: k × n)."""
        w = (vt.T if self.side == "cols" else u).astype(np.float64)
        if self.diagonal:
            out: np.ndarray = np.sum(self.gram[:, None] * w * w, axis=0)
            return out
        out = np.sum((self.gram @ w) * w, axis=0)
        return out


def input_weight(
    name: str, stats: TensorStats | None, shape: tuple[int, ...]
) -> InputWeight | None:
    """The ``InputWeight`` of tensor ``name`` (matrix view ``shape`` = (m, n)) from its Gram
    statistics; None without statistics. Statistics of another kind or shape are refused."""
    if stats is None:
        return None
    if stats.kind not in (None, "gram"):
        raise UserError(
            f"statistics of {name!r} are {stats.kind!r}, not a Gram matrix",
            hint="compute them with `potluck stats gram` (add --embeddings for embeddings)",
            tensor=name,
        )
    g = np.asarray(stats.array, dtype=np.float64)
    axis = 1 if stats.input_axis is None else stats.input_axis
    side = "cols" if axis == 1 else "rows"
    dim = shape[1] if side == "cols" else shape[0]
    ok = (g.ndim == 1 and g.shape == (dim,)) or (g.ndim == 2 and g.shape == (dim, dim))
    if not ok or not np.all(np.isfinite(g)):
        raise UserError(
            f"Gram statistics of {name!r} have shape {list(g.shape)}, not the input size {dim} "
            f"of the {shape[0]} x {shape[1]} tensor (or are not finite)",
            hint="compute the statistics on this model (`potluck stats gram`)",
            tensor=name,
        )
    return InputWeight(g, side)

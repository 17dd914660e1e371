"""Sign-codec candidates for the budget allocation: BitDelta and ComPEFT (``codecs.sign``).

For a changed matrix Δ (m × n, N entries) with squared norm ‖Δ‖²:

* ``bitdelta`` (one scale per matrix, or ``scales="row"``: one per row): ⌈N/8⌉ bytes of signs
  plus 4 bytes a scale; exact squared error ``bitdelta_sq_error`` (Σ‖Δ_g‖² − |g|·α_g²);
* ``ternary`` (ComPEFT) with ``scale="mean_abs"`` — the least-squares scale for its mask, the
  weight-space tuning of ComPEFT's α: 2 bits per entry (⌈N/4⌉ bytes, whatever the density)
  plus one scale. Keeping the k largest |Δ| with scale μ_k = their mean leaves Σd² − k·μ_k²
  (exact); as every density costs the same bytes, only the density of the grid ``DENSITIES``
  with the least error is offered.

With an ``InputWeight`` the loss is the error's effect on the outputs, computed from the error
matrix itself (``InputWeight.error``).
"""

from __future__ import annotations

import numpy as np

from potluck.codecs.sign import bitdelta_sq_error, ternary_scale, ternary_signs
from potluck.codecs.sparse import keep_count
from potluck.ops.patch.weights import InputWeight

__all__ = ["DENSITIES", "SignOption", "best_density", "sign_options"]

#: ComPEFT densities the allocation tries (the paper's range).
DENSITIES = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7)
#: Header bytes per payload array (``budget.PER_ARRAY``), plus the tensor's name.
_PER_ARRAY = 100


def best_density(a: np.ndarray) -> tuple[float, float]:
    """(density of ``DENSITIES``, its squared error) with the least ComPEFT error on ``a``."""
    mags = np.sort(np.abs(a.astype(np.float64)).reshape(-1))[::-1]
    total = float(np.sum(mags * mags))
    cum = np.cumsum(mags)
    best = (DENSITIES[0], total)
    for d in DENSITIES:
        k = max(1, keep_count(d, mags.size))
        err = total - float(cum[k - 1]) ** 2 / k
        if err < best[1]:
            best = (d, max(err, 0.0))
    return best


def _loss(weight: InputWeight | None, sq: float, approx: np.ndarray, a: np.ndarray) -> float:
    return sq if weight is None else weight.error(a.astype(np.float64) - approx)


#: (codec, params, payload and array-header bytes, squared error, loss)
SignOption = tuple[str, dict[str, object], int, float, float]


def sign_options(
    name: str, a: np.ndarray, weight: InputWeight | None, norm_sq: float
) -> list[SignOption]:
    """BitDelta (per matrix, per row) and the best-density ComPEFT options of matrix ``a``."""
    if a.size == 0 or norm_sq == 0:
        return []
    m, n = a.shape
    x = a.astype(np.float64)
    signs = np.where(x >= 0, 1.0, -1.0)
    cost = 2 * (_PER_ARRAY + len(name))
    out: list[SignOption] = []
    for mode, groups in (("matrix", x.reshape(1, -1)), ("row", x)):
        sq = bitdelta_sq_error(groups)
        alpha = np.abs(groups).mean(axis=1, keepdims=True)
        approx = (signs.reshape(groups.shape) * alpha).reshape(m, n)
        nb = -(-a.size // 8) + 4 * groups.shape[0] + cost
        out.append(("bitdelta", {"scales": mode}, nb, sq, _loss(weight, sq, approx, a)))
    density, sq = best_density(x)
    t = ternary_signs(x, density)
    approx = ternary_scale(x, t, "mean_abs", 1.0) * t
    params: dict[str, object] = {"density": density, "scale": "mean_abs"}
    nb = -(-a.size // 4) + 4 + cost
    out.append(("ternary", params, nb, sq, _loss(weight, sq, approx, a)))
    return out

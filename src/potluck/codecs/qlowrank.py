"""``qlowrank``: Δ ≈ Bᵀ·A by truncated SVD, both factors quantised to int8 or int4.

Tensors of ndim ≥ 2 are matrices (shape[0], prod(shape[1:])), as in ``lowrank``. For the rank-r
SVD Δ_r = Σᵢ σᵢ uᵢ vᵢᵀ the codec stores r rows ``b_q`` (row i = σᵢ uᵢ, length m) and r rows
``a_q`` (row i = vᵢ, length n), each quantised symmetrically with its own absmax scale
(``codecs.quant.quantize`` with one group per row): a scale per singular direction, so a small
direction is not drowned by a large one. int8 codes are int8 arrays (r, m) / (r, n); int4
codes (−7..7) are stored as code + 8, two per byte, low nibble first, in flat uint8 arrays.
Scales ``b_scales`` / ``a_scales`` (r,) are in the compute dtype. Bytes: r·(m + n)·bits/8
plus 2r scales. ``rows="changed"`` factors only the rows of Δ that are not zero (their uint32
indices in ``rows``, m then counts those rows; the other rows stay exactly unchanged), as
``lowrank`` does for embeddings a fine-tune touched in a few thousand token rows.

Mixed precision (after Delta-CoMe, Ping et al. 2024: the leading singular vectors carry most of
the delta, so they get more bits): ``high`` = h > 0 stores the h leading directions with int8
codes in ``hb_q``/``hb_scales``/``ha_q``/``ha_scales`` and the remaining r − h with ``bits``
in ``b_q``…; the bound below holds per direction with each direction's own scales.

Error bound (tested in ``tests/test_qlowrank.py``): with bᵢ, aᵢ the exact rows, b̂ᵢ, âᵢ the
dequantised ones, sbᵢ, saᵢ their scales, each entry is off by at most half a scale, so
‖b̂ᵢ − bᵢ‖₂ ≤ √m·sbᵢ/2 and ‖âᵢ − aᵢ‖₂ ≤ √n·saᵢ/2, and by the triangle inequality

    ‖Δ̂ − Δ‖_F ≤ ‖Δ − Δ_r‖_F + Σᵢ (√m·sbᵢ/2 · ‖âᵢ‖₂ + σᵢ · √n·saᵢ/2)

where ‖Δ − Δ_r‖_F = sqrt(Σ_{i≥r} σᵢ²) with the exact SVD (Eckart–Young). ``predicted_error``
gives the expected error under the usual model of rounding noise (uniform, variance scale²/12,
independent), which the budget allocator uses. Rank 0 stores nothing (Δ̂ = 0). 1-D tensors
and scalars are stored dense (``mode="dense"``, array ``delta``).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from potluck.codecs.base import (
    Arrays,
    LossyCodec,
    Meta,
    Payload,
    get_array,
    malformed,
    meta_int,
    meta_str,
    tensor_generator,
)
from potluck.codecs.bits import pack_nibbles, unpack_nibbles
from potluck.codecs.lowrank import (
    RANDOMIZED_MIN_RATIO,
    RANDOMIZED_MIN_SIDE,
    delta_matrix,
    payload_rows,
    place_rows,
    truncated_svd,
    with_rows,
)
from potluck.codecs.quant import dequantize, quantize
from potluck.params import Param, ParamValue

__all__ = ["QLowRankCodec", "factor_bytes", "mixed_bytes", "predicted_sq_error"]


def factor_bytes(rank: int, m: int, n: int, bits: int, scale_bytes: int = 4) -> int:
    """Payload bytes of a rank-``rank`` ``qlowrank`` payload of an m × n matrix."""
    codes = -(-rank * m // 2) + -(-rank * n // 2) if bits == 4 else rank * (m + n)
    return codes + 2 * rank * scale_bytes if rank else 0


def mixed_bytes(rank: int, high: int, m: int, n: int, bits: int) -> int:
    """Payload bytes of a ``qlowrank`` payload whose ``high`` leading directions are int8."""
    return factor_bytes(high, m, n, 8) + factor_bytes(rank - high, m, n, bits)


def predicted_sq_error(
    s: np.ndarray, u_max: np.ndarray, v_max: np.ndarray, m: int, n: int, bits: int
) -> np.ndarray:
    """Expected squared quantisation error each direction adds, from its singular value σᵢ
    and the largest |entry| of uᵢ and vᵢ: σᵢ²·(m·max|uᵢ|² + n·max|vᵢ|²) / (12·qmax²)
    (rounding noise uniform on ±scale/2; cross terms average out)."""
    qmax = float((1 << (bits - 1)) - 1)
    s2 = s.astype(np.float64) ** 2
    out: np.ndarray = s2 * (m * u_max.astype(np.float64) ** 2 + n * v_max**2) / (12 * qmax**2)
    return out


def _codes(x: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(stored codes, per-row scales (rows,)) of a 2-D array."""
    q, scales = quantize(x, bits, 0)
    stored = q if bits == 8 else pack_nibbles(q.reshape(-1) + 8)
    return stored, scales.reshape(-1)


def _uncodes(
    payload: Payload, key: str, shape: tuple[int, int], bits: int, dtype: np.dtype
) -> np.ndarray:
    """The dequantised factor ``key`` (rows × length) of a payload."""
    scales = get_array(payload, f"{key}_scales", dtype, (shape[0],))
    if bits == 8:
        q = get_array(payload, f"{key}_q", np.int8, shape)
    elif bits == 4:
        count = shape[0] * shape[1]
        nibbles = unpack_nibbles(get_array(payload, f"{key}_q", np.uint8), count, "qlowrank")
        q = (nibbles.astype(np.int8) - 8).reshape(shape)
    else:
        raise malformed("qlowrank", f"bits is {bits}")
    return dequantize(q, scales.reshape(-1, 1), 0)


class QLowRankCodec(LossyCodec):
    """Truncated SVD of Δ with int8 or int4 factors, one absmax scale per singular direction
    and factor (module docstring: layout and error bound).

    ``rank`` (0 allowed: nothing stored), ``bits`` (8 or 4); the SVD is exact LAPACK for small
    matrices and randomized (Halko et al., ``oversample`` 10, ``power_iters`` 2, a Philox
    generator keyed by (seed, tensor name)) when the smaller side is ≥ 512 and ≥ 4 × (rank +
    oversample), as ``lowrank``'s ``auto``; ``method="exact"`` forces LAPACK.
    """

    name: ClassVar[str] = "qlowrank"
    reference_url: ClassVar[str | None] = "https://arxiv.org/abs/2406.08903"
    params: ClassVar[tuple[Param, ...]] = (
        Param(int, 16, "rank kept", low=0, name="rank"),
        Param(int, 8, "bits per factor code", choices=(4, 8), name="bits"),
        Param(str, "auto", "SVD algorithm", choices=("auto", "exact"), name="method"),
        Param(
            str,
            "all",
            "factor all rows, or only rows that changed (sparse embeddings)",
            choices=("all", "changed"),
            name="rows",
        ),
        Param(
            int, 0, "leading directions stored with 8 bits (mixed precision)", low=0, name="high"
        ),
    )

    def _approximate(
        self,
        delta: np.ndarray,
        base: np.ndarray,
        *,
        name: str,
        seed: int,
        params: dict[str, ParamValue],
    ) -> tuple[Arrays, Meta, float]:
        if delta.ndim < 2:
            return {"delta": delta.reshape(-1).copy()}, {"mode": "dense", "kept_rank": 0}, 1.0
        a, rows = delta_matrix(delta, params["rows"] == "changed")
        rank, bits = int(params["rank"]), int(params["bits"])
        side = min(a.shape)
        rank = min(rank, side)
        randomized = params["method"] == "auto" and (
            side >= RANDOMIZED_MIN_SIDE and side >= RANDOMIZED_MIN_RATIO * (rank + 10)
        )
        rng = tensor_generator(seed, name, "qlowrank") if randomized else None
        u, s, vt = truncated_svd(
            a, rank, randomized=randomized, rng=rng, oversample=10, power_iters=2
        )
        high = min(int(params["high"]), rank)
        b_rows = np.ascontiguousarray((u * s).T.astype(a.dtype))
        a_rows = np.ascontiguousarray(vt.astype(a.dtype))
        arrays: Arrays = {}
        for prefix, lo, hi, width in (("", high, rank, bits), ("h", 0, high, 8)):
            if prefix and not high:
                continue
            arrays[f"{prefix}b_q"], arrays[f"{prefix}b_scales"] = _codes(b_rows[lo:hi], width)
            arrays[f"{prefix}a_q"], arrays[f"{prefix}a_scales"] = _codes(a_rows[lo:hi], width)
        meta: Meta = {"mode": "factors", "kept_rank": rank, "randomized": int(randomized)}
        with_rows(arrays, meta, rows)
        return arrays, meta, (rank / side if side else 1.0)

    def _delta_hat(self, payload: Payload, base: np.ndarray) -> np.ndarray:
        mode = meta_str(payload, "mode")
        if mode == "dense":
            return get_array(payload, "delta", base.dtype, (base.size,)).reshape(base.shape)
        if mode not in ("factors", "row_factors") or base.ndim < 2:
            raise malformed(self.name, f"mode {mode!r} for a {base.ndim}-D tensor")
        r, bits, m = meta_int(payload, "kept_rank"), meta_int(payload, "bits"), base.shape[0]
        n = int(np.prod(base.shape[1:]))
        rows = payload_rows(self.name, payload, mode, m)
        k = m if rows is None else rows.size
        if r < 0 or r > min(k, n):
            raise malformed(self.name, f"kept_rank {r} for a {k} x {n} matrix")
        h = meta_int(payload, "high") if r else 0
        if h < 0 or h > r:
            raise malformed(self.name, f"high {h} for kept_rank {r}")
        b = _uncodes(payload, "b", (r - h, k), bits, base.dtype)
        a = _uncodes(payload, "a", (r - h, n), bits, base.dtype)
        if h:
            b = np.concatenate([_uncodes(payload, "hb", (h, k), 8, base.dtype), b])
            a = np.concatenate([_uncodes(payload, "ha", (h, n), 8, base.dtype), a])
        return place_rows(b.T @ a, rows, base)

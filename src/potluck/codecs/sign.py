"""Sign codecs: Δ stored as signs plus one scale (ComPEFT ternary, BitDelta 1-bit)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from potluck.codecs.base import (
    Arrays,
    ErrorReport,
    LossyCodec,
    Meta,
    Payload,
    compute_dtype,
    error_report,
    get_array,
    malformed,
)
from potluck.codecs.bits import pack_2bit, pack_bits, unpack_2bit, unpack_bits
from potluck.codecs.sparse import keep_count, top_k_positions
from potluck.params import Param, ParamValue
from potluck.tensors.dtypes import from_numpy


def ternary_signs(delta: np.ndarray, density: float) -> np.ndarray:
    """ComPEFT step 1-2: signs (int8 in {−1, 0, +1}) of the top-``density`` magnitudes of Δ."""
    flat = delta.reshape(-1)
    positions = top_k_positions(np.abs(flat), keep_count(density, flat.size))
    signs = np.zeros(flat.size, np.int8)
    signs[positions] = np.sign(flat[positions]).astype(np.int8)
    return signs.reshape(delta.shape)


def ternary_scale(delta: np.ndarray, signs: np.ndarray, mode: str, alpha: float) -> float:
    """ComPEFT step 3: the one magnitude per tensor, ``alpha`` times σ(Δ) or mean |kept Δ|.

    ``std`` (the paper's choice) uses the standard deviation of the whole, unpruned Δ;
    ``mean_abs`` the mean magnitude of the kept entries (the least-squares scale for the mask).
    """
    if delta.size == 0:
        return 0.0
    if mode == "std":
        return alpha * float(np.std(delta.astype(np.float64)))
    kept = np.abs(delta[signs != 0].astype(np.float64))
    return alpha * float(kept.mean()) if kept.size else 0.0


class SignScaledCodec(LossyCodec):
    """A codec whose Δ̂ is fixed signs times scales, Δ̂ = (S_g · α_g) per scale group g.

    ``sign_parts`` gives the decomposition (S as a (groups, per-group) matrix in the compute
    dtype, α by group); ``rescaled`` is the same payload with other scales — what tuning the
    scales on data (BitDelta's scale distillation, ComPEFT's α) changes. The payload layout
    stays this codec's: callers never build the arrays themselves.
    """

    #: Name of the payload array holding the scales.
    scale_array: ClassVar[str]

    def sign_parts(self, payload: Payload, base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(S, α): Δ̂ = (S * α[:, None]).reshape(base.shape), in the compute dtype."""
        self._check_decodable(payload, base)
        ct = compute_dtype(from_numpy(base.dtype), codec=self.name, name="<payload>")
        return self._sign_parts(payload, base.astype(ct))

    def rescaled(
        self, payload: Payload, scales: np.ndarray, new: np.ndarray, base: np.ndarray
    ) -> Payload:
        """``payload`` with ``scales`` (one per group, finite) and its error against ``new``
        re-measured; the bytes it takes do not change."""
        signs, old = self.sign_parts(payload, base)
        scales = np.asarray(scales, dtype=np.float64).reshape(-1)
        if scales.shape != old.shape or not np.all(np.isfinite(scales)):
            raise ValueError(f"{self.name}: {old.size} finite scales expected")
        ct = signs.dtype
        arrays = dict(payload.arrays)
        arrays[self.scale_array] = scales.astype(arrays[self.scale_array].dtype)
        stored = arrays[self.scale_array].astype(ct)
        approx = (signs * stored[:, None]).reshape(base.shape)
        delta = new.astype(ct) - base.astype(ct)
        kept = 1.0 if payload.error is None else payload.error.kept_fraction
        error: ErrorReport = error_report(delta, approx, kept)
        return dataclasses.replace(payload, arrays=arrays, meta=dict(payload.meta), error=error)

    def _sign_parts(self, payload: Payload, base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError


class TernaryCodec(SignScaledCodec):
    """ComPEFT (Yadav et al. 2023): keep the top-``density`` |Δ|, store only their signs
    (2 bits each, 0 → −1, 1 → 0, 2 → +1, four per byte) and one scale per tensor,
    Δ̂ = scale · sign.

    Follows the paper: scale = α · σ(Δ) with σ the std of the unpruned Δ and α = 1 (the paper
    tunes α on validation data; 1 is its untuned setting); ``scale="mean_abs"`` uses the mean
    |kept Δ| instead. Default density 0.1.
    """

    name: ClassVar[str] = "ternary"
    scale_array: ClassVar[str] = "scale"
    reference_url: ClassVar[str | None] = "https://arxiv.org/abs/2311.13171"
    params: ClassVar[tuple[Param, ...]] = (
        Param(
            float, 0.1, "fraction of signs kept", low=0.0, high=1.0, low_open=True, name="density"
        ),
        Param(str, "std", "magnitude statistic", choices=("std", "mean_abs"), name="scale"),
        Param(float, 1.0, "multiplier of the magnitude statistic", low=0.0, name="alpha"),
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
        signs = ternary_signs(delta, float(params["density"]))
        scale = ternary_scale(delta, signs, str(params["scale"]), float(params["alpha"]))
        arrays = {
            "signs": pack_2bit(signs.reshape(-1) + 1),
            "scale": np.array([scale], dtype=delta.dtype),
        }
        kept = float(np.count_nonzero(signs)) / signs.size if signs.size else 1.0
        return arrays, {}, kept

    def _delta_hat(self, payload: Payload, base: np.ndarray) -> np.ndarray:
        codes = unpack_2bit(get_array(payload, "signs", np.uint8), base.size, self.name)
        if np.any(codes > 2):
            raise malformed(self.name, "sign code 3 is not used")
        scale = get_array(payload, "scale", base.dtype, (1,))
        signs = codes.astype(base.dtype) - base.dtype.type(1)
        out: np.ndarray = (signs * scale[0]).reshape(base.shape)
        return out

    def _sign_parts(self, payload: Payload, base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        codes = unpack_2bit(get_array(payload, "signs", np.uint8), base.size, self.name)
        if np.any(codes > 2):
            raise malformed(self.name, "sign code 3 is not used")
        scale = get_array(payload, "scale", base.dtype, (1,))
        signs = codes.astype(base.dtype) - base.dtype.type(1)
        return signs.reshape(1, -1), scale.astype(base.dtype)


def _matrices(a: np.ndarray, per_row: bool = False) -> np.ndarray:
    """``a`` as (k, m·n) rows, one per matrix: k = prod(shape[:-2]), or 1 when ndim ≤ 2; with
    ``per_row``, one per row of the matrix view (shape[0], rest) (1 row for ndim ≤ 1)."""
    if per_row:
        return a.reshape(a.shape[0], -1) if a.ndim >= 2 else a.reshape(1, a.size)
    if a.ndim <= 2:
        return a.reshape(1, a.size)
    return a.reshape(int(np.prod(a.shape[:-2])), a.shape[-2] * a.shape[-1])


def bitdelta_sq_error(a: np.ndarray) -> float:
    """Squared Frobenius error of BitDelta on the rows of ``a`` (each row its own scale
    α = mean |row|): Σ‖row‖² − n·α² per row, exact (sign(0) = +1 costs α² there too)."""
    x = a.astype(np.float64)
    if x.size == 0:
        return 0.0
    alpha = np.abs(x).mean(axis=1)
    return float(max(np.sum(x * x) - x.shape[1] * np.sum(alpha**2), 0.0))


class BitDeltaCodec(SignScaledCodec):
    """BitDelta (Liu et al. 2024): Δ̂ = α · sign(Δ), 1 bit per element (sign(0) taken as +1),
    packed eight per byte, and one scale α = mean |Δ| per matrix.

    Tensors of ndim ≤ 2 get one scale; higher-rank tensors one per trailing 2-D matrix (scales
    shape = shape[:-2]). ``scales="row"`` stores one scale per row of the matrix view
    (shape[0], rest) instead (a potluck extension: 4 bytes a row buy a per-row magnitude).
    mean |Δ| is the paper's initial scale (the L2-optimal one for the signs); the paper's scale
    distillation step needs activations and is not done here. Error (exact, tested):
    ‖Δ̂ − Δ‖²_F = Σ over scale groups of (‖Δ_g‖² − |g|·α_g²) (``bitdelta_sq_error``).
    """

    name: ClassVar[str] = "bitdelta"
    scale_array: ClassVar[str] = "scales"
    reference_url: ClassVar[str | None] = "https://arxiv.org/abs/2402.10193"
    params: ClassVar[tuple[Param, ...]] = (
        Param(str, "matrix", "one scale per matrix or per row", choices=("matrix", "row"),
              name="scales"),
    )  # fmt: skip

    def _approximate(
        self,
        delta: np.ndarray,
        base: np.ndarray,
        *,
        name: str,
        seed: int,
        params: dict[str, ParamValue],
    ) -> tuple[Arrays, Meta, float]:
        mats = _matrices(delta, params["scales"] == "row")
        if mats.shape[1]:
            scales = np.abs(mats.astype(np.float64)).mean(axis=1).astype(delta.dtype)
        else:
            scales = np.zeros(mats.shape[0], delta.dtype)
        arrays = {"signs": pack_bits(delta.reshape(-1) >= 0), "scales": scales}
        return arrays, {}, 1.0

    def _delta_hat(self, payload: Payload, base: np.ndarray) -> np.ndarray:
        signs, scales = self._sign_parts(payload, base)
        out: np.ndarray = (signs * scales[:, None]).reshape(base.shape)
        return out

    def _sign_parts(self, payload: Payload, base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        positive = unpack_bits(get_array(payload, "signs", np.uint8), base.size, self.name)
        scales_mode = payload.meta.get("scales", "matrix")
        if scales_mode not in ("matrix", "row"):
            raise malformed(self.name, f"scales {scales_mode!r}")
        mats = _matrices(base, scales_mode == "row")
        scales = get_array(payload, "scales", base.dtype, (mats.shape[0],))
        signs = np.where(positive, base.dtype.type(1), base.dtype.type(-1)).astype(base.dtype)
        return signs.reshape(mats.shape), scales.astype(base.dtype)

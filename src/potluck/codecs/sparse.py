"""Sparse lossy codecs: keep some elements of Δ = new − base (top-k, threshold, DARE).

Payload: ``positions`` (delta-coded, see ``bits.encode_positions``) and ``values`` (the kept Δ
entries in the compute dtype: float64 for F64 tensors, float32 otherwise).
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np

from potluck.codecs.base import (
    Arrays,
    LossyCodec,
    Meta,
    Payload,
    get_array,
    malformed,
    tensor_generator,
)
from potluck.codecs.bits import decode_positions, encode_positions
from potluck.params import Param, ParamValue

_DENSITY = Param(
    float, 0.1, "fraction of elements kept", low=0.0, high=1.0, low_open=True, name="density"
)


def top_k_positions(magnitude: np.ndarray, k: int) -> np.ndarray:
    """Sorted flat positions of the ``k`` largest values of ``magnitude`` (by selection, O(n)).

    Ties at the k-th largest value go to the lowest positions, so the result equals a stable
    descending sort's first ``k`` entries.
    """
    flat = magnitude.reshape(-1)
    n = flat.size
    if k <= 0:
        return np.zeros(0, np.int64)
    if k >= n:
        return np.arange(n, dtype=np.int64)
    kth = np.partition(flat, n - k)[n - k]
    above = np.flatnonzero(flat > kth)
    ties = np.flatnonzero(flat == kth)[: k - above.size]
    return np.sort(np.concatenate([above, ties]))


def keep_count(density: float, size: int) -> int:
    """Elements kept at ``density``: ceil(density · size), at most ``size``."""
    return min(size, math.ceil(density * size - 1e-9))


class _SparseDelta(LossyCodec):
    """Shared payload layout and reconstruction of the sparse codecs."""

    def _pack(self, positions: np.ndarray, values: np.ndarray, size: int) -> tuple[Arrays, float]:
        arrays = {"positions": encode_positions(positions), "values": values}
        return arrays, (positions.size / size if size else 1.0)

    def _delta_hat(self, payload: Payload, base: np.ndarray) -> np.ndarray:
        gaps = payload.arrays.get("positions")
        if gaps is None:
            raise malformed(self.name, "array 'positions' is missing")
        positions = decode_positions(gaps, base.size, self.name)
        values = get_array(payload, "values", base.dtype, (positions.size,))
        out = np.zeros(base.size, base.dtype)
        out[positions] = values
        return out.reshape(base.shape)


class TopKCodec(_SparseDelta):
    """Keep the ceil(density · n) largest |Δ| (ties → lowest positions), drop the rest.

    density = 1 keeps every element; the result then differs from ``new`` only by the float
    rounding of Δ = new − base and of base + Δ̂ (an ulp or so for F32/F64; bf16/fp16 deltas are
    usually exact in float32, so those tensors usually come back bit for bit).
    """

    name: ClassVar[str] = "sparse_topk"
    params: ClassVar[tuple[Param, ...]] = (_DENSITY,)

    def _approximate(
        self,
        delta: np.ndarray,
        base: np.ndarray,
        *,
        name: str,
        seed: int,
        params: dict[str, ParamValue],
    ) -> tuple[Arrays, Meta, float]:
        k = keep_count(float(params["density"]), delta.size)
        positions = top_k_positions(np.abs(delta), k)
        arrays, kept = self._pack(positions, delta.reshape(-1)[positions], delta.size)
        return arrays, {}, kept


class ThresholdCodec(_SparseDelta):
    """Keep the non-zero Δ with |Δ| ≥ threshold (absolute, in the tensor's units).

    threshold = 0 (the default) keeps every changed element: exact up to float rounding of Δ and
    of base + Δ̂.
    """

    name: ClassVar[str] = "sparse_threshold"
    params: ClassVar[tuple[Param, ...]] = (
        Param(float, 0.0, "keep |Δ| ≥ threshold", low=0.0, name="threshold"),
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
        flat = delta.reshape(-1)
        mag = np.abs(flat)
        positions = np.flatnonzero((mag >= float(params["threshold"])) & (mag > 0))
        arrays, kept = self._pack(positions, flat[positions], delta.size)
        return arrays, {}, kept


class DareCodec(_SparseDelta):
    """DARE drop-and-rescale (Yu et al. 2023): keep each Δ element with probability ``density``
    and rescale the kept ones by 1/density, so E[Δ̂] = Δ.

    The mask comes from ``Generator(Philox(key))`` with the key hashed from (seed, tensor name):
    reproducible, and independent of the order tensors are encoded. Default density 0.1 (the
    paper's 90 % drop rate).
    """

    name: ClassVar[str] = "dare"
    reference_url: ClassVar[str | None] = "https://arxiv.org/abs/2311.03099"
    params: ClassVar[tuple[Param, ...]] = (_DENSITY,)

    def _approximate(
        self,
        delta: np.ndarray,
        base: np.ndarray,
        *,
        name: str,
        seed: int,
        params: dict[str, ParamValue],
    ) -> tuple[Arrays, Meta, float]:
        density = float(params["density"])
        mask = dare_mask(delta.size, density, tensor_generator(seed, name, "dare"))
        positions = np.flatnonzero(mask)
        values = (delta.reshape(-1)[positions] / delta.dtype.type(density)).astype(delta.dtype)
        arrays, kept = self._pack(positions, values, delta.size)
        return arrays, {}, kept


def dare_mask(size: int, density: float, rng: np.random.Generator) -> np.ndarray:
    """DARE's random keep mask: each of ``size`` elements kept with probability ``density``."""
    out: np.ndarray = rng.random(size) < density
    return out

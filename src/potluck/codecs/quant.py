"""``quant``: Δ quantised to int8 or int4 with symmetric absmax scales per row or per group."""

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
)
from potluck.codecs.bits import pack_nibbles, unpack_nibbles
from potluck.params import Param, ParamValue


def _layout(shape: tuple[int, ...], group_size: int) -> tuple[int, int, int, int]:
    """(rows, row length, groups per row, group length) for a tensor of ``shape``.

    Rows run along the last axis (a scalar is one row of one); group_size 0 means one group per
    row. The last group of a row may be partial (zero padded during quantisation).
    """
    length = shape[-1] if shape else 1
    rows = int(np.prod(shape[:-1])) if shape else 1
    group = group_size if group_size > 0 else max(length, 1)
    return rows, length, -(-length // group), group


def _grouped(x: np.ndarray, groups: int, group: int) -> np.ndarray:
    """(rows, length) → (rows, groups, group), zero padded."""
    rows, length = x.shape
    padded = np.zeros((rows, groups * group), x.dtype)
    padded[:, :length] = x
    return padded.reshape(rows, groups, group)


def quantize(delta: np.ndarray, bits: int, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric absmax quantisation: (q as int8 with the delta's shape, scales (rows, groups)).

    scale = max |Δ| / qmax per group (qmax = 127 for int8, 7 for int4, so codes are symmetric),
    q = round-half-even(Δ / scale); a group of zeros gets scale 0 and codes 0. Then
    |Δ − q · scale| ≤ scale / 2 up to float rounding.
    """
    qmax = (1 << (bits - 1)) - 1
    rows, length, groups, group = _layout(delta.shape, group_size)
    g = _grouped(delta.reshape(rows, length), groups, group)
    scales = (np.abs(g).max(axis=2) if group else np.zeros((rows, groups), delta.dtype)) / qmax
    scales = scales.astype(delta.dtype)
    safe = np.where(scales == 0, delta.dtype.type(1), scales)
    q = np.clip(np.rint(g / safe[:, :, None]), -qmax, qmax).astype(np.int8)
    return q.reshape(rows, groups * group)[:, :length].reshape(delta.shape), scales


def dequantize(q: np.ndarray, scales: np.ndarray, group_size: int) -> np.ndarray:
    """Inverse of ``quantize`` (in the scales' dtype, with q's shape)."""
    rows, length, groups, group = _layout(q.shape, group_size)
    g = _grouped(q.reshape(rows, length).astype(scales.dtype), groups, group)
    out = (g * scales[:, :, None]).reshape(rows, groups * group)[:, :length]
    result: np.ndarray = out.reshape(q.shape)
    return result


class QuantCodec(LossyCodec):
    """Δ quantised to ``bits`` ∈ {4, 8} with one absmax scale per row (``group_size`` 0, the
    default) or per ``group_size`` consecutive elements of a row (rows run along the last axis).

    int8 codes are stored as an int8 array ``q`` with the tensor's shape; int4 codes (−7..7) as
    ``q + 8`` packed two per byte (low nibble first) in a flat uint8 ``q``. ``scales`` (rows,
    groups) are in the compute dtype. Max abs error ≤ scale / 2 per group.
    """

    name: ClassVar[str] = "quant"
    params: ClassVar[tuple[Param, ...]] = (
        Param(int, 8, "bits per code", choices=(4, 8), name="bits"),
        Param(int, 0, "elements per scale along a row; 0 = whole row", low=0, name="group_size"),
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
        bits = int(params["bits"])
        q, scales = quantize(delta, bits, int(params["group_size"]))
        stored = q if bits == 8 else pack_nibbles(q.reshape(-1) + 8)
        return {"q": stored, "scales": scales}, {}, 1.0

    def _delta_hat(self, payload: Payload, base: np.ndarray) -> np.ndarray:
        bits, group_size = meta_int(payload, "bits"), meta_int(payload, "group_size")
        rows, _length, groups, _group = _layout(base.shape, group_size)
        scales = get_array(payload, "scales", base.dtype, (rows, groups))
        if bits == 8:
            q = get_array(payload, "q", np.int8, base.shape)
        elif bits == 4:
            nibbles = unpack_nibbles(get_array(payload, "q", np.uint8), base.size, self.name)
            q = (nibbles.astype(np.int8) - 8).reshape(base.shape)
        else:
            raise malformed(self.name, f"bits is {bits}")
        return dequantize(q, scales, group_size)

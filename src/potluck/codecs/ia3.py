"""``ia3``: new ≈ base · s with one scale per channel along an axis, as (IA)³ rescales channels."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from potluck.codecs.base import (
    Arrays,
    ErrorReport,
    LossyCodec,
    Meta,
    Payload,
    get_array,
    malformed,
    meta_int,
    tensor_meta,
)
from potluck.errors import UserError
from potluck.params import Param, ParamValue


def _channels_first(a: np.ndarray, axis: int) -> np.ndarray:
    """``a`` as (channels, rest) with the channel axis first (a scalar is one channel)."""
    if a.ndim == 0:
        return a.reshape(1, 1)
    moved = np.moveaxis(a, axis, 0)
    return moved.reshape(moved.shape[0], int(np.prod(moved.shape[1:])))


def fit_channel_scales(new: np.ndarray, base: np.ndarray, axis: int) -> np.ndarray:
    """Least-squares s_c = ⟨base_c, new_c⟩ / ⟨base_c, base_c⟩ per channel c along ``axis``.

    A channel whose base is all zero cannot be scaled; it gets s_c = 1.
    """
    b, n = _channels_first(base, axis), _channels_first(new, axis)
    num = np.einsum("cr,cr->c", b, n)
    den = np.einsum("cr,cr->c", b, b)
    safe = np.where(den == 0, base.dtype.type(1), den)
    out: np.ndarray = np.where(den == 0, base.dtype.type(1), num / safe).astype(base.dtype)
    return out


def _broadcast(scales: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    if ndim == 0:
        return scales.reshape(())
    shape = [1] * ndim
    shape[axis] = scales.size
    return scales.reshape(shape)


class IA3Codec(LossyCodec):
    """(IA)³-style update (Liu et al. 2022): one scale per channel along ``axis``, fit by least
    squares per channel, so Δ̂ = base · (s − 1). Default axis 0 = output channels of a
    (out, in) weight. Lossy unless the update really is a per-channel rescaling.
    """

    name: ClassVar[str] = "ia3"
    reference_url: ClassVar[str | None] = "https://arxiv.org/abs/2205.05638"
    params: ClassVar[tuple[Param, ...]] = (
        Param(int, 0, "channel axis of the scaling vector (negative from the end)", name="axis"),
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
        axis = int(params["axis"])
        ndim = max(base.ndim, 1)
        if not -ndim <= axis < ndim:
            raise UserError(
                f"invalid value {axis} for parameter 'axis' of codec 'ia3': {name!r} has "
                f"{base.ndim} dimension(s)",
                hint=f"axis must be in [{-ndim}, {ndim - 1}]",
                name=name,
            )
        axis %= ndim
        scales = fit_channel_scales(base + delta, base, axis)
        return {"scales": scales}, {"axis": axis}, 1.0

    def _delta_hat(self, payload: Payload, base: np.ndarray) -> np.ndarray:
        axis = meta_int(payload, "axis")
        if not 0 <= axis < max(base.ndim, 1):
            raise malformed(self.name, f"axis {axis} for a {base.ndim}-D tensor")
        channels = base.shape[axis] if base.ndim else 1
        scales = get_array(payload, "scales", base.dtype, (channels,))
        one = base.dtype.type(1)
        out: np.ndarray = base * (_broadcast(scales, base.ndim, axis) - one)
        return out


def scales_payload(
    scales: np.ndarray,
    axis: int,
    *,
    shape: tuple[int, ...],
    dtype: str,
    source: str | None = None,
    error: ErrorReport | None = None,
) -> Payload:
    """An ``ia3`` payload with the given per-channel ``scales`` along ``axis``: no fit involved.

    For a tensor of ``shape`` and canonical ``dtype``; ``axis`` must be in [0, ndim) (0 for a
    scalar) and ``scales`` hold shape[axis] values, stored as given (C-contiguous), so already in
    the tensor's compute dtype (float64 for F64, else float32). The meta holds ``axis`` and, when
    given, ``source`` (e.g. ``"peft"``); ``error`` is the caller's measure of new ≈ base · s
    against the true delta (``None``: not measured).
    """
    meta = tensor_meta(shape, dtype)
    meta["axis"] = axis
    if source is not None:
        meta["source"] = source
    return Payload(IA3Codec.name, {"scales": np.ascontiguousarray(scales)}, meta, error)

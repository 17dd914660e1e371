"""The ``task_mask`` codec: one task's part of a TALL-masks or EMR merge.

A merge that keeps per-task parts (``tall_masks``, ``emr``) writes a merged model θ_m and, per
input model, a patch whose tensors use this codec. A payload holds:

* ``mask`` — one bit per element (``bits.pack_bits``: eight per byte, first element in the
  lowest bit), so a tensor of n elements costs ⌈n/8⌉ bytes;
* meta ``scale`` — the task's rescaler γ (1.0 for TALL masks), a float;
* meta ``origin`` — sha256 of the original base tensor θ₀ (the merge's base), and ``method``.

The task's tensor is θₜ = θ₀ + γ·mask ⊙ (θ_m − θ₀): the merged task vector, masked and rescaled.
It needs *two* models: the merged one (the patch's pinned base) and the original base, so the
one-base ``decode`` refuses and ``decode_masked`` takes both. Where γ = 1 the result is chosen
element by element (mask ? θ_m : θ₀), bit-exact; otherwise it is computed in float32 (float64
for F64 tensors) and rounded once to the tensor's dtype.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from potluck.codecs.base import (
    Arrays,
    ErrorReport,
    Meta,
    Payload,
    UpdateCodec,
    compute_dtype,
    get_array,
    malformed,
    meta_str,
    tensor_meta,
)
from potluck.codecs.bits import pack_bits, unpack_bits
from potluck.errors import IntegrityError, UserError
from potluck.params import ParamValue
from potluck.tensors.digests import tensor_sha256
from potluck.tensors.dtypes import from_numpy

__all__ = ["MASK_CODEC", "TaskMaskCodec", "decode_masked", "mask_payload", "masked_task_vector"]

MASK_CODEC = "task_mask"

_HOW = (
    "apply it with `potluck patch apply MERGED MERGED/tasks/NAME.patch -o OUT` (it finds the "
    "original base, or give it with --with BASE)"
)


def masked_task_vector(
    mask: np.ndarray, scale: float, merged: np.ndarray, origin: np.ndarray
) -> np.ndarray:
    """θₜ = θ₀ + γ·mask ⊙ (θ_m − θ₀) in the tensors' dtype (see the module docstring)."""
    if scale == 1.0:
        out: np.ndarray = np.where(mask, merged, origin)
        return out
    ct = compute_dtype(from_numpy(origin.dtype), codec=MASK_CODEC, name="<payload>")
    o = origin.astype(ct)
    step = (merged.astype(ct) - o) * ct.type(scale)
    result: np.ndarray = np.where(mask, o + step, o).astype(origin.dtype)
    return result


def mask_payload(
    mask: np.ndarray,
    scale: float,
    origin: np.ndarray,
    *,
    method: str,
    error: ErrorReport | None = None,
) -> Payload:
    """The payload of one tensor: ``mask`` (bool, the tensor's shape) and rescaler ``scale``."""
    meta: Meta = tensor_meta(origin.shape, from_numpy(origin.dtype))
    meta.update({"scale": float(scale), "origin": tensor_sha256(origin), "method": method})
    return Payload(MASK_CODEC, {"mask": pack_bits(mask)}, meta, error)


def _scale(payload: Payload) -> float:
    value = payload.meta.get("scale")
    if not isinstance(value, int | float) or isinstance(value, bool) or not np.isfinite(value):
        raise malformed(MASK_CODEC, f"meta 'scale' is {value!r}, expected a finite number")
    return float(value)


def decode_masked(
    payload: Payload, merged: np.ndarray, origin: np.ndarray, *, name: str
) -> np.ndarray:
    """Tensor ``name`` of the task's model from its payload, the merged tensor and the original
    base tensor; an ``IntegrityError`` when ``origin`` is not the base the merge used."""
    codec = TaskMaskCodec()
    codec.check_base(payload, merged)
    want = meta_str(payload, "origin")
    if origin.shape != merged.shape or origin.dtype != merged.dtype:
        raise IntegrityError(
            f"original base tensor {name!r} is {from_numpy(origin.dtype)} {list(origin.shape)}, "
            f"the merged one {from_numpy(merged.dtype)} {list(merged.shape)}",
            hint="give the base the merge was made from (--with BASE)",
            tensor=name,
        )
    if tensor_sha256(origin) != want:
        raise IntegrityError(
            f"original base tensor {name!r} is not the one the merge used (expected sha256 {want})",
            hint="give the base the merge was made from (--with BASE)",
            tensor=name,
            expected=want,
        )
    mask = unpack_bits(get_array(payload, "mask", np.uint8), merged.size, MASK_CODEC)
    return masked_task_vector(mask.reshape(merged.shape), _scale(payload), merged, origin)


class TaskMaskCodec(UpdateCodec):
    """One task's bit-packed mask and rescaler over a merged task vector (module docstring).

    Payloads are made by ``potluck merge`` (``mask_payload``), not by ``encode``, and rebuilt
    with ``decode_masked``, which needs the original base as well as the merged model.
    """

    name: ClassVar[str] = MASK_CODEC
    exact: ClassVar[bool] = False
    #: Rebuilding needs two models (merged and original base): the one-base ``encode`` and
    #: ``decode`` refuse, so the one-base codec contract does not apply to this codec.
    two_models: ClassVar[bool] = True
    reference_url: ClassVar[str | None] = "https://arxiv.org/abs/2405.07813"

    def check_base(self, payload: Payload, merged: np.ndarray) -> None:
        """The checks of ``decode`` (codec name, shape and dtype of the merged tensor)."""
        if payload.codec != self.name:
            raise UserError(
                f"codec {self.name!r} cannot decode a {payload.codec!r} payload",
                hint="decode with the codec named in the payload",
            )
        want = tensor_meta(merged.shape, from_numpy(merged.dtype))
        if (payload.meta.get("shape"), payload.meta.get("dtype")) != (
            want["shape"],
            want["dtype"],
        ):
            raise UserError(
                f"{self.name} payload was made for a {payload.meta.get('dtype')} tensor of shape "
                f"{payload.meta.get('shape')}, but the merged tensor is {want['dtype']} "
                f"{want['shape']}",
                hint="apply the patch to the merged model it was written with",
            )

    def _encode(
        self,
        new: np.ndarray,
        base: np.ndarray,
        *,
        name: str,
        seed: int,
        params: dict[str, ParamValue],
    ) -> tuple[Arrays, Meta, ErrorReport | None]:
        raise UserError(
            f"codec {self.name!r} is written by merges, not by `patch create` (tensor {name!r})",
            hint="run `potluck merge --method tall_masks|emr …`; it writes OUT/tasks/*.patch",
            codec=self.name,
        )

    def _decode(self, payload: Payload, base: np.ndarray) -> np.ndarray:
        raise UserError(
            f"a {self.name!r} payload rebuilds a task from the merged model and the original "
            "base; one base is not enough",
            hint=_HOW,
            codec=self.name,
        )

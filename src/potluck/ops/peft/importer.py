"""Import a PEFT adapter as a potluck patch: ``import_adapter(adapter_dir, base, out_patch)``
writes a patch pinned to the base's tensor hashes: LoRA factors stay low-rank (``lowrank``
payloads with the scaling folded into one factor), (IA)³ vectors become ``ia3`` payloads, DoRA
weights and ``modules_to_save`` copies are stored exactly (``exact_xor`` of the merged tensor).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from potluck.codecs import (
    CODECS,
    ErrorReport,
    Payload,
    dense_payload,
    factors_payload,
    get_codec,
    scales_payload,
)
from potluck.codecs.base import error_report
from potluck.fileio import file_sha256
from potluck.ops.models.sources import ModelSource, open_path
from potluck.ops.patch.fileformat import PatchContents, write_patch
from potluck.ops.peft.adapter import (
    AdapterPlan,
    ModuleUpdate,
    check_float,
    merged,
    merged_weight,
    plan_adapter,
)
from potluck.ops.peft.arithmetic import to_f32
from potluck.tensors.digests import tensor_sha256
from potluck.tensors.dtypes import from_numpy

__all__ = ["PeftImportReport", "import_adapter"]


@dataclass
class PeftImportReport:
    """What ``import_adapter`` wrote."""

    path: str
    size: int
    peft_type: str
    codecs: dict[str, str] = field(default_factory=dict)
    base_digest: str = ""


def _lowrank_payload(b: np.ndarray, a: np.ndarray, base: np.ndarray, exact: np.ndarray) -> Payload:
    """A ``lowrank`` payload with factors ``b`` (m × r) and ``a`` (r × n), no SVD involved;
    its error is measured against ``exact``, the adapter's delta in float64."""
    ct = np.float64 if base.dtype == np.float64 else np.float32
    b_ct, a_ct = np.ascontiguousarray(b.astype(ct)), np.ascontiguousarray(a.astype(ct))
    error = error_report(exact, b_ct @ a_ct, a.shape[0] / max(1, min(base.shape)))
    dtype = from_numpy(base.dtype)
    return factors_payload(b_ct, a_ct, shape=base.shape, dtype=dtype, source="peft", error=error)


def _dense_payload(delta: np.ndarray, base: np.ndarray) -> Payload:
    return dense_payload(
        to_f32(delta),
        shape=base.shape,
        dtype=from_numpy(base.dtype),
        source="peft",
        error=ErrorReport(0.0, 0.0, 1.0),
    )


def _ia3_payload(scales: np.ndarray, axis: int, base: np.ndarray) -> Payload:
    l32 = np.ascontiguousarray(to_f32(scales))
    shape = [1] * base.ndim
    shape[axis] = l32.size
    w32, w64 = to_f32(base), base.astype(np.float64)
    approx = w32 * (l32.reshape(shape) - np.float32(1))
    error = error_report(w64 * (l32.astype(np.float64).reshape(shape) - 1), approx, 1.0)
    dtype = from_numpy(base.dtype)
    return scales_payload(l32, axis, shape=base.shape, dtype=dtype, source="peft", error=error)


def _import_weight(upd: ModuleUpdate, w: np.ndarray) -> tuple[Payload, str]:
    t = upd.tensors
    if upd.kind == "ia3":
        return _ia3_payload(t["ia3"], upd.axis, w), "ia3"
    if upd.dora:
        new = merged_weight(upd, w).astype(w.dtype)
        return get_codec("exact_xor").encode(new, w, name=upd.weight, seed=0), "dora"
    s = np.float32(upd.scaling)
    a32, b32 = to_f32(t["A"]), to_f32(t["B"])
    exact = (b32.astype(np.float64) @ a32.astype(np.float64)) * float(s)
    if upd.transpose:  # Δ = (B A)ᵀ s = (Aᵀ s) Bᵀ
        return _lowrank_payload(a32.T * s, b32.T, w, exact.T), upd.kind + "_t"
    return _lowrank_payload(b32 * s, a32, w, exact), upd.kind


def _import_bias(upd: ModuleUpdate, b: np.ndarray) -> Payload:
    if upd.kind == "ia3":
        return _ia3_payload(upd.tensors["ia3"], 0, b)
    return _dense_payload(to_f32(upd.tensors["bias"]) * np.float32(upd.scaling), b)


def _import_one(plan: AdapterPlan, base: ModelSource, name: str) -> tuple[Payload, str]:
    orig = plan.replaced.get(name)
    w = base.read(name) if orig is None else orig
    if orig is not None and name not in plan.updates and name not in plan.biases:
        return get_codec("exact_xor").encode(orig, base.read(name), name=name, seed=0), "full"
    if orig is not None:  # a replaced weight that is also adapted: store the exact result
        new = merged(plan, base, name)
        return get_codec("exact_xor").encode(new, base.read(name), name=name, seed=0), "full"
    if name in plan.updates:
        return _import_weight(plan.updates[name], w)
    return _import_bias(plan.biases[name], w), "bias"


def import_adapter(
    adapter_dir: str | os.PathLike[str],
    base_path: str | os.PathLike[str],
    out_patch: str | os.PathLike[str],
) -> PeftImportReport:
    """Write a potluck patch equivalent to merging the adapter into ``base_path``.

    The patch pins the sha256 of every base tensor it changes. ``potluck patch apply`` of it
    gives ``apply_adapter``'s weights bit for bit for exactly-coded tensors (DoRA,
    ``modules_to_save``), and within float32 rounding for LoRA factors (the scaling is folded
    into one factor, so ``(s·B) @ A`` is rounded differently from peft's ``(B @ A)·s``) and
    (IA)³ vectors (decoded as ``W + W·(l − 1)``).
    """
    payloads: dict[str, Payload] = {}
    base_hashes: dict[str, str] = {}
    result: dict[str, str] = {}
    kinds: dict[str, str] = {}
    with open_path(base_path) as base:
        plan = plan_adapter(adapter_dir, base)
        check_float(base, plan)
        for name in plan.changed():
            payload, kind = _import_one(plan, base, name)
            payloads[name], kinds[name] = payload, kind
            base_hashes[name] = tensor_sha256(base.read(name))
            if CODECS.get(payload.codec).exact:
                result[name] = tensor_sha256(merged(plan, base, name))
    desc = {
        "source": "peft",
        "peft_type": plan.config.peft_type,
        "adapter_sha256": file_sha256(plan.adapter_file),
        "base_model": plan.config.base_model,
        "peft_kinds": kinds,
    }
    contents = PatchContents(payloads, base_hashes, result, [], [], desc)
    size = write_patch(out_patch, contents)
    codecs = {n: p.codec for n, p in payloads.items()}
    return PeftImportReport(
        str(out_patch), size, plan.config.peft_type, codecs, contents.base_digest
    )

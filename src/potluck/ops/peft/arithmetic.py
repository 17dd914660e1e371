"""The arithmetic of PEFT's ``merge_and_unload()`` (peft 0.21.2, CPU), reproduced in numpy.

Everything is computed in float32 like peft on CPU: fp16/bf16 adapter weights are upcast (as
``PeftModel.from_pretrained(autocast_adapter_dtype=True)`` does), base weights are upcast, and
the result is rounded back to the base dtype once. The operation order is peft's:

* LoRA delta: ``transpose(B @ A, fan_in_fan_out) * scaling`` — ``B @ A`` as torch's CPU GEMM
  computes it for small inner dimensions: one fused multiply-add per rank step, in rank order
  (``fma_matmul``), then the scaling (a float32 multiply), then ``W + delta``.
* DoRA: ``norm = ‖W + delta‖`` per output row summed as torch's CPU kernel sums it
  (``row_norm``), ``factor = m / norm``, ``W' = factor · (W + delta)``.
* (IA)³: ``W' = W · l`` (rows for ordinary modules, columns for feed-forward ones; transposed
  with ``fan_in_fan_out``), ``bias' = bias · l`` for ordinary modules only.
"""

from __future__ import annotations

import numpy as np

__all__ = ["dora_merge", "fma_matmul", "ia3_merge", "lora_delta", "row_norm", "to_f32"]

_F32 = np.dtype(np.float32)
#: Rows of the output computed at once by ``fma_matmul`` (bounds its float64 scratch memory).
_BLOCK_ELEMENTS = 1 << 16


def to_f32(a: np.ndarray) -> np.ndarray:
    """``a`` as float32 (a no-op for float32 input)."""
    return a if a.dtype == _F32 else a.astype(_F32)


def _fma32(x: np.ndarray, y: np.ndarray, acc: np.ndarray) -> np.ndarray:
    """``round_f32(x·y + acc)`` with one rounding, as a hardware FMA gives (exact rule).

    The product of two float32 values is exact in float64; the float64 sum is rounded to odd
    (its exact error from TwoSum decides), after which rounding to float32 is correctly rounded
    (round-to-odd with ≥ 2 extra bits avoids double rounding).
    """
    p = x.astype(np.float64) * y.astype(np.float64)
    c = acc.astype(np.float64)
    s = p + c
    bb = s - p
    err = (p - (s - bb)) + (c - bb)
    bits = s.view(np.int64)
    fix = (err != 0) & ((bits & 1) == 0) & np.isfinite(s)
    if np.any(fix):
        step = np.where((err > 0) == (s > 0), 1, -1).astype(np.int64)
        s = np.where(fix, (bits + step).view(np.float64), s)
    out: np.ndarray = s.astype(_F32)
    return out


#: Low 29 bits of a float64 that lies exactly on a float32 tie: only then (or for subnormal
#: float32 results) can rounding the float64 sum first differ from a single rounding.
_LOW29, _TIE29 = np.int64((1 << 29) - 1), np.int64(1 << 28)
_MIN_NORMAL32 = float(np.finfo(np.float32).tiny)


def _fma_step(p: np.ndarray, acc: np.ndarray, buf: dict[str, np.ndarray]) -> None:
    """``acc ← round_f32(p + acc)`` in place, for exact float64 products ``p`` (fast path).

    Elements whose float64 sum is a float32 tie or subnormal are redone with ``_fma32``.
    """
    s, mask, tiny = buf["s"], buf["mask"], buf["tiny"]
    np.add(p, acc, out=s)
    np.bitwise_and(s.view(np.int64), _LOW29, out=buf["low"])
    np.equal(buf["low"], _TIE29, out=mask)
    np.less(np.abs(s, out=buf["abs"]), _MIN_NORMAL32, out=tiny)
    np.logical_or(mask, tiny, out=mask)
    if not mask.any():
        acc[...] = s
        return
    idx = np.flatnonzero(mask)
    old = acc.reshape(-1)[idx].copy()
    acc[...] = s
    flat_p = p.reshape(-1)[idx]
    acc.reshape(-1)[idx] = _fma32(flat_p, np.ones_like(flat_p), old)


def fma_matmul(b: np.ndarray, a: np.ndarray) -> np.ndarray:
    """``b @ a`` in float32 with a fused multiply-add per inner step, in order (torch CPU)."""
    b64, a64 = to_f32(b).astype(np.float64), to_f32(a).astype(np.float64)
    m, r = b64.shape
    n = a64.shape[1]
    out = np.zeros((m, n), _F32)
    rows = max(1, _BLOCK_ELEMENTS // max(n, 1))
    shape = (min(rows, m), n)
    kinds = {"p": np.float64, "s": np.float64, "abs": np.float64, "low": np.int64}
    full = {k: np.empty(shape, t) for k, t in kinds.items()}
    full |= {"mask": np.empty(shape, bool), "tiny": np.empty(shape, bool)}
    for start in range(0, m, rows):
        acc = out[start : start + rows]
        buf = {k: v[: acc.shape[0]] for k, v in full.items()}
        for k in range(r):
            np.multiply(b64[start : start + acc.shape[0], k : k + 1], a64[k : k + 1], out=buf["p"])
            _fma_step(buf["p"], acc, buf)
    return out


#: float32 lanes of torch's vectorised CPU reductions (AVX2; AVX-512 builds use 16).
TORCH_LANES = 8


def row_norm(v: np.ndarray, *, strided: bool) -> np.ndarray:
    """L2 norm of each row of ``v`` (float32) in the order torch 2.13's CPU kernel sums.

    Squares are rounded to float32, then summed in float32: for a contiguous row (a Linear
    weight), ``TORCH_LANES`` running sums over the row's full lane chunks, added together in
    lane order, then the leftover elements (fused multiply-adds); for a strided row (the
    transposed Conv1D weight of ``fan_in_fan_out``), one running sum in element order. The
    contiguous case is bit-exact when the row length is a multiple of the lane count (measured:
    0 of 200 rows differ for lengths 8–4096); leftovers can differ in the last bit.
    """
    sq = np.square(to_f32(v))
    rows, n = sq.shape
    if strided:
        total = np.zeros(rows, _F32)
        for k in range(n):
            total += sq[:, k]
        return np.sqrt(total)
    lanes = np.zeros((rows, TORCH_LANES), _F32)
    full = n - n % TORCH_LANES
    for start in range(0, full, TORCH_LANES):
        lanes += sq[:, start : start + TORCH_LANES]
    total = np.zeros(rows, _F32)
    for j in range(TORCH_LANES):
        total += lanes[:, j]
    for k in range(full, n):
        total = _fma32(v[:, k], v[:, k], total)
    out: np.ndarray = np.sqrt(total)
    return out


def lora_delta(b: np.ndarray, a: np.ndarray, scaling: float, *, transpose: bool) -> np.ndarray:
    """peft's ``get_delta_weight``: ``transpose(B @ A) * scaling`` in float32."""
    prod = fma_matmul(b, a)
    if transpose:
        prod = np.ascontiguousarray(prod.T)
    out: np.ndarray = prod * np.float32(scaling)
    return out


def dora_merge(
    weight: np.ndarray, delta: np.ndarray, magnitude: np.ndarray, *, transpose: bool
) -> np.ndarray:
    """DoRA: ``(m / ‖W + Δ‖_row) · (W + Δ)`` in float32; rows are output channels."""
    w32 = to_f32(weight)
    merged = w32 + delta
    rows = merged.T if transpose else merged
    norm = row_norm(rows, strided=transpose)
    factor = to_f32(magnitude) / norm
    shaped = factor.reshape(1, -1) if transpose else factor.reshape(-1, 1)
    out: np.ndarray = shaped * merged
    return out


def ia3_merge(weight: np.ndarray, scales: np.ndarray, *, axis: int) -> np.ndarray:
    """(IA)³: ``W · l`` with ``l`` broadcast along ``axis`` of ``W`` (float32)."""
    shape = [1] * weight.ndim
    shape[axis] = scales.size
    out: np.ndarray = to_f32(weight) * to_f32(scales).reshape(shape)
    return out

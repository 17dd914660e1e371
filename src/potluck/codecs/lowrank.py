"""``lowrank``: Δ ≈ B · A by truncated SVD (exact, or randomized after Halko et al. 2011).

Tensors of ndim ≥ 2 are treated as matrices (shape[0], prod(shape[1:])) (conv kernels: out ×
in·kh·kw). 1-D tensors and scalars have no low-rank structure: they fall back to a dense Δ
(``meta["mode"] == "dense"``, array ``delta``) so name-based rules can route a whole attention
block, biases included, to this codec.

``factors_payload`` and ``dense_payload`` build the same payloads from factors or a delta
computed elsewhere (an imported LoRA, a mixture of experts), without an SVD.

Memory: one tensor (the delta matrix in the compute dtype, plus the SVD's work): the SVD needs
the whole matrix, so this codec does not stream (``UpdateCodec.streams`` is False).
"""

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
    meta_str,
    tensor_generator,
    tensor_meta,
)
from potluck.params import Param, ParamValue

#: ``method="auto"`` uses the randomized SVD when the matrix's smaller side is at least this...
RANDOMIZED_MIN_SIDE = 512
#: ...and at least this many times the sketch width (rank + oversample).
RANDOMIZED_MIN_RATIO = 4


def randomized_svd(
    a: np.ndarray, rank: int, rng: np.random.Generator, *, oversample: int, power_iters: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Halko, Martinsson & Tropp (2011), Alg. 4.4 + 5.1: a rank-``rank`` SVD of ``a``.

    Gaussian sketch of width rank + oversample, ``power_iters`` rounds of subspace iteration
    with QR re-orthonormalisation, then an exact SVD of the small projected matrix.
    """
    m, n = a.shape
    width = min(rank + oversample, m, n)
    omega = rng.standard_normal((n, width)).astype(a.dtype)
    q, _ = np.linalg.qr(a @ omega)
    for _ in range(power_iters):
        z, _ = np.linalg.qr(a.T @ q)
        q, _ = np.linalg.qr(a @ z)
    ub, s, vt = np.linalg.svd(q.T @ a, full_matrices=False)
    return (q @ ub)[:, :rank], s[:rank], vt[:rank]


def truncated_svd(
    a: np.ndarray, rank: int, *, randomized: bool, rng: np.random.Generator | None, **kw: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The leading ``rank`` singular triplets of ``a`` (all of them when ``rank`` ≥ min(m, n))."""
    m, n = a.shape
    rank = min(rank, m, n)
    if rank == 0:
        return np.zeros((m, 0), a.dtype), np.zeros(0, a.dtype), np.zeros((0, n), a.dtype)
    if randomized:
        assert rng is not None
        return randomized_svd(a, rank, rng, **kw)
    u, s, vt = np.linalg.svd(a, full_matrices=False)
    return u[:, :rank], s[:rank], vt[:rank]


def energy_rank(s: np.ndarray, total: float, energy: float, cap: int) -> int:
    """Smallest r ≤ ``cap`` with Σ_{i<r} σᵢ² ≥ energy · ``total`` (``cap`` when not reached).

    ``energy`` 0 disables the criterion; a zero matrix gets rank 0.
    """
    cap = min(cap, s.size)
    if total <= 0:
        return 0
    if energy <= 0:
        return cap
    cum = np.cumsum(s[:cap].astype(np.float64) ** 2) / total
    hit = np.flatnonzero(cum >= energy * (1 - 1e-12))
    return int(hit[0]) + 1 if hit.size else cap


class LowRankCodec(LossyCodec):
    """Truncated SVD of Δ: ``lora_B`` (m × r, columns scaled by σ) and ``lora_A`` (r × n), so
    Δ̂ = lora_B @ lora_A as in LoRA.

    r = ``rank`` (default 16), or fewer when ``energy`` > 0 and the leading singular values
    already hold that fraction of ‖Δ‖²_F. ``method``: ``exact`` (LAPACK SVD), ``randomized``
    (Halko et al., sketch width rank + ``oversample``, ``power_iters`` subspace iterations, a
    Philox generator keyed by (seed, tensor name)), or ``auto`` (randomized when the smaller side
    is ≥ 512 and ≥ 4 × (rank + oversample)). With the exact SVD the relative error equals
    sqrt(Σ_{i≥r} σᵢ²) / ‖Δ‖_F (Eckart–Young). 1-D tensors and scalars are stored dense.
    ``rows="changed"`` factors only the rows of Δ that are not zero (their indices are stored;
    the others stay exactly unchanged) — an embedding matrix of which a fine-tune touched a few
    thousand token rows. ``factors="F16"`` stores the factors in float16 (half the bytes; the
    product is formed in float32 and cast; each factor entry carries an extra relative error of
    about 2⁻¹¹).
    """

    name: ClassVar[str] = "lowrank"
    reference_url: ClassVar[str | None] = "https://arxiv.org/abs/0909.4061"
    params: ClassVar[tuple[Param, ...]] = (
        Param(int, 16, "maximum rank kept", low=1, name="rank"),
        Param(float, 0.0, "stop at this fraction of ‖Δ‖²; 0 = off", low=0, high=1, name="energy"),
        Param(str, "auto", "SVD algorithm", choices=("auto", "exact", "randomized"), name="method"),
        Param(int, 10, "extra sketch columns (randomized)", low=0, name="oversample"),
        Param(int, 2, "subspace iterations (randomized)", low=0, name="power_iters"),
        Param(
            str,
            "all",
            "factor all rows, or only rows that changed (sparse embeddings)",
            choices=("all", "changed"),
            name="rows",
        ),
        Param(
            str,
            "same",
            "dtype of the stored factors (same as the tensor, or F16)",
            choices=("same", "F16"),
            name="factors",
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
        rank, oversample = int(params["rank"]), int(params["oversample"])
        side = min(a.shape)
        randomized = params["method"] == "randomized" or (
            params["method"] == "auto"
            and side >= RANDOMIZED_MIN_SIDE
            and side >= RANDOMIZED_MIN_RATIO * (rank + oversample)
        )
        rng = tensor_generator(seed, name, "lowrank") if randomized else None
        kw = {"oversample": oversample, "power_iters": int(params["power_iters"])}
        u, s, vt = truncated_svd(a, rank, randomized=randomized, rng=rng, **kw)
        total = float(np.sum(a.astype(np.float64) ** 2))
        r = energy_rank(s, total, float(params["energy"]), rank)
        store = np.float16 if params["factors"] == "F16" else delta.dtype
        arrays = {
            "lora_B": np.ascontiguousarray((u[:, :r] * s[:r]).astype(store)),
            "lora_A": np.ascontiguousarray(vt[:r].astype(store)),
        }
        meta: Meta = {"mode": "factors", "kept_rank": r, "randomized": int(randomized)}
        with_rows(arrays, meta, rows)
        return arrays, meta, (r / side if side else 1.0)

    def _delta_hat(self, payload: Payload, base: np.ndarray) -> np.ndarray:
        mode = meta_str(payload, "mode")
        if mode == "dense":
            return get_array(payload, "delta", base.dtype, (base.size,)).reshape(base.shape)
        if mode not in ("factors", "row_factors") or base.ndim < 2:
            raise malformed(self.name, f"mode {mode!r} for a {base.ndim}-D tensor")
        r, m = meta_int(payload, "kept_rank"), base.shape[0]
        n = int(np.prod(base.shape[1:]))
        rows = payload_rows(self.name, payload, mode, m)
        store = payload.arrays.get("lora_B")
        dtype = np.float16 if store is not None and store.dtype == np.float16 else base.dtype
        k = m if rows is None else rows.size
        b = get_array(payload, "lora_B", dtype, (k, r))
        a = get_array(payload, "lora_A", dtype, (r, n))
        if dtype != base.dtype:  # float16 factors: multiply in float32, round once
            part = (b.astype(np.float32) @ a.astype(np.float32)).astype(base.dtype)
        else:
            part = b @ a
        return place_rows(part, rows, base)


def delta_matrix(delta: np.ndarray, changed_rows: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """A 2-D-or-more delta as the matrix the factor codecs approximate (rows × the rest) and,
    with ``changed_rows``, only its rows that are not all zero plus their indices (``rows``
    of a ``row_factors`` payload)."""
    a = delta.reshape(delta.shape[0], int(np.prod(delta.shape[1:])))
    if not changed_rows:
        return a, None
    rows = np.flatnonzero(np.any(a != 0, axis=1)).astype(np.uint32)
    return a[rows], rows


def with_rows(arrays: Arrays, meta: Meta, rows: np.ndarray | None) -> None:
    """Mark a factors payload as ``row_factors`` over ``rows`` (nothing when None)."""
    if rows is not None:
        arrays["rows"] = rows
        meta["mode"] = "row_factors"


def payload_rows(codec: str, payload: Payload, mode: str, m: int) -> np.ndarray | None:
    """The row indices of a ``row_factors`` payload of an ``m``-row tensor, checked."""
    if mode != "row_factors":
        return None
    rows = get_array(payload, "rows", np.uint32)
    if rows.ndim != 1 or (rows.size and int(rows.max()) >= m):
        raise malformed(codec, "row indices out of range")
    return rows


def place_rows(part: np.ndarray, rows: np.ndarray | None, base: np.ndarray) -> np.ndarray:
    """The decoded factor product as a delta of ``base``'s shape: ``part`` itself, or its
    rows placed at ``rows`` with zeros elsewhere."""
    if rows is None:
        return np.asarray(part).reshape(base.shape)
    out = np.zeros((base.shape[0], int(np.prod(base.shape[1:]))), dtype=base.dtype)
    out[rows] = part
    return out.reshape(base.shape)


def _given_meta(
    shape: tuple[int, ...], dtype: str, params: dict[str, object], keys: Meta, source: str | None
) -> Meta:
    """The meta of a payload built from given arrays: the header, the codec's parameters
    (defaults overlaid with ``params``), the mode's ``keys`` and ``source`` when given."""
    meta = {**tensor_meta(shape, dtype), **LowRankCodec().resolve_params(params), **keys}
    if source is not None:
        meta["source"] = source
    return meta


def factors_payload(
    b: np.ndarray,
    a: np.ndarray,
    *,
    shape: tuple[int, ...],
    dtype: str,
    source: str | None = None,
    error: ErrorReport | None = None,
) -> Payload:
    """A ``lowrank`` payload with the given factors, Δ̂ = ``b`` @ ``a``: no SVD involved.

    ``b`` is m × r (``lora_B``) and ``a`` r × n (``lora_A``) for a tensor of ``shape`` (m =
    shape[0], n = the product of the rest) and canonical ``dtype``. The factors are stored as
    given (C-contiguous), so they must already be in what ``decode`` expects: the tensor's compute
    dtype (float64 for F64, else float32) or float16. The meta holds the codec's default
    parameters with ``rank`` = max(1, r), ``mode="factors"``, ``kept_rank`` = r,
    ``randomized=0`` and, when given, ``source`` (e.g. ``"peft"``); ``error`` is the caller's
    measure of the factors against the true delta (``None``: not measured).
    """
    r = int(a.shape[0])
    keys: Meta = {"mode": "factors", "kept_rank": r, "randomized": 0}
    meta = _given_meta(shape, dtype, {"rank": max(1, r)}, keys, source)
    arrays = {"lora_B": np.ascontiguousarray(b), "lora_A": np.ascontiguousarray(a)}
    return Payload(LowRankCodec.name, arrays, meta, error)


def dense_payload(
    delta: np.ndarray,
    *,
    shape: tuple[int, ...],
    dtype: str,
    source: str | None = None,
    error: ErrorReport | None = None,
) -> Payload:
    """A ``lowrank`` payload storing ``delta`` whole (``mode="dense"``), as the codec stores 1-D
    tensors and scalars.

    ``delta`` (any shape with prod(``shape``) elements) is stored flattened as given, so it must
    already be in the tensor's compute dtype (float64 for F64, else float32). The meta holds the
    codec's default parameters, ``mode="dense"``, ``kept_rank=0`` and, when given, ``source``;
    ``error`` as for ``factors_payload``.
    """
    meta = _given_meta(shape, dtype, {}, {"mode": "dense", "kept_rank": 0}, source)
    arrays = {"delta": np.ascontiguousarray(delta.reshape(-1))}
    return Payload(LowRankCodec.name, arrays, meta, error)

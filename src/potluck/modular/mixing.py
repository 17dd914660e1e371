"""Mixing low-rank experts in numpy: Arrow prototypes, output mixtures, SMEAR, exact export.

Shapes follow LoRA: expert e's update of a ``[out, in]`` weight is ΔWₑ = Bₑ·Aₑ with
``A [E, r, in]`` and ``B [E, out, r]`` (experts of lower rank are zero-padded to r).
"""

from __future__ import annotations

import numpy as np

from potluck.errors import UserError

__all__ = [
    "arrow_prototype",
    "concat_factors",
    "mix_outputs",
    "pad_factors",
    "smear_factors",
    "smear_outputs",
]


def arrow_prototype(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Unit top right-singular vector of ΔW = b·a (``a [r, in]``, ``b [out, r]``), float64.

    Computed without forming ΔW: Aᵀ = Qa·Ra and B = Qb·Rb (thin QR) give
    ΔW = Qb·(Rb·Raᵀ)·Qaᵀ; the SVD of the r×r core U·S·Vᵀ gives the right singular vectors Qa·V.
    The sign is fixed so the largest-magnitude entry is positive (Arrow's logits use |⟨h, p⟩|,
    so the sign never matters). A zero update has no direction: ``UserError``.
    """
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a64.ndim != 2 or b64.ndim != 2 or a64.shape[0] != b64.shape[1]:
        raise UserError(
            f"LoRA factors do not chain: A {a64.shape}, B {b64.shape}",
            hint="A must be [r, in] and B [out, r]",
        )
    qa, ra = np.linalg.qr(a64.T)
    _qb, rb = np.linalg.qr(b64)
    _u, s, vt = np.linalg.svd(rb @ ra.T)
    if s.size == 0 or s[0] == 0:
        raise UserError("the update is zero: it has no Arrow prototype", hint="check the expert")
    p: np.ndarray = qa @ vt[0]
    p /= np.linalg.norm(p)
    return p if p[np.argmax(np.abs(p))] >= 0 else -p


def pad_factors(
    factors: list[tuple[np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray]:
    """Stack per-expert (A [rₑ, in], B [out, rₑ]) as A [E, r, in], B [E, out, r], r = max rₑ.

    Zero rows/columns pad lower ranks, which leaves every Bₑ·Aₑ unchanged.
    """
    r = max(a.shape[0] for a, _ in factors)
    n_in, n_out = factors[0][0].shape[1], factors[0][1].shape[0]
    dtype = np.result_type(*[a.dtype for a, _ in factors], *[b.dtype for _, b in factors])
    a_out = np.zeros((len(factors), r, n_in), dtype=dtype)
    b_out = np.zeros((len(factors), n_out, r), dtype=dtype)
    for e, (a, b) in enumerate(factors):
        if a.shape[1] != n_in or b.shape[0] != n_out:
            raise UserError(
                f"expert #{e} updates a [{b.shape[0]}, {a.shape[1]}] weight, others "
                f"[{n_out}, {n_in}]",
                hint="all experts of one layer must adapt the same weight",
                expert_index=e,
            )
        a_out[e, : a.shape[0]] = a
        b_out[e, :, : b.shape[1]] = b
    return a_out, b_out


def mix_outputs(x: np.ndarray, a: np.ndarray, b: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Output mixture ``[T, out]``: row t is Σₑ w[t, e]·Bₑ·Aₑ·x[t] (``x [T, in]``, ``w [T, E]``)."""
    z = np.einsum("ti,eri->ter", x, a)
    y = np.einsum("ter,eor->teo", z, b)
    out: np.ndarray = np.einsum("te,teo->to", w, y)
    return out


def smear_factors(a: np.ndarray, b: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SMEAR's merged expert for weights ``w [E]``: (Σ wₑ Aₑ, Σ wₑ Bₑ)."""
    return np.einsum("e,eri->ri", w, a), np.einsum("e,eor->or", w, b)


def smear_outputs(x: np.ndarray, a: np.ndarray, b: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Row t runs the parameter-averaged expert of weights ``w[t]``: (Σ wB)(Σ wA) x[t]."""
    a_bar = np.einsum("te,eri->tri", w, a)
    b_bar = np.einsum("te,eor->tor", w, b)
    z = np.einsum("ti,tri->tr", x, a_bar)
    out: np.ndarray = np.einsum("tr,tor->to", z, b_bar)
    return out


def concat_factors(
    factors: list[tuple[np.ndarray, np.ndarray]], weights: list[float]
) -> tuple[np.ndarray, np.ndarray]:
    """One low-rank pair equal to Σ wₑ Bₑ Aₑ exactly: A = [A₁; A₂; …], B = [w₁B₁ | w₂B₂ | …]."""
    kept = [(a, b, w) for (a, b), w in zip(factors, weights, strict=True) if w != 0]
    if not kept:
        a0, b0 = factors[0]
        return np.zeros((0, a0.shape[1]), a0.dtype), np.zeros((b0.shape[0], 0), b0.dtype)
    a_cat = np.concatenate([a for a, _, _ in kept], axis=0)
    b_cat = np.concatenate([b * b.dtype.type(w) for _, b, w in kept], axis=1)
    return a_cat, b_cat

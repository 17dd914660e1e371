"""Singular value decompositions for merge methods: exact, and fast top-k.

Three ways to the top ``k`` singular triplets of a task matrix, all returning float64:

* ``thin_svd`` — numpy's economy SVD, exact to rounding (the reference path; a QR first did
  not pay on one thread here: 6.8 s against 5.2 s for a 30522 × 384 embedding);
* ``gram_svd`` — the eigendecomposition of the shorter side's Gram matrix AᵀA in float64:
  σᵢ = √λᵢ, U = A·V/σ. One O(m·n²) product and an n × n ``eigh``: 0.46 s for a 30522 × 384
  embedding here against 5.2 s for LAPACK's SVD (one thread, load ≈ 7). Squaring the matrix
  squares its condition, so it is used only where σ_k ≥ σ₁·``GRAM_MIN_RATIO`` (then σᵢ and the
  rank-k reconstruction agree with the exact ones to ≈ n·ε₆₄·(σ₁/σ_k)² ≤ 1e-9 relative);
* ``randomized_svd`` — the randomized range finder of Halko, Martinsson & Tropp (2011,
  https://arxiv.org/abs/0909.4061, algorithms 4.4 and 5.1): sketch the range with ``k +
  OVERSAMPLE`` Gaussian test vectors, sharpen it with ``POWER_ITERS`` subspace iterations
  (re-orthonormalised by QR), project, and decompose the small projection exactly. The sketch
  runs in ``dtype`` (float32 by default). It pays off only when k is small against a large
  matrix, and it is accurate only when the spectrum falls well below σ_k within the sketch.

``top_k_svd`` picks: ``exact=True`` → ``thin_svd``; a large matrix (shorter side ≥
``RANDOMIZED_MIN_SIDE``) with a small sketch (≤ ``RANDOMIZED_MAX_FRACTION`` of the shorter side)
→ ``randomized_svd``, kept only when the energy its sketch leaves out, ‖A − QQᵀA‖_F, is at most
``TAIL_RATIO``·σ_k (so σ_{k+11} ≤ 0.1·σ_k, and the subspace error after q power iterations is of
order 0.1^(2q+1) = 1e-7, below float32's rounding) and σ_k ≥ σ₁·``GRAM_MIN_RATIO`` (a rank
below k leaves float32 noise there); otherwise ``gram_svd`` where its condition holds, else
``thin_svd``.

Stated tolerance of ``top_k_svd`` against numpy's full SVD (tested in ``tests/test_svd.py`` on
matrices with known spectra, the 30522 × 384 embedding shape at a tenth of its height among
them), as relative Frobenius error of the rank-k reconstruction U_k·diag(σ_k)·V_kᵀ and relative
error of each σᵢ: ≤ 1e-9 on the ``gram_svd`` and ``thin_svd`` paths where the top-k is well
defined (σ_{k+1} ≤ (1 − 1e-3)·σ_k; closer, any rounding may swap the k-th direction); ≤ 1e-5
on the float32 randomized path (which runs only when σ_{k+11} ≤ 0.1·σ_k).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "GRAM_MIN_RATIO",
    "OVERSAMPLE",
    "POWER_ITERS",
    "RANDOMIZED_MAX_FRACTION",
    "RANDOMIZED_MIN_SIDE",
    "TAIL_RATIO",
    "gram_svd",
    "numerical_rank",
    "polar_factor",
    "randomized_svd",
    "thin_svd",
    "top_k_svd",
]

#: Extra random test vectors beyond k (Halko et al.'s p; 5–10 is their advice).
OVERSAMPLE = 10
#: Subspace iterations: each multiplies the error of the sketched subspace by (σ_{l+1}/σ_k)².
POWER_ITERS = 3
#: The randomized path is tried only for a sketch of at most this fraction of the shorter side …
RANDOMIZED_MAX_FRACTION = 0.25
#: … and only on matrices whose shorter side is at least this long (below, ``gram_svd`` wins).
RANDOMIZED_MIN_SIDE = 1024
#: A randomized result is kept only when ‖A − QQᵀA‖_F ≤ TAIL_RATIO·σ_k.
TAIL_RATIO = 0.1
#: ``gram_svd`` answers only for σ_k ≥ σ₁·GRAM_MIN_RATIO.
GRAM_MIN_RATIO = 1e-3

Triplets = tuple[np.ndarray, np.ndarray, np.ndarray]


def _transposed(t: Triplets) -> Triplets:
    """The triplets of Aᵀ from those of A."""
    u, s, vt = t
    return vt.T, s, u.T


def thin_svd(matrix: np.ndarray) -> Triplets:
    """Exact economy SVD ``(U [m, r], σ [r], Vᵀ [r, n])``, r = min(m, n), in float64: numpy's
    (LAPACK ``gesdd``), the reference every other path is measured against."""
    u, s, vt = np.linalg.svd(np.asarray(matrix, dtype=np.float64), full_matrices=False)
    return u, s, vt


def gram_svd(matrix: np.ndarray, k: int) -> Triplets | None:
    """The top ``k`` triplets through ``eigh`` of the shorter side's Gram matrix, in float64;
    None when σ_k < σ₁·``GRAM_MIN_RATIO`` (too ill-conditioned for squaring) or A = 0."""
    a = np.asarray(matrix, dtype=np.float64)
    m, n = a.shape
    if m < n:
        found = gram_svd(a.T, k)
        return None if found is None else _transposed(found)
    if k == 0:
        return np.zeros((m, 0)), np.zeros(0), np.zeros((0, n))
    evals, evecs = np.linalg.eigh(a.T @ a)  # ascending
    top = np.sqrt(np.maximum(evals[::-1][:k], 0.0))
    if top[0] == 0 or top[-1] < top[0] * GRAM_MIN_RATIO:
        return None
    v = evecs[:, ::-1][:, :k]
    return (a @ v) / top, top, v.T


def randomized_svd(
    matrix: np.ndarray,
    k: int,
    *,
    rng: np.random.Generator,
    dtype: type[np.floating] | np.dtype = np.float32,
    oversample: int = OVERSAMPLE,
    power_iters: int = POWER_ITERS,
) -> tuple[Triplets, float]:
    """Halko et al.'s randomized top-``k`` SVD (module docstring) and ‖A − QQᵀA‖_F, the energy
    its sketch Q leaves out (an upper bound of σ_{k+oversample+1}); float64 results.

    The sketch Y = A·Ω (Ω Gaussian, ``k + oversample`` columns, drawn from ``rng``) and its power
    iterations run in ``dtype``; the SVD of the projection B = Qᵀ·A in float64.
    """
    m, n = matrix.shape
    if m < n:  # sketch the shorter side: Q is then the smaller factor
        t, tail = randomized_svd(
            matrix.T, k, rng=rng, dtype=dtype, oversample=oversample, power_iters=power_iters
        )
        return _transposed(t), tail
    a = np.asarray(matrix, dtype=dtype)
    q = range_finder(a, min(n, k + oversample), rng=rng, power_iters=power_iters)
    b = q.T.astype(np.float64) @ np.asarray(matrix, dtype=np.float64)  # [l, n]
    ub, s, vt = np.linalg.svd(b, full_matrices=False)
    total = float(np.sum(np.square(matrix, dtype=np.float64)))
    tail = float(np.sqrt(max(total - float(np.sum(np.square(s))), 0.0)))
    return (q.astype(np.float64) @ ub[:, :k], s[:k], vt[:k]), tail


def range_finder(
    a: np.ndarray, width: int, *, rng: np.random.Generator, power_iters: int
) -> np.ndarray:
    """An orthonormal basis Q [m, width] of A's dominant range: QR of (A·Aᵀ)^q·A·Ω, each
    product re-orthonormalised (Halko et al.'s algorithm 4.4, subspace iteration)."""
    omega = rng.standard_normal((a.shape[1], width)).astype(a.dtype)
    q, _ = np.linalg.qr(a @ omega)
    for _ in range(power_iters):
        z, _ = np.linalg.qr(a.T @ q)
        q, _ = np.linalg.qr(a @ z)
    return np.asarray(q)


def top_k_svd(
    matrix: np.ndarray,
    k: int,
    *,
    rng: np.random.Generator,
    dtype: type[np.floating] | np.dtype = np.float32,
    exact: bool = False,
) -> Triplets:
    """The top ``k`` singular triplets ``(U [m, k], σ [k], Vᵀ [k, n])`` of ``matrix``, float64,
    by the fastest of the module's paths whose error condition holds (module docstring);
    ``exact=True`` takes ``thin_svd``. ``k`` is capped at min(m, n)."""
    m, n = matrix.shape
    k = max(0, min(k, m, n))
    if not exact and _randomized_pays(m, n, k):
        found, tail = randomized_svd(matrix, k, rng=rng, dtype=dtype)
        s = found[1]
        if k and s[-1] >= s[0] * GRAM_MIN_RATIO and tail <= TAIL_RATIO * float(s[-1]):
            return found
    if not exact:
        fast = gram_svd(matrix, k)
        if fast is not None:
            return fast
    u, s, vt = thin_svd(matrix)
    return u[:, :k], s[:k], vt[:k]


def _randomized_pays(m: int, n: int, k: int) -> bool:
    side = min(m, n)
    return side >= RANDOMIZED_MIN_SIDE and k + OVERSAMPLE <= side * RANDOMIZED_MAX_FRACTION


def polar_factor(matrix: np.ndarray) -> np.ndarray:
    """The matrix with orthonormal columns (rows, when wider than tall) nearest to ``matrix`` in
    Frobenius norm: P·Qᵀ of ``matrix`` = P·D·Qᵀ (orthogonal Procrustes), in float64; through
    ``gram_svd`` when well conditioned, else ``thin_svd``."""
    r = min(matrix.shape)
    found = gram_svd(matrix, r)
    p, _, qt = found if found is not None else thin_svd(matrix)
    return np.asarray(p @ qt)


def numerical_rank(s: np.ndarray, shape: tuple[int, ...], eps: float) -> int:
    """How many of the descending singular values ``s`` exceed σ₁·max(m, n)·eps (numpy's
    ``matrix_rank`` tolerance for a matrix computed with machine epsilon ``eps``)."""
    if s.size == 0:
        return 0
    return int(np.count_nonzero(s > s[0] * max(shape) * eps))

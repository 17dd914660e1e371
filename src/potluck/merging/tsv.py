"""TSV-Merge (Gargiulo et al., CVPR 2025, https://arxiv.org/abs/2412.00081): task singular vectors.

For a matrix parameter, each task's update τᵢ = θᵢ − θ_base is low rank in practice, and the
tasks interfere where their singular subspaces overlap. The paper's steps, per matrix:

1. **compress** — keep each τᵢ's top ``k`` singular triplets (Uᵢ, Σᵢ, Vᵢ), k = ⌊rank · f⌋ with
   ``sv_fraction`` f (0, the default, means 1/T for T tasks), at least 1;
2. **concatenate** — U = [U₁ … U_T], Σ = diag(Σ₁ … Σ_T), V = [V₁ … V_T];
3. **decorrelate** — replace U and V by their nearest matrices with orthonormal columns
   (orthogonal Procrustes: U = PDQᵀ → PQᵀ; the same for V), which removes the interference
   between the tasks' singular directions;
4. **sum** — Δ = U⊥ Σ V⊥ᵀ, θ = θ_base + α·Δ.

Every 2-D tensor is a matrix here, embeddings included. Tensors that are not matrices (biases,
norms, 1-D and ≥ 3-D tensors) take the mean of the task vectors (task arithmetic with λ = 1/T),
scaled by α as well, as in the authors' code (github.com/AntoAndGar/task_singular_vectors).
Per-model weights scale each τᵢ first.

The SVDs (``potluck.merging.svd``): with ``svd: fast`` (the default) each task's top k come from
``top_k_svd`` (Gram eigendecomposition in float64 where the matrix is well conditioned at k,
a float32 randomized sketch on large matrices whose spectrum falls fast enough, else the exact
SVD; each within the tolerance stated there) and the Procrustes steps from ``polar_factor``;
``svd: exact`` takes numpy's full SVD everywhere, as before: the reference.
Randomized sketches draw from ``keyed_generator(seed, task index, tensor name)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from potluck.merging.base import MergeInputs, MergeMethod
from potluck.merging.rng import keyed_generator
from potluck.merging.steps import task_vectors
from potluck.merging.svd import numerical_rank, polar_factor, thin_svd, top_k_svd
from potluck.params import Param

#: ``svd`` parameter values: the fast top-k paths, or numpy's full SVD everywhere.
SVD_MODES = ("fast", "exact")
SVD = Param(str, "fast", "fast top-k SVD (within 1e-5 of the full one) or exact", choices=SVD_MODES)


def compress(
    tau: np.ndarray, k: int, rng: np.random.Generator | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The top-``k`` singular triplets of one task matrix: (U [m, k'], σ [k'], Vᵀ [k', n]).

    ``rng`` given: the fast ``top_k_svd``; None: the exact SVD. Triplets beyond the matrix's
    numerical rank (σ ≤ σ₁·max(m, n)·eps, numpy's ``matrix_rank`` tolerance) are dropped, so
    k' ≤ k: they add nothing to the sum, but their arbitrary singular vectors would rotate the
    other tasks' directions in the decorrelation step (the authors' code keeps them; it matters
    for low-rank updates such as LoRA's).
    """
    if rng is None:
        u, s, vt = thin_svd(tau)
    else:
        u, s, vt = top_k_svd(tau, k, rng=rng)
    k = min(k, numerical_rank(s, tau.shape, float(np.finfo(np.float64).eps)))
    return u[:, :k], s[:k], vt[:k]


def nearest_orthonormal(x: np.ndarray, *, exact: bool = False) -> np.ndarray:
    """The matrix with orthonormal columns closest to ``x`` in Frobenius norm: PQᵀ of x = PDQᵀ
    (orthonormal rows instead when ``x`` is wider than tall, as in the authors' code)."""
    if not exact:
        return polar_factor(x)
    p, _, qt = thin_svd(x)
    return np.asarray(p @ qt)


def task_singular_sum(
    taus: np.ndarray, fraction: float, *, name: str = "", seed: int = 0, exact: bool = True
) -> np.ndarray:
    """Σ of the decorrelated top singular components of each task matrix in ``taus`` [T, m, n]
    (``exact=False``: fast SVDs, randomness keyed by ``seed``, task index and ``name``)."""
    _, m, n = taus.shape
    k = max(1, int(np.floor(min(m, n) * fraction + 1e-9)))
    parts = [
        compress(tau, k, None if exact else keyed_generator(seed, i, name))
        for i, tau in enumerate(taus)
    ]
    u = np.concatenate([p[0] for p in parts], axis=1)  # [m, T·k]
    s = np.concatenate([p[1] for p in parts])  # [T·k]
    vt = np.concatenate([p[2] for p in parts], axis=0)  # [T·k, n]
    if s.size == 0:  # every task vector is zero
        return np.zeros((m, n))
    u_perp = nearest_orthonormal(u, exact=exact)
    v_perp = nearest_orthonormal(vt.T, exact=exact)
    return np.asarray((u_perp * s) @ v_perp.T)


def tsv(inputs: MergeInputs, p: Mapping[str, Any]) -> np.ndarray:
    """TSV-Merge of one tensor (see the module docstring)."""
    assert inputs.base is not None  # needs_base is checked before any method runs
    taus = task_vectors(inputs.models, inputs.base)
    taus *= inputs.weights.reshape((-1,) + (1,) * (taus.ndim - 1))
    alpha = float(p["alpha"])
    if taus.ndim != 3:
        return np.asarray(inputs.base + alpha * taus.mean(axis=0))
    fraction = float(p["sv_fraction"]) or 1.0 / len(taus)
    exact = p["svd"] == "exact"
    delta = task_singular_sum(taus, fraction, name=inputs.name, seed=inputs.seed, exact=exact)
    return np.asarray(inputs.base + alpha * delta)


METHODS: tuple[MergeMethod, ...] = (
    MergeMethod(
        "tsv",
        "https://arxiv.org/abs/2412.00081",
        "TSV-Merge: per matrix, each task's top singular vectors, decorrelated by orthogonal "
        "Procrustes, summed; other tensors: mean task vector.",
        tsv,
        {
            "alpha": Param(float, 1.0, "scale of the merged update (the paper: 1.0)"),
            "sv_fraction": Param(
                float,
                0.0,
                "fraction of each task matrix's rank kept (0: 1/number of tasks)",
                low=0.0,
                high=1.0,
            ),
            "svd": SVD,
        },
        needs_base=True,
    ),
)

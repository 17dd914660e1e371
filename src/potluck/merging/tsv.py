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
Per-model weights scale each τᵢ first. Matrices are SVD-ed in float64 (full SVD of each τᵢ; wide
embeddings cost O(m·n·min(m, n))).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from potluck.merging.base import MergeInputs, MergeMethod
from potluck.merging.steps import task_vectors
from potluck.params import Param


def compress(tau: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The top-``k`` singular triplets of one task matrix: (U [m, k'], σ [k'], Vᵀ [k', n]).

    Triplets beyond the matrix's numerical rank (σ ≤ σ₁·max(m, n)·eps, numpy's ``matrix_rank``
    tolerance) are dropped, so k' ≤ k: they add nothing to the sum, but their arbitrary singular
    vectors would rotate the other tasks' directions in the decorrelation step (the authors'
    code keeps them; it matters for low-rank updates such as LoRA's).
    """
    u, s, vt = np.linalg.svd(tau, full_matrices=False)
    tol = (s[0] if s.size else 0.0) * max(tau.shape) * np.finfo(np.float64).eps
    k = min(k, int(np.count_nonzero(s > tol)))
    return u[:, :k], s[:k], vt[:k]


def nearest_orthonormal(x: np.ndarray) -> np.ndarray:
    """The matrix with orthonormal columns closest to ``x`` in Frobenius norm: PQᵀ of x = PDQᵀ
    (orthonormal rows instead when ``x`` is wider than tall, as in the authors' code)."""
    p, _, qt = np.linalg.svd(x, full_matrices=False)
    return np.asarray(p @ qt)


def task_singular_sum(taus: np.ndarray, fraction: float) -> np.ndarray:
    """Σ of the decorrelated top singular components of each task matrix in ``taus`` [T, m, n]."""
    _, m, n = taus.shape
    k = max(1, int(np.floor(min(m, n) * fraction + 1e-9)))
    parts = [compress(tau, k) for tau in taus]
    u = np.concatenate([p[0] for p in parts], axis=1)  # [m, T·k]
    s = np.concatenate([p[1] for p in parts])  # [T·k]
    vt = np.concatenate([p[2] for p in parts], axis=0)  # [T·k, n]
    if s.size == 0:  # every task vector is zero
        return np.zeros((m, n))
    return np.asarray((nearest_orthonormal(u) * s) @ nearest_orthonormal(vt.T).T)


def tsv(inputs: MergeInputs, p: Mapping[str, Any]) -> np.ndarray:
    """TSV-Merge of one tensor (see the module docstring)."""
    assert inputs.base is not None  # needs_base is checked before any method runs
    taus = task_vectors(inputs.models, inputs.base)
    taus *= inputs.weights.reshape((-1,) + (1,) * (taus.ndim - 1))
    alpha = float(p["alpha"])
    if taus.ndim != 3:
        return np.asarray(inputs.base + alpha * taus.mean(axis=0))
    fraction = float(p["sv_fraction"]) or 1.0 / len(taus)
    return np.asarray(inputs.base + alpha * task_singular_sum(taus, fraction))


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
        },
        needs_base=True,
    ),
)

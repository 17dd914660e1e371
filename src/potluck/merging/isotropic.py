"""Isotropic merging (Marczak et al., ICML 2025, "No Task Left Behind: Isotropic Model Merging
with Common and Task-Specific Subspaces", https://arxiv.org/abs/2502.04959).

Task arithmetic's sum Δ = Σᵢ τᵢ of a matrix parameter has a few dominant singular directions,
which serve some tasks and drown the others. The paper flattens the spectrum, per matrix:

``iso_c`` (Iso-C, isotropic merging in the common subspace):

1. **sum** — Δ = Σᵢ wᵢ·τᵢ;
2. **flatten the spectrum** — Δ = U·Σ·Vᵀ → σ̄·U·Vᵀ, σ̄ = the mean of Δ's r = min(m, n) singular
   values; θ = θ_base + α·σ̄·U·Vᵀ.

``iso_cts`` (Iso-CTS, common and task-specific subspaces):

1. **common subspace** — the top k_c singular triplets of the sum Δ, k_c = ⌊r·f⌋ with
   ``common_space_fraction`` f, then moved so that the rest splits evenly: the task-specific
   width s = round((r − k_c)/T), k_c = r − T·s (as in the authors' code);
2. **task-specific subspaces** — per task, the top s singular triplets of τᵢ projected off the
   common left subspace, τᵢ − U_c·U_cᵀ·τᵢ;
3. **orthogonalise** — U = [U_c, U₁ … U_T] and V likewise replaced by their nearest matrices
   with orthonormal columns (orthogonal Procrustes, as TSV);
4. **flatten** — σ̄ = the mean of the r singular values gathered in steps 1–2;
   θ = θ_base + α·σ̄·U⊥·V⊥ᵀ.

Every 2-D tensor is a matrix here (embeddings included). Other tensors (biases, norms) take the
mean task vector, scaled by α, as in the authors' code (github.com/danielm1405/iso-merging).
Per-model weights scale each τᵢ first. The paper chooses α on validation data; the default is 1.

Where Δ (or a projected τᵢ) has rank below the number of directions asked for, the directions
beyond its numerical rank are dropped instead of kept with σ = 0 (their singular vectors are
arbitrary, so they would add an arbitrary σ̄-sized update); σ̄ is still the mean over all r
values, zeros included, so a full-rank input gives exactly the paper's result.

SVDs (``potluck.merging.svd``): ``svd: fast`` (the default) takes the full spectrum of Δ from the
Gram eigendecomposition where Δ is well conditioned (else the exact SVD), the common top-k_c and
the task-specific top-s from ``top_k_svd`` (randomness keyed by seed, task index — T for the
common subspace — and tensor name), and the Procrustes steps from ``polar_factor``, each within
the tolerances stated there; ``svd: exact`` takes numpy's SVD everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from potluck.merging.base import MergeInputs, MergeMethod
from potluck.merging.rng import keyed_generator
from potluck.merging.steps import task_vectors
from potluck.merging.svd import gram_svd, numerical_rank, thin_svd, top_k_svd
from potluck.merging.tsv import SVD, nearest_orthonormal
from potluck.params import Param

Triplets = tuple[np.ndarray, np.ndarray, np.ndarray]
EPS = float(np.finfo(np.float64).eps)


def full_spectrum(delta: np.ndarray, *, exact: bool) -> Triplets:
    """All r = min(m, n) singular triplets of ``delta`` (Gram path unless ``exact`` or ill
    conditioned; see ``potluck.merging.svd``)."""
    if not exact:
        found = gram_svd(delta, min(delta.shape))
        if found is not None:
            return found
    return thin_svd(delta)


def within_rank(t: Triplets, shape: tuple[int, ...]) -> Triplets:
    """``t`` without the triplets beyond the numerical rank (σ ≤ σ₁·max(m, n)·ε)."""
    u, s, vt = t
    k = numerical_rank(s, shape, EPS)
    return u[:, :k], s[:k], vt[:k]


def isotropic_sum(delta: np.ndarray, *, exact: bool = False) -> np.ndarray:
    """Iso-C step 2: σ̄·U·Vᵀ of Δ = U·Σ·Vᵀ, σ̄ the mean of all min(m, n) singular values."""
    u, s, vt = full_spectrum(delta, exact=exact)
    mean = float(s.sum()) / max(1, s.size)
    u, _, vt = within_rank((u, s, vt), delta.shape)
    return np.asarray((u * mean) @ vt)


def subspace_sizes(r: int, tasks: int, fraction: float) -> tuple[int, int]:
    """(k_c, s): the common subspace's width and each task's, with k_c + T·s = r (Iso-CTS
    step 1; Python's ``round``, halves to even, as the authors' code)."""
    common = int(r * fraction)
    per_task = round((r - common) / tasks)
    return r - tasks * per_task, per_task


def common_subspace(delta: np.ndarray, k: int, rng: np.random.Generator | None) -> Triplets:
    """Iso-CTS step 1: the top ``k`` singular triplets of the sum Δ, within its rank (``rng``
    None: the exact SVD)."""
    if rng is None:
        u, s, vt = thin_svd(delta)
        found = (u[:, :k], s[:k], vt[:k])
    else:
        found = top_k_svd(delta, k, rng=rng)
    return within_rank(found, delta.shape)


def task_specific_subspace(
    tau: np.ndarray, common_u: np.ndarray, s: int, rng: np.random.Generator | None
) -> Triplets:
    """Iso-CTS step 2: the top ``s`` triplets of τ − U_c·U_cᵀ·τ, within its rank (``rng``
    None: the exact SVD)."""
    residual = tau - common_u @ (common_u.T @ tau)
    if rng is None:
        u, sv, vt = thin_svd(residual)
        found = (u[:, :s], sv[:s], vt[:s])
    else:
        found = top_k_svd(residual, s, rng=rng)
    return within_rank(found, tau.shape)


def isotropic_common_and_specific(
    taus: np.ndarray, fraction: float, *, name: str = "", seed: int = 0, exact: bool = False
) -> np.ndarray:
    """Iso-CTS steps 1–4 for the task matrices ``taus`` [T, m, n] (module docstring)."""
    t, m, n = taus.shape
    r = min(m, n)
    k_c, s = subspace_sizes(r, t, fraction)
    delta = taus.sum(axis=0)
    parts = [common_subspace(delta, k_c, None if exact else keyed_generator(seed, t, name))]
    for i, tau in enumerate(taus):
        if s > 0:
            rng = None if exact else keyed_generator(seed, i, name)
            parts.append(task_specific_subspace(tau, parts[0][0], s, rng))
    sigma = np.concatenate([p[1] for p in parts])
    if sigma.size == 0:  # every task vector is zero
        return np.zeros((m, n))
    mean = float(sigma.sum()) / r
    u = nearest_orthonormal(np.concatenate([p[0] for p in parts], axis=1), exact=exact)
    vt = np.concatenate([p[2] for p in parts], axis=0)
    v = nearest_orthonormal(vt.T, exact=exact)
    return np.asarray((u * mean) @ v.T)


def _weighted_taus(inputs: MergeInputs) -> np.ndarray:
    assert inputs.base is not None  # needs_base is checked before any method runs
    taus = task_vectors(inputs.models, inputs.base)
    taus *= inputs.weights.reshape((-1,) + (1,) * (taus.ndim - 1))
    return taus


def iso_c(inputs: MergeInputs, p: Mapping[str, Any]) -> np.ndarray:
    """Iso-C of one tensor (see the module docstring)."""
    taus, alpha = _weighted_taus(inputs), float(p["alpha"])
    assert inputs.base is not None
    if taus.ndim != 3:
        return np.asarray(inputs.base + alpha * taus.mean(axis=0))
    delta = isotropic_sum(taus.sum(axis=0), exact=p["svd"] == "exact")
    return np.asarray(inputs.base + alpha * delta)


def iso_cts(inputs: MergeInputs, p: Mapping[str, Any]) -> np.ndarray:
    """Iso-CTS of one tensor (see the module docstring)."""
    taus, alpha = _weighted_taus(inputs), float(p["alpha"])
    assert inputs.base is not None
    if taus.ndim != 3:
        return np.asarray(inputs.base + alpha * taus.mean(axis=0))
    delta = isotropic_common_and_specific(
        taus,
        float(p["common_space_fraction"]),
        name=inputs.name,
        seed=inputs.seed,
        exact=p["svd"] == "exact",
    )
    return np.asarray(inputs.base + alpha * delta)


URL = "https://arxiv.org/abs/2502.04959"
ALPHA = Param(float, 1.0, "α, scale of the merged update (the paper tunes it on validation data)")

METHODS: tuple[MergeMethod, ...] = (
    MergeMethod(
        "iso_c",
        URL,
        "Iso-C: per matrix, the sum of the task vectors with its singular values replaced by "
        "their mean (σ̄·U·Vᵀ); other tensors: mean task vector; θ_base + α·Δ.",
        iso_c,
        {"alpha": ALPHA, "svd": SVD},
        needs_base=True,
    ),
    MergeMethod(
        "iso_cts",
        URL,
        "Iso-CTS: per matrix, the sum's top singular directions (common subspace) plus each "
        "task's top directions off it, orthogonalised, with one mean singular value; other "
        "tensors: mean task vector; θ_base + α·Δ.",
        iso_cts,
        {
            "alpha": ALPHA,
            "common_space_fraction": Param(
                float,
                0.8,
                "fraction f of each matrix's rank given to the common subspace (the paper: 0.8)",
                low=0.0,
                high=1.0,
            ),
            "svd": SVD,
        },
        needs_base=True,
    ),
)

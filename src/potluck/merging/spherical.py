"""Spherical merges from mergekit 0.1.5: NuSLERP, Multi-SLERP and the Karcher mean.

Each follows mergekit's ``merge_methods/{nuslerp,multislerp,karcher}.py`` step by step (same
parameter names, defaults, thresholds and fallbacks), computed in float64:

* ``nuslerp``: SLERP of two models with t = w₁ / (w₀ + w₁) from their weights, over the whole
  tensor (``nuslerp_flatten``, default) or per row / per column (``nuslerp_row_wise``); with a
  base model it interpolates the task vectors and adds the base back.
* ``multislerp``: barycentric interpolation of any number of models on the hypersphere (project
  to the tangent space at the weighted mean direction, average, map back, rescale to the weighted
  mean norm); with a base model, of the task vectors.
* ``karcher``: the Riemannian (Karcher) mean of the models' directions, found by fixed-point
  iteration, scaled by their mean norm. mergekit ignores ``base_model`` here: a base listed among
  the models is one of the averaged models.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from potluck.errors import UserError
from potluck.merging.base import MergeInputs, MergeMethod
from potluck.merging.steps import task_vectors, weight_total
from potluck.params import Param

#: mergekit's ``eps`` of ``nuslerp`` (colinear when 1 − cos²θ ≤ eps²) and ``_normalize``'s floor.
NUSLERP_EPS = 1e-8
NUSLERP_NORM_FLOOR = 1e-7


# ── NuSLERP ──────────────────────────────────────────────────────────────────────────────────


def nuslerp_t(weights: np.ndarray) -> float:
    """t = w₁ / (w₀ + w₁); 0.5 when the weights sum to (within 1e-6 of) zero, as mergekit."""
    total = float(weights.sum())
    return 0.5 if abs(total) < 1e-6 else float(weights[1]) / total


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Each vector of the last axis divided by its norm (the norm floored at 1e-7)."""
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.asarray(x / np.maximum(norms, NUSLERP_NORM_FLOOR))


def slerp_rows(t: float, v0: np.ndarray, v1: np.ndarray) -> np.ndarray:
    """SLERP of every pair of vectors along the last axis; LERP where they are colinear."""
    cos = np.clip((unit_rows(v0) * unit_rows(v1)).sum(axis=-1, keepdims=True), -1.0, 1.0)
    colinear = (1 - cos**2) <= NUSLERP_EPS**2
    theta = np.arccos(np.where(colinear, 0.0, cos))
    sin_theta = np.where(colinear, 1.0, np.sin(theta))
    spherical = (np.sin((1 - t) * theta) * v0 + np.sin(t * theta) * v1) / sin_theta
    return np.asarray(np.where(colinear, (1 - t) * v0 + t * v1, spherical))


def nuslerp_vectors(
    t: float, v0: np.ndarray, v1: np.ndarray, *, row_wise: bool, flatten: bool
) -> np.ndarray:
    """``slerp_rows`` over the whole tensor (``flatten``), its rows, or its columns."""
    if flatten:
        return slerp_rows(t, v0.reshape(-1), v1.reshape(-1)).reshape(v0.shape)
    if row_wise and v0.ndim > 1:
        out = slerp_rows(t, np.swapaxes(v0, 0, -1), np.swapaxes(v1, 0, -1))
        return np.swapaxes(out, 0, -1)
    return slerp_rows(t, v0, v1)


def nuslerp(inputs: MergeInputs, p: Mapping[str, Any]) -> np.ndarray:
    """NuSLERP (mergekit): SLERP of two models, or of their task vectors around a base."""
    t = nuslerp_t(inputs.weights)
    row_wise, flatten = bool(p["nuslerp_row_wise"]), bool(p["nuslerp_flatten"])
    if inputs.base is None:
        v0, v1 = inputs.models
        return nuslerp_vectors(t, v0, v1, row_wise=row_wise, flatten=flatten)
    v0, v1 = task_vectors(inputs.models, inputs.base)
    return np.asarray(inputs.base + nuslerp_vectors(t, v0, v1, row_wise=row_wise, flatten=flatten))


# ── Multi-SLERP ──────────────────────────────────────────────────────────────────────────────


def tangent_mean(units: np.ndarray, weights: np.ndarray, eps: float) -> np.ndarray:
    """Map the weighted tangent-space average at the mean direction back to the sphere."""
    mean = (units * weights[:, None]).sum(axis=0)
    mean = mean / np.linalg.norm(mean)
    tangents = units - (units * mean).sum(axis=-1, keepdims=True) * mean
    tangent = (tangents * weights[:, None]).sum(axis=0)
    norm = float(np.linalg.norm(tangent)) + eps
    return np.asarray(mean * np.cos(norm) + tangent * (np.sin(norm) / norm))


def multislerp(inputs: MergeInputs, p: Mapping[str, Any]) -> np.ndarray:
    """Multi-SLERP (mergekit): barycentric interpolation on the hypersphere."""
    if len(inputs.models) == 1:
        return np.array(inputs.models[0], copy=True)
    eps = float(p["eps"])
    vectors = inputs.models if inputs.base is None else task_vectors(inputs.models, inputs.base)
    flat = vectors.reshape(len(vectors), -1)
    w = inputs.weights
    if p["normalize_weights"]:
        w = w / weight_total(w, method="multislerp", name=inputs.name)
    norms = np.linalg.norm(flat, axis=-1)
    units = flat / (norms[:, None] + eps)
    if np.linalg.norm((units * w[:, None]).sum(axis=0)) < eps:
        out = _antipodal_fallback(vectors, w, inputs.name)
    else:
        out = (tangent_mean(units, w, eps) * float((norms * w).sum())).reshape(vectors.shape[1:])
    return out if inputs.base is None else inputs.base + out


def _antipodal_fallback(vectors: np.ndarray, w: np.ndarray, name: str) -> np.ndarray:
    """Two models whose weighted directions cancel: LERP (mergekit); more: an error."""
    if len(vectors) == 2:
        return np.asarray(vectors[0] * w[0] + vectors[1] * w[1])
    raise UserError(
        f"merge method 'multislerp': tensor {name!r}: the weighted directions of the models "
        "cancel out (antipodal models with balancing weights), so there is no mean direction",
        hint="change the weights, or use another method for this tensor",
        method="multislerp",
        tensor=name,
    )


# ── Karcher mean ─────────────────────────────────────────────────────────────────────────────


def karcher_start(units: np.ndarray, alphas: np.ndarray, tol: float) -> np.ndarray:
    """The starting point: the normalised weighted mean direction (the first unit if ~0)."""
    mean = (units * alphas[:, None]).sum(axis=0)
    norm = float(np.linalg.norm(mean))
    return np.array(units[0], copy=True) if norm < tol else mean / norm


def karcher_step(
    mean: np.ndarray, units: np.ndarray, alphas: np.ndarray, tol: float
) -> tuple[np.ndarray, float]:
    """One fixed-point step: (new mean, norm of the weighted log-map tangent)."""
    tangent = np.zeros_like(mean)
    for alpha, unit in zip(alphas, units, strict=True):
        dot = float(np.clip(np.dot(mean, unit), -1.0, 1.0))
        theta = float(np.arccos(dot))
        if theta < tol:
            continue
        tangent += alpha * (theta / np.sin(theta)) * (unit - dot * mean)
    norm = float(np.linalg.norm(tangent))
    if norm < tol:
        return mean, norm
    mean = np.cos(norm) * mean + np.sin(norm) * (tangent / norm)
    unit_norm = float(np.linalg.norm(mean))
    return (mean / unit_norm if unit_norm > tol else mean), norm


def karcher_mean(flat: np.ndarray, max_iter: int, tol: float) -> np.ndarray:
    """The equally weighted Karcher mean of the rows of ``flat``, scaled by their mean norm."""
    k = len(flat)
    norms = np.linalg.norm(flat, axis=-1)
    units = np.divide(flat, norms[:, None], out=np.zeros_like(flat), where=norms[:, None] != 0)
    valid = norms > tol
    if not valid.any():
        return np.zeros_like(flat[0])
    alphas = np.full(int(valid.sum()), 1.0 / int(valid.sum()))
    mean = karcher_start(units[valid], alphas, tol)
    for _ in range(max_iter):
        mean, step = karcher_step(mean, units[valid], alphas, tol)
        if step < tol:
            break
    return np.asarray(float((norms / k).sum()) * mean)


def karcher(inputs: MergeInputs, p: Mapping[str, Any]) -> np.ndarray:
    """Karcher mean (mergekit): the models' mean direction on the sphere times their mean norm."""
    if len(inputs.models) == 1:
        return np.array(inputs.models[0], copy=True)
    flat = inputs.models.reshape(len(inputs.models), -1)
    out = karcher_mean(flat, int(p["max_iter"]), float(p["tol"]))
    return out.reshape(inputs.models.shape[1:])


METHODS: tuple[MergeMethod, ...] = (
    MergeMethod(
        "nuslerp",
        "https://github.com/arcee-ai/mergekit/blob/main/mergekit/merge_methods/nuslerp.py",
        "SLERP of two models, t = w₁/(w₀ + w₁); of the task vectors when a base is given.",
        nuslerp,
        {
            "nuslerp_row_wise": Param(bool, False, "SLERP each column (row vectors) separately"),
            "nuslerp_flatten": Param(bool, True, "SLERP the whole tensor as one vector"),
        },
        min_models=2,
        max_models=2,
    ),
    MergeMethod(
        "multislerp",
        "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
        "Barycentric interpolation of any number of models on the hypersphere (optional base).",
        multislerp,
        {
            "normalize_weights": Param(bool, True, "divide the weights by their sum"),
            "eps": Param(float, 1e-8, "numerical floor of norms", low=0.0),
        },
    ),
    MergeMethod(
        "karcher",
        "https://arxiv.org/abs/2603.04972",
        "Karcher (Riemannian) mean of the models' directions times their mean norm.",
        karcher,
        {
            "max_iter": Param(int, 10, "most fixed-point iterations", low=0),
            "tol": Param(float, 1e-5, "convergence tolerance (and zero-norm floor)", low=0.0),
        },
        uses_weights=False,
    ),
)

"""Methods that interpolate models directly: linear (soup), SLERP, Model Stock, passthrough."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from potluck.errors import UserError
from potluck.merging.base import MergeInputs, MergeMethod
from potluck.merging.steps import task_vectors, weight_total, weighted_sum
from potluck.params import Param

#: Below this norm a vector has no direction: SLERP falls back to LERP (mergekit's eps).
SLERP_EPS = 1e-8


def linear(inputs: MergeInputs, p: Mapping[str, Any]) -> np.ndarray:
    """Weighted average Σ wᵢθᵢ / Σ wᵢ (Wortsman et al. 2022, https://arxiv.org/abs/2203.05482).

    ``normalize`` (default True, as in mergekit) divides by Σ wᵢ; weights summing to zero are
    then an error (mergekit silently divides by 1 instead). No weights: the plain mean.
    """
    total = np.asarray(weighted_sum(inputs.models, inputs.weights))  # a new array
    if p["normalize"]:
        total /= weight_total(inputs.weights, method="linear", name=inputs.name)
    return total


def lerp(t: float, v0: np.ndarray, v1: np.ndarray) -> np.ndarray:
    """(1 − t)·v0 + t·v1."""
    return (1 - t) * v0 + t * v1


def slerp_vectors(
    t: float, v0: np.ndarray, v1: np.ndarray, dot_threshold: float = 0.9995
) -> np.ndarray:
    """Spherical interpolation of two tensors, treated as flat vectors (Shoemake 1985).

    The angle θ between the directions of ``v0`` and ``v1`` gives
    sin((1 − t)θ)/sin θ · v0 + sin(tθ)/sin θ · v1 (the inputs keep their own norms, as in
    mergekit). When |cos θ| > ``dot_threshold`` (nearly colinear or opposite) or a vector has no
    direction (norm < 1e-8) this falls back to ``lerp``.
    """
    a, b = v0.ravel(), v1.ravel()
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na < SLERP_EPS or nb < SLERP_EPS:
        return lerp(t, v0, v1)
    dot = float(np.clip(np.dot(a, b) / (na * nb), -1.0, 1.0))
    if abs(dot) > dot_threshold:
        return lerp(t, v0, v1)
    theta = float(np.arccos(dot))
    sin_theta = float(np.sin(theta))
    s0 = np.sin((1 - t) * theta) / sin_theta
    s1 = np.sin(t * theta) / sin_theta
    return np.asarray(s0 * v0 + s1 * v1)


def slerp(inputs: MergeInputs, p: Mapping[str, Any]) -> np.ndarray:
    """SLERP between model 0 (t = 0) and model 1 (t = 1); see ``slerp_vectors``."""
    v0, v1 = inputs.models
    return slerp_vectors(float(p["t"]), v0, v1, float(p["dot_threshold"]))


def average_pairwise_cosine(taus: np.ndarray, *, filter_wise: bool = False) -> np.ndarray:
    """Mean of cos(τᵢ, τⱼ) over pairs i < j; per row of the last axis when ``filter_wise``.

    A zero vector has cosine 0 with anything (mergekit clamps the norm product at 1e-6).
    Returns a scalar array, or shape ``(*shape[:-1], 1)`` when filter-wise.
    """
    per_row = filter_wise and taus.ndim >= 3
    flat = taus if per_row else taus.reshape(taus.shape[0], -1)
    norms = np.linalg.norm(flat, axis=-1)
    cosines = []
    for i in range(len(flat)):
        for j in range(i + 1, len(flat)):
            dot = (flat[i] * flat[j]).sum(axis=-1)
            cosines.append(np.clip(dot / np.maximum(norms[i] * norms[j], 1e-6), -1.0, 1.0))
    cos = np.mean(cosines, axis=0)
    return np.asarray(cos[..., np.newaxis] if per_row else cos)


def model_stock_ratio(cos: np.ndarray, k: int, *, name: str = "") -> np.ndarray:
    """Model Stock's interpolation ratio t = k·cos θ / ((k − 1)·cos θ + 1) for k fine-tunes."""
    denom = (k - 1) * cos + 1
    if np.any(np.abs(denom) < 1e-12):
        raise UserError(
            f"model_stock: tensor {name!r}: the task vectors point in opposite directions "
            f"(mean cos θ = -1/{k - 1}), so the ratio is undefined",
            hint="use another method for this tensor (e.g. linear or ties)",
            tensor=name,
        )
    return np.asarray(k * cos / denom)


def model_stock(inputs: MergeInputs, p: Mapping[str, Any]) -> np.ndarray:
    """Model Stock (Jang et al. 2024, https://arxiv.org/abs/2403.19522).

    t from the mean pairwise cosine of the task vectors, then t·mean(θᵢ) + (1 − t)·θ_base.
    ``filter_wise`` (default False, as in mergekit) computes t per row of the last axis.
    """
    assert inputs.base is not None  # needs_base is checked before any method runs
    taus = task_vectors(inputs.models, inputs.base)
    cos = average_pairwise_cosine(taus, filter_wise=bool(p["filter_wise"]))
    t = model_stock_ratio(cos, len(taus), name=inputs.name)
    return np.asarray(t * inputs.models.mean(axis=0) + (1 - t) * inputs.base)


def passthrough(inputs: MergeInputs, p: Mapping[str, Any]) -> np.ndarray:
    """The single model's tensor, unchanged (same dtype, any dtype)."""
    return np.array(inputs.models[0], copy=True)


METHODS: tuple[MergeMethod, ...] = (
    MergeMethod(
        "linear",
        "https://arxiv.org/abs/2203.05482",
        "Weighted average (model soup); normalize=True divides by the weights' sum (mergekit).",
        linear,
        {"normalize": Param(bool, True, "divide by the sum of the weights")},
    ),
    MergeMethod(
        "slerp",
        "https://en.wikipedia.org/wiki/Slerp",
        "Spherical interpolation of two models (t=0: first, t=1: second); LERP when colinear.",
        slerp,
        {
            "t": Param(float, 0.5, "interpolation factor", low=0.0, high=1.0),
            "dot_threshold": Param(
                float, 0.9995, "|cos θ| above which LERP is used", low=0.0, high=1.0
            ),
        },
        min_models=2,
        max_models=2,
        uses_weights=False,
    ),
    MergeMethod(
        "model_stock",
        "https://arxiv.org/abs/2403.19522",
        "Model Stock: t·mean(θᵢ) + (1 − t)·θ_base, t from the task vectors' mean cosine.",
        model_stock,
        {"filter_wise": Param(bool, False, "one ratio per row of the last axis")},
        needs_base=True,
        min_models=2,
        uses_weights=False,
    ),
    MergeMethod(
        "passthrough",
        "https://github.com/arcee-ai/mergekit",
        "A single model's tensor, unchanged (any dtype).",
        passthrough,
        {},
        max_models=1,
        uses_weights=False,
        any_dtype=True,
    ),
)

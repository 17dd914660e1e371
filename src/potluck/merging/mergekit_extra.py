"""Base-relative merges from mergekit 0.1.5: SCE, NearSwap and Arcee Fusion.

Each follows mergekit's ``merge_methods/{sce,nearswap,arcee_fusion}.py`` step by step (same
parameter names, defaults and thresholds), computed in float64:

* ``sce`` (Select, Calculate, Erase; https://arxiv.org/abs/2408.07990): keep the
  ``select_topk`` fraction of entries where the task vectors vary most across models, weight
  each model by its mean squared (selected) task vector, erase entries against the sum-elected
  sign, and take the weighted mean of what is left.
* ``nearswap``: move the base towards the model by t / |model − base| per entry (clamped to
  [0, 1]): entries where the two are close take the model's value.
* ``arcee_fusion``: take the model's value only where its importance, |model − base| times the
  row's KL divergence of softmax(model) from softmax(base), reaches median + 1.5·IQR of all
  importances. mergekit estimates the quartiles from a random sample of 1,000,000 entries for
  larger tensors; potluck always uses the exact quartiles (same index rule), so tensors above
  that size can differ from mergekit near the threshold.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from potluck.errors import UserError
from potluck.merging.base import MergeInputs, MergeMethod
from potluck.merging.steps import task_vectors
from potluck.params import Param

# ── SCE ──────────────────────────────────────────────────────────────────────────────────────


def sce_select(taus: np.ndarray, density: float) -> np.ndarray:
    """Select: a 0/1 mask of the ``density`` fraction of entries (of those whose variance across
    models is not zero) with the largest variance across the models."""
    if density <= 0:
        return np.zeros(taus.shape[1:])
    if density >= 1:
        return np.ones(taus.shape[1:])
    var = taus.var(axis=0)
    k = int(np.count_nonzero(var) * density)
    mask = np.zeros(var.size)
    if k > 0:
        order = np.argsort(-np.abs(var).reshape(-1), kind="stable")
        mask[order[:k]] = 1.0
    return mask.reshape(var.shape)


def sce_calculate(taus: np.ndarray) -> np.ndarray:
    """Calculate: each model's weight, its mean squared task vector over the sum of them all
    (equal weights when that sum is below 1e-6, as in mergekit)."""
    energy = (taus**2).reshape(len(taus), -1).mean(axis=1)
    total = float(energy.sum())
    if abs(total) < 1e-6:
        return np.full(len(taus), 1.0 / len(taus))
    return np.asarray(energy / total)


def sce_erase(taus: np.ndarray) -> np.ndarray:
    """Erase: keep the entries whose sign is the one elected by the sum (a tie elects +)."""
    elected = np.where(taus.sum(axis=0) >= 0, 1.0, -1.0)
    return np.asarray(np.sign(taus) == elected)


def sce(inputs: MergeInputs, p: Mapping[str, Any]) -> np.ndarray:
    """SCE (mergekit): base + Σ wᵢ·maskᵢ·τᵢ / max(Σ wᵢ·maskᵢ, 1e-6)."""
    assert inputs.base is not None  # needs_base is checked before any method runs
    if inputs.base.size == 0:
        return np.array(inputs.base, copy=True)
    taus = task_vectors(inputs.models, inputs.base)
    if float(p["select_topk"]) < 1:
        taus = taus * sce_select(taus, float(p["select_topk"]))
    keep = sce_erase(taus)
    w = sce_calculate(taus).reshape((-1,) + (1,) * (taus.ndim - 1)) * keep
    return np.asarray(inputs.base + (taus * w).sum(axis=0) / np.maximum(w.sum(axis=0), 1e-6))


# ── NearSwap ─────────────────────────────────────────────────────────────────────────────────


def nearswap(inputs: MergeInputs, p: Mapping[str, Any]) -> np.ndarray:
    """NearSwap (mergekit): w = clamp(t / max(|model − base|, 1e-6), 0, 1) per entry, then
    w·model + (1 − w)·base."""
    t = p["t"]
    if t is None:
        raise UserError(
            "merge method 'nearswap' needs parameter 't' (it has no default)",
            hint="e.g. parameters: {t: 0.0001} (the distance below which the model's value wins)",
            method="nearswap",
            param="t",
        )
    assert inputs.base is not None
    a, b = inputs.base, inputs.models[0]
    w = np.clip(float(t) / np.maximum(np.abs(a - b), 1e-6), 0.0, 1.0)
    return np.asarray(w * b + (1 - w) * a)


# ── Arcee Fusion ─────────────────────────────────────────────────────────────────────────────


def softmax_rows(x: np.ndarray) -> np.ndarray:
    """Softmax along the last axis."""
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return np.asarray(e / e.sum(axis=-1, keepdims=True))


def fusion_importance(model: np.ndarray, base: np.ndarray) -> np.ndarray:
    """|model − base| times the row's KL(softmax(model) ‖ softmax(base)) (each + 1e-8)."""
    p = softmax_rows(model) + 1e-8
    q = softmax_rows(base) + 1e-8
    kl = (p * np.log(p / q)).sum(axis=-1, keepdims=True)
    return np.asarray(np.abs(model - base) * kl)


def fusion_threshold(importance: np.ndarray) -> float:
    """median + 1.5·(q3 − q1), each quartile the sorted entry at floor(q·(n − 1))."""
    flat = np.sort(importance.reshape(-1))
    q1, median, q3 = (flat[int(q * (flat.size - 1))] for q in (0.25, 0.5, 0.75))
    return float(median + 1.5 * (q3 - q1))


def arcee_fusion(inputs: MergeInputs, p: Mapping[str, Any]) -> np.ndarray:
    """Arcee Fusion (mergekit): base + (model − base) where importance ≥ threshold."""
    assert inputs.base is not None
    base, model = inputs.base, inputs.models[0]
    if base.size == 0:
        return np.array(base, copy=True)
    if base.ndim == 0:  # a scalar is a vector of one entry (torch's softmax over dim -1)
        base, model = base.reshape(1), model.reshape(1)
    importance = fusion_importance(model, base)
    mask = importance >= fusion_threshold(importance)
    return np.asarray(base + (model - base) * mask).reshape(inputs.base.shape)


METHODS: tuple[MergeMethod, ...] = (
    MergeMethod(
        "sce",
        "https://arxiv.org/abs/2408.07990",
        "SCE: select high-variance entries, weight models by task-vector energy, erase minority "
        "signs.",
        sce,
        {
            "select_topk": Param(
                float, 1.0, "fraction of entries kept, by variance across models", low=0.0, high=1.0
            ),
            "int8_mask": Param(bool, False, "accepted from mergekit; no effect on the result"),
        },
        needs_base=True,
        uses_weights=False,
    ),
    MergeMethod(
        "nearswap",
        "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
        "NearSwap: the model's value where it lies within ~t of the base, else interpolated.",
        nearswap,
        {"t": Param(float, None, "distance scale: weight of the model = t / |model − base|")},
        needs_base=True,
        max_models=1,
        uses_weights=False,
    ),
    MergeMethod(
        "arcee_fusion",
        "https://arcee.ai",
        "Arcee Fusion: the model's value where its KL-weighted change is an outlier, else base.",
        arcee_fusion,
        {},
        needs_base=True,
        max_models=1,
        uses_weights=False,
    ),
)

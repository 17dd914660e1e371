"""TALL masks and Consensus merging (Wang et al., ICML 2024, https://arxiv.org/abs/2405.07813).

The paper's steps, for task vectors τₜ = θₜ − θ₀ and a multi-task vector τ_MTL made by task
arithmetic or TIES (here already scaled by λ, so θ_MTL = θ₀ + τ_MTL is the merged model):

1. **TALL mask** of task t: mₜ = |θ₀ − θₜ| > λₜ·|θ_MTL − θₜ|, i.e. |τₜ| > λₜ·|τ_MTL − τₜ|
   (strict, as in the authors' code; the paper writes ≥). ``tall_mask``.
2. **Consensus mask**: keep the entries at least ``k`` tasks' masks keep, Σₜ mₜ ≥ k.
   ``consensus_mask``; k = 2 removes "selfish" (one task only) and "catastrophic" (no task)
   weights.
3. Consensus merging: θ₀ + consensus ⊙ τ_MTL (``consensus``); TALL masks: the merged model θ_MTL
   plus one mask per task, θₜ ≈ θ₀ + mₜ ⊙ τ_MTL (``tall_masks``, per-task parts written by
   ``ops.merge.tasks``).

Every step is elementwise, so one tensor at a time gives the paper's result exactly; TIES trim
is per tensor (as ``ties`` here). The paper picks λₜ ∈ {0.2, …, 0.6} on validation data; without
data the default is 0.4 (``mask_lambda``, one value or one per model).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from potluck.errors import UserError
from potluck.merging.base import MergeInputs, MergeMethod, all_values, model_value
from potluck.merging.steps import task_vectors
from potluck.merging.task_arithmetic import (
    CONSENSUS,
    DENSITY,
    LAMBDA,
    generalized_task_arithmetic,
    sparsify_trim,
)
from potluck.params import Param

__all__ = [
    "METHODS",
    "TALL_URL",
    "consensus_mask",
    "multi_task_vector",
    "tall_mask",
    "tall_masks_of",
]

TALL_URL = "https://arxiv.org/abs/2405.07813"

BASE_METHOD = Param(
    str,
    "task_arithmetic",
    "how the multi-task vector is made: task arithmetic (sum) or TIES",
    choices=("task_arithmetic", "ties"),
)
MASK_LAMBDA = Param(float, 0.4, "λₜ of the TALL mask |τₜ| > λₜ·|τ_MTL − τₜ|", low=0.0)
K = Param(int, 2, "keep entries at least k task masks keep (consensus)", low=0)


def tall_mask(tau_t: np.ndarray, tau_mtl: np.ndarray, lam: float) -> np.ndarray:
    """Step 1: task t's TALL mask, |τₜ| > λ·|τ_MTL − τₜ| (bool, τ's shape)."""
    out: np.ndarray = np.abs(tau_t) > lam * np.abs(tau_mtl - tau_t)
    return out


def consensus_mask(masks: np.ndarray, k: int) -> np.ndarray:
    """Step 2: entries that at least ``k`` of the stacked task masks ``masks`` [T, …] keep."""
    out: np.ndarray = masks.sum(axis=0, dtype=np.int64) >= k
    return out


def multi_task_vector(inputs: MergeInputs, p: Mapping[str, Any]) -> np.ndarray:
    """τ_MTL = λ·Δ of task arithmetic (Σ wₜτₜ) or TIES (trim, elect, disjoint mean)."""
    assert inputs.base is not None  # needs_base is checked before any method runs
    if p["base_method"] == "ties":
        ties = {**p, "normalize": True, "rescale": "none"}
        merged = generalized_task_arithmetic(
            inputs, ties, method="ties", sparsifier=sparsify_trim, consensus=True
        )
    else:
        _check_ta_density(p, inputs.name)
        ta = {**p, "normalize": False}
        merged = generalized_task_arithmetic(
            inputs, ta, method="task_arithmetic", sparsifier=None, consensus=False
        )
    out: np.ndarray = merged - inputs.base
    return out


def _check_ta_density(p: Mapping[str, Any], name: str) -> None:
    if min(all_values(p, "density")) < 1:
        raise UserError(
            f"density {p['density']} trims TIES task vectors, but base_method is task_arithmetic "
            f"(tensor {name!r})",
            hint="pass base_method=ties, or leave density at 1",
            param="density",
            tensor=name,
        )


def tall_masks_of(taus: np.ndarray, tau_mtl: np.ndarray, p: Mapping[str, Any]) -> np.ndarray:
    """Every task's TALL mask [T, …] with its own ``mask_lambda``."""
    return np.stack(
        [tall_mask(tau, tau_mtl, model_value(p, "mask_lambda", i)) for i, tau in enumerate(taus)]
    )


def _consensus(inputs: MergeInputs, p: Mapping[str, Any]) -> np.ndarray:
    assert inputs.base is not None
    tau_mtl = multi_task_vector(inputs, p)
    masks = tall_masks_of(task_vectors(inputs.models, inputs.base), tau_mtl, p)
    return inputs.base + np.where(consensus_mask(masks, int(p["k"])), tau_mtl, 0.0)


def _tall_masks(inputs: MergeInputs, p: Mapping[str, Any]) -> np.ndarray:
    assert inputs.base is not None
    out: np.ndarray = inputs.base + multi_task_vector(inputs, p)
    return out


_COMMON: dict[str, Param] = {
    "lambda_": LAMBDA,
    "base_method": BASE_METHOD,
    "density": DENSITY,
    "consensus": CONSENSUS,
    "mask_lambda": MASK_LAMBDA,
}

METHODS: tuple[MergeMethod, ...] = (
    MergeMethod(
        "consensus",
        TALL_URL,
        "Consensus merging: θ₀ + [Σₜ mₜ ≥ k] ⊙ τ_MTL, τ_MTL by task arithmetic or TIES "
        "(density, consensus: TIES only), mₜ the TALL masks |τₜ| > λₜ·|τ_MTL − τₜ|.",
        _consensus,
        {**_COMMON, "k": K},
        needs_base=True,
        per_model=("density", "mask_lambda"),
    ),
    MergeMethod(
        "tall_masks",
        TALL_URL,
        "TALL masks: the merged model θ₀ + τ_MTL (task arithmetic or TIES) plus one bit-packed "
        "mask per task, mₜ = |τₜ| > λₜ·|τ_MTL − τₜ|, written as OUT/tasks/<name>.patch "
        "(θₜ ≈ θ₀ + mₜ ⊙ τ_MTL).",
        _tall_masks,
        dict(_COMMON),
        needs_base=True,
        per_model=("density", "mask_lambda"),
    ),
)

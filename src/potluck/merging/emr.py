"""EMR-Merging (Huang et al., NeurIPS 2024, https://arxiv.org/abs/2405.17461): Elect, Mask,
Rescale.

For task vectors τₜ = θₜ − θ₀ (the paper's steps; the authors' code flattens the whole model):

1. **Elect** the unified task vector: the sign ε = sign(Σₜ τₜ) (+1 where the sum is > 0, −1
   elsewhere, as in the authors' code) and, per entry, the largest |τₜ| among the tasks whose
   τₜ has that sign; τ_uni = ε ⊙ max. ``elect_unified``.
2. **Mask** of task t: Mₜ = (τₜ ⊙ τ_uni > 0), where τₜ agrees in sign with τ_uni. ``emr_mask``.
3. **Rescaler** of task t: γₜ = Σ|τₜ| / Σ|Mₜ ⊙ τ_uni| over the whole model, so the masked
   vector has τₜ's mean magnitude. ``emr_rescaler`` (from sums that ``ops.merge.tasks``
   accumulates tensor by tensor).

Task t's model is θ₀ + γₜ·Mₜ ⊙ τ_uni. The merged model potluck writes is θ₀ + τ_uni (the
shared part; on its own it is not meant to be used, every task applies its mask), plus
``OUT/tasks/<name>.patch`` per task. Steps 1 and 2 are elementwise, so per tensor is exact; the
rescaler's sums run over every merged tensor. Tuning-free: no parameters.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from potluck.merging.base import MergeInputs, MergeMethod
from potluck.merging.steps import task_vectors

__all__ = ["EMR_URL", "METHODS", "elect_unified", "emr_mask", "emr_rescaler", "masked_sums"]

EMR_URL = "https://arxiv.org/abs/2405.17461"


def elect_unified(taus: np.ndarray) -> np.ndarray:
    """Step 1: τ_uni = ε ⊙ (largest |τₜ| agreeing with ε), ε = +1 where Σₜ τₜ > 0 else −1."""
    sign = np.where(taus.sum(axis=0) > 0, 1.0, -1.0)
    agreeing = np.where(taus * sign > 0, np.abs(taus), 0.0)
    out: np.ndarray = sign * agreeing.max(axis=0, initial=0.0)
    return out


def emr_mask(tau_t: np.ndarray, tau_uni: np.ndarray) -> np.ndarray:
    """Step 2: where task t's vector points the way of the unified one (bool)."""
    out: np.ndarray = tau_t * tau_uni > 0
    return out


def masked_sums(tau_t: np.ndarray, tau_uni: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """The two sums of step 3 over one tensor: (Σ|τₜ|, Σ|Mₜ ⊙ τ_uni|), in float64."""
    num = float(np.abs(tau_t, dtype=np.float64).sum())
    den = float(np.abs(np.where(mask, tau_uni, 0.0), dtype=np.float64).sum())
    return num, den


def emr_rescaler(num: float, den: float) -> float:
    """Step 3: γₜ = Σ|τₜ| / Σ|Mₜ ⊙ τ_uni|; 1 where the mask keeps nothing (nothing to scale)."""
    return num / den if den > 0 else 1.0


def _emr(inputs: MergeInputs, p: Mapping[str, Any]) -> np.ndarray:
    assert inputs.base is not None  # needs_base is checked before any method runs
    out: np.ndarray = inputs.base + elect_unified(task_vectors(inputs.models, inputs.base))
    return out


METHODS: tuple[MergeMethod, ...] = (
    MergeMethod(
        "emr",
        EMR_URL,
        "EMR-Merging: elected unified task vector τ_uni (sign of Σ τₜ, largest agreeing "
        "magnitude) written as θ₀ + τ_uni, plus per task a bit-packed mask Mₜ = τₜ⊙τ_uni > 0 and "
        "a rescaler γₜ = Σ|τₜ| / Σ|Mₜ⊙τ_uni| in OUT/tasks/<name>.patch (θₜ ≈ θ₀ + γₜMₜ⊙τ_uni).",
        _emr,
        {},
        needs_base=True,
        min_models=1,
        uses_weights=False,
    ),
)

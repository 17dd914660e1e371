"""AdaMerging (Yang et al., ICLR 2024, https://arxiv.org/abs/2310.02575), layer-wise.

θ_ℓ = θ₀,ℓ + Σₜ λₜ,ℓ · τₜ,ℓ: one coefficient per task and per parameter tensor ℓ (the
authors' "layer-wise" variant), learned by minimising the Shannon entropy of each task's
predictions (its own classification head on the merged encoder) on unlabelled inputs.

Learning needs torch, the models' heads and data, so it runs before the merge
(``ops.merge.adamerging``): it writes the learned λₜ,ℓ into the configuration as each model's
``weight``, one ``{filter: tensor, value: λ}`` condition per tensor (mergekit's syntax; a
configuration whose models carry a ``weight`` is merged without learning; a direct call without
weights uses λ = ``init`` everywhere, the paper's starting point). This module holds
the merge step (task arithmetic with those per-tensor weights) and the objective in numpy, the
float64 reference of the torch code.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from potluck.merging.base import MergeInputs, MergeMethod
from potluck.merging.steps import task_vectors, weighted_sum
from potluck.params import Param

__all__ = ["ADAMERGING_URL", "METHODS", "layerwise_merge", "prediction_entropy"]

ADAMERGING_URL = "https://arxiv.org/abs/2310.02575"


def layerwise_merge(base: np.ndarray, taus: np.ndarray, coefficients: np.ndarray) -> np.ndarray:
    """One tensor: θ₀ + Σₜ λₜ·τₜ with this tensor's coefficients λ [T]."""
    out: np.ndarray = base + weighted_sum(taus, coefficients)
    return out


def prediction_entropy(logits: np.ndarray) -> float:
    """The objective on one batch: mean over examples of H(softmax(logits)) (natural log)."""
    z = logits - logits.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return float(-(np.exp(logp) * logp).sum(axis=-1).mean())


def _adamerging(inputs: MergeInputs, p: Mapping[str, Any]) -> np.ndarray:
    assert inputs.base is not None  # needs_base is checked before any method runs
    lam = inputs.weights
    if not inputs.weights_given:  # not learned (a direct call): the paper's starting point
        lam = np.full(len(inputs.models), float(p["init"]))
    return layerwise_merge(inputs.base, task_vectors(inputs.models, inputs.base), lam)


METHODS: tuple[MergeMethod, ...] = (
    MergeMethod(
        "adamerging",
        ADAMERGING_URL,
        "AdaMerging (layer-wise): θ₀ + Σₜ λₜ,ℓ·τₜ with one λ per task and tensor, learned by "
        "minimising the entropy of each task's predictions (its own head) on unlabelled "
        "inputs (data: one JSONL/npz file per model, as for potluck stats); needs torch.",
        _adamerging,
        {
            "data": Param(str, "", "unlabelled inputs of each model's task (one file per model)"),
            "steps": Param(int, 100, "optimisation steps (Adam)", low=1),
            "lr": Param(float, 1e-3, "Adam learning rate", low=0.0, low_open=True),
            "init": Param(float, 0.3, "initial λ (the paper's prior)", low=0.0),
            "batch_size": Param(int, 16, "examples per task and step", low=1),
            "max_samples": Param(int, 256, "examples read per task", low=1),
            "max_length": Param(int, 128, "tokens per text (JSONL)", low=1),
        },
        needs_base=True,
        per_model=("data",),
    ),
)

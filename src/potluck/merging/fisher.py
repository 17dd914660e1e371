"""Fisher merging (Matena & Raffel 2022, https://arxiv.org/abs/2111.09832).

Each model's parameters are weighted entry by entry by its diagonal Fisher Fᵢ (how much the
model's log-likelihood cares about that entry):

    θ = Σᵢ cᵢ·max(Fᵢ, ε)·θᵢ / Σᵢ cᵢ·max(Fᵢ, ε),    cᵢ = λᵢ / ‖Fᵢ‖₂ (normalize) or λᵢ

Conventions follow the authors' code (https://github.com/mmatena/model_merging,
``merging.py``): ``epsilon`` is their ``fisher_floor`` (default 1e-6) applied to the raw Fisher,
``normalize`` their ``normalize_fishers`` (default True), dividing each model's coefficient by the
L2 norm of its **whole-model** Fisher (``TensorStats.model_norm``, recorded in the stats file),
not of this one tensor. Their ``favor_target_model`` (default True there) floors only model 0's
Fisher; here it is ``favor_target`` with default False, so that the result does not depend on
the order of the models unless asked for.

Missing statistics: with no ``stats`` at all the merge is the plain weighted average — what the
authors' script does without ``--fishers`` (an "isometric merge"). When statistics are given but
some model has none for this tensor, that is an error unless ``missing="average"``; the caller
(``potluck merge``) should refuse a Fisher merge configured without any statistics file.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from potluck.errors import UserError
from potluck.merging.base import MergeInputs, MergeMethod
from potluck.merging.steps import weight_total, weighted_sum
from potluck.params import Param

#: The authors' ``fisher_floor`` default.
FISHER_FLOOR = 1e-6
MISSING_POLICIES = ("error", "average")

MISSING = Param(
    str,
    "error",
    "a model without statistics for a tensor: refuse, or plain-average that tensor",
    choices=MISSING_POLICIES,
)


def weighted_average(inputs: MergeInputs, method: str) -> np.ndarray:
    """Σ wᵢθᵢ / Σ wᵢ (the plain mean without weights)."""
    total = weight_total(inputs.weights, method=method, name=inputs.name)
    return weighted_sum(inputs.models, inputs.weights) / total


def missing_stats(inputs: MergeInputs, policy: str, method: str) -> bool:
    """True when some model lacks statistics and ``policy`` says to average; error otherwise.

    Returns False when every model has statistics (the method proceeds).
    """
    assert inputs.stats is not None
    lacking = [i for i, s in enumerate(inputs.stats) if s is None]
    if not lacking:
        return False
    if policy == "average":
        return True
    raise UserError(
        f"merge method {method!r}: model(s) {lacking} have no statistics for tensor "
        f"{inputs.name!r}",
        hint="compute statistics covering this tensor ('potluck stats'), or pass "
        "missing=average to plain-average tensors without them",
        method=method,
        tensor=inputs.name,
        models=lacking,
    )


def fisher_coefficients(inputs: MergeInputs, normalize: bool) -> np.ndarray:
    """cᵢ = λᵢ, divided by each model's whole-model Fisher norm when ``normalize``."""
    coeffs = inputs.weights.copy()
    if not normalize:
        return coeffs
    assert inputs.stats is not None
    for i, s in enumerate(inputs.stats):
        norm = None if s is None else s.model_norm
        if norm is None or norm <= 0:
            raise UserError(
                f"fisher: model {i} has no whole-model Fisher norm for tensor {inputs.name!r}"
                + ("" if norm is None else f" (it is {norm:g})"),
                hint="pass statistics read from a stats file (ops.merge.statsfile.stats_for), or "
                "normalize=false",
                tensor=inputs.name,
                model=i,
            )
        coeffs[i] /= norm
    return coeffs


def fisher(inputs: MergeInputs, p: Mapping[str, Any]) -> np.ndarray:
    """Fisher-weighted average (see the module docstring)."""
    if inputs.stats is None or missing_stats(inputs, str(p["missing"]), "fisher"):
        return weighted_average(inputs, "fisher")
    coeffs = fisher_coefficients(inputs, bool(p["normalize"]))
    eps = float(p["epsilon"])
    num = np.zeros(inputs.models.shape[1:], dtype=np.float64)
    den = np.zeros_like(num)
    for i, (theta, s) in enumerate(zip(inputs.models, inputs.stats, strict=True)):
        assert s is not None
        f = s.array if p["favor_target"] and i > 0 else np.maximum(s.array, eps)
        num += coeffs[i] * f * theta
        den += coeffs[i] * f
    if np.any(den <= 0):
        raise UserError(
            f"fisher: the weighted Fisher sum of tensor {inputs.name!r} is ≤ 0 at "
            f"{int(np.sum(den <= 0))} entries",
            hint="give positive weights (and epsilon > 0 when Fishers can be zero)",
            tensor=inputs.name,
        )
    return num / den


METHODS: tuple[MergeMethod, ...] = (
    MergeMethod(
        "fisher",
        "https://arxiv.org/abs/2111.09832",
        "Fisher merging: average weighted entry-wise by each model's diagonal Fisher.",
        fisher,
        {
            "epsilon": Param(float, FISHER_FLOOR, "floor on Fisher values (fisher_floor)", low=0.0),
            "normalize": Param(bool, True, "divide each model's weight by its whole-model ‖F‖₂"),
            "favor_target": Param(bool, False, "floor only model 0's Fisher (authors' default)"),
            "missing": MISSING,
        },
        needs_stats="fisher",
    ),
)

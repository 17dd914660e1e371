"""Task-vector methods: task arithmetic, TIES, DARE, Model Breadcrumbs, DELLA.

All share one pipeline (mergekit's "generalized task arithmetic"): τᵢ = θᵢ − θ_base → sparsify
each τᵢ (trim / random drop / two-tailed mask / MagPrune, then rescale) → weight by wᵢ → combine
(plain sum, or TIES sign election + disjoint sum) → optionally divide by the weights → θ_base + λ·Δ.

Defaults follow mergekit (https://github.com/arcee-ai/mergekit, ``merge_methods/registry.py``):

    method            sparsify   consensus  normalize  rescale
    ----------------  ---------  ---------  ---------  ----------------------------------------
    task_arithmetic   -          -          False      -
    ties              trim       sum        True       none
    dare_linear       random     -          False      l1 (mergekit ≥ 0.1; paper: 1/density)
    dare_ties         random     sum        False      l1
    breadcrumbs       outliers   -          False      none
    breadcrumbs_ties  outliers   sum        False      none
    della             magprune   sum        True       l1 (the paper: inverse, 1/p per entry)
    della_linear      magprune   -          False      l1

All take ``lambda_`` (mergekit's ``lambda``, default 1.0) and per-model weights (default 1.0).

``density`` defaults to 1.0 as in mergekit (no sparsification); the papers use smaller values
(TIES top-20 % → 0.2, DARE drop 90 % → 0.1). Sparsification is per tensor, as in mergekit; the
TIES paper trims over the whole model's task vector, which a per-tensor call cannot see.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from potluck.errors import UserError
from potluck.merging.base import MergeInputs, MergeMethod, all_values, model_value
from potluck.merging.rng import keyed_generator
from potluck.merging.steps import (
    CONSENSUS_METHODS,
    RESCALE_MODES,
    disjoint_mean,
    elect_sign,
    magprune_keep_probs,
    random_keep_mask,
    rescale,
    task_vectors,
    trim,
    trim_outliers,
    weight_total,
    weighted_sum,
)
from potluck.params import Param

#: (task vector, model index, inputs, params) → sparsified task vector.
Sparsifier = Callable[[np.ndarray, int, MergeInputs, Mapping[str, Any]], np.ndarray]

LAMBDA = Param(float, 1.0, "λ, scale of the merged task vector (negative subtracts the tasks)")
DENSITY = Param(
    float, 1.0, "fraction of each task vector kept (1 keeps all)", low=0.0, high=1.0, low_open=True
)
CONSENSUS = Param(
    str, "sum", "sign election: sum of values or count of signs", choices=CONSENSUS_METHODS
)
GAMMA = Param(
    float, 0.01, "fraction of largest magnitudes dropped", low=0.0, high=1.0, high_open=True
)
EPSILON = Param(
    float, 0.15, "half-width ε of the keep-probability range", low=0.0, high=1.0, high_open=True
)
RANK_SCOPE = Param(
    str, "row", "rank magnitudes per row (mergekit) or per tensor", choices=("row", "tensor")
)


def _normalize(default: bool) -> Param:
    return Param(bool, default, "divide the merged task vector by the (agreeing) models' weights")


def _rescale(default: str) -> Param:
    return Param(
        str,
        default,
        "undo the drop's shrinkage (1/p, match L1 norm, or not)",
        choices=RESCALE_MODES,
    )


def sparsify_trim(tau: np.ndarray, i: int, inputs: MergeInputs, p: Mapping[str, Any]) -> np.ndarray:
    """TIES trim of one task vector, then ``rescale`` (by the density for ``"inverse"``)."""
    density = model_value(p, "density", i)
    return rescale(trim(tau, density, name=inputs.name), tau, density, str(p["rescale"]))


def sparsify_random(
    tau: np.ndarray, i: int, inputs: MergeInputs, p: Mapping[str, Any]
) -> np.ndarray:
    """DARE: drop entries with probability 1 − density (keyed by seed, model, tensor), rescale."""
    density = model_value(p, "density", i)
    gen = keyed_generator(inputs.seed, i, inputs.name)
    mask = random_keep_mask(gen, density, tau.shape)
    return rescale(np.where(mask, tau, 0.0), tau, density, str(p["rescale"]))


def sparsify_outliers(
    tau: np.ndarray, i: int, inputs: MergeInputs, p: Mapping[str, Any]
) -> np.ndarray:
    """Model Breadcrumbs: two-tailed magnitude mask, then ``rescale`` by the density."""
    density = model_value(p, "density", i)
    kept = trim_outliers(tau, density, model_value(p, "gamma", i), name=inputs.name)
    return rescale(kept, tau, density, str(p["rescale"]))


def sparsify_magprune(
    tau: np.ndarray, i: int, inputs: MergeInputs, p: Mapping[str, Any]
) -> np.ndarray:
    """DELLA MagPrune: drop with rank-based probabilities, rescale by each entry's 1/p."""
    density, eps = model_value(p, "density", i), model_value(p, "epsilon", i)
    probs = magprune_keep_probs(tau, density, eps, str(p["rank_scope"]))
    gen = keyed_generator(inputs.seed, i, inputs.name)
    mask = random_keep_mask(gen, probs, tau.shape)
    return rescale(np.where(mask, tau, 0.0), tau, probs, str(p["rescale"]))


def _check_della(method: str, p: Mapping[str, Any], name: str, count: int) -> None:
    for i in range(count):
        _check_della_one(method, model_value(p, "density", i), model_value(p, "epsilon", i), name)


def _check_della_one(method: str, density: float, eps: float, name: str) -> None:
    if density < 1 and not (density - eps > 0 and density + eps <= 1):
        raise UserError(
            f"merge method {method!r}: density ± epsilon = [{density - eps:g}, {density + eps:g}] "
            "must lie in (0, 1]",
            hint="lower epsilon, or move density away from 0 and 1",
            method=method,
            tensor=name,
            density=density,
            epsilon=eps,
        )


def generalized_task_arithmetic(
    inputs: MergeInputs,
    p: Mapping[str, Any],
    *,
    method: str,
    sparsifier: Sparsifier | None,
    consensus: bool,
) -> np.ndarray:
    """The shared pipeline (see the module docstring) for one tensor."""
    assert inputs.base is not None  # needs_base is checked before any method runs
    taus = task_vectors(inputs.models, inputs.base)
    if sparsifier is not None and min(all_values(p, "density")) < 1:
        taus = np.stack([sparsifier(tau, i, inputs, p) for i, tau in enumerate(taus)])
    w = inputs.weights
    if consensus:
        weighted = taus * w.reshape((-1,) + (1,) * (taus.ndim - 1))
        sign = elect_sign(weighted, str(p["consensus"]))
        delta = disjoint_mean(weighted, w, sign, normalize=bool(p["normalize"]))
    else:
        delta = weighted_sum(taus, w)
        if p["normalize"]:
            delta = delta / weight_total(w, method=method, name=inputs.name)
    return inputs.base + float(p["lambda_"]) * delta


def _method(
    name: str,
    url: str,
    description: str,
    sparsifier: Sparsifier | None,
    consensus: bool,
    params: dict[str, Param],
) -> MergeMethod:
    def fn(inputs: MergeInputs, p: Mapping[str, Any]) -> np.ndarray:
        if "epsilon" in p:
            _check_della(name, p, inputs.name, len(inputs.models))
        return generalized_task_arithmetic(
            inputs, p, method=name, sparsifier=sparsifier, consensus=consensus
        )

    fn.__name__ = name
    fn.__doc__ = description
    full = {"lambda_": LAMBDA, **params}
    if consensus:
        full["consensus"] = CONSENSUS
    per_model = tuple(k for k in ("density", "gamma", "epsilon") if k in full)
    return MergeMethod(name, url, description, fn, full, needs_base=True, per_model=per_model)


TIES_URL = "https://arxiv.org/abs/2306.01708"
DARE_URL = "https://arxiv.org/abs/2311.03099"
BREADCRUMBS_URL = "https://arxiv.org/abs/2312.06795"
DELLA_URL = "https://arxiv.org/abs/2406.11617"

METHODS: tuple[MergeMethod, ...] = (
    _method(
        "task_arithmetic",
        "https://arxiv.org/abs/2212.04089",
        "θ_base + λ·Σ wᵢ·τᵢ (Ilharco et al. 2023); normalize=False as in mergekit.",
        None,
        False,
        {"normalize": _normalize(False)},
    ),
    _method(
        "ties",
        TIES_URL,
        "TIES: trim (top density by magnitude, per tensor) → elect sign → disjoint mean; "
        "θ_base + λ·Δ. Defaults as mergekit: normalize=True, rescale='none', consensus='sum'.",
        sparsify_trim,
        True,
        {"density": DENSITY, "normalize": _normalize(True), "rescale": _rescale("none")},
    ),
    _method(
        "dare_linear",
        DARE_URL,
        "DARE: drop each entry with probability 1 − density, rescale to the L1 norm (mergekit; "
        "rescale='inverse' is the paper's 1/density), then task arithmetic; normalize=False.",
        sparsify_random,
        False,
        {"density": DENSITY, "normalize": _normalize(False), "rescale": _rescale("l1")},
    ),
    _method(
        "dare_ties",
        DARE_URL,
        "DARE drop + rescale, then TIES sign election and disjoint sum; mergekit defaults "
        "(normalize=False, consensus='sum', rescale='l1'; 'inverse' is the paper's 1/density).",
        sparsify_random,
        True,
        {"density": DENSITY, "normalize": _normalize(False), "rescale": _rescale("l1")},
    ),
    _method(
        "breadcrumbs",
        BREADCRUMBS_URL,
        "Model Breadcrumbs: drop the gamma largest and the smallest magnitudes (density "
        "remains), then task arithmetic; mergekit defaults (normalize=False, no rescale).",
        sparsify_outliers,
        False,
        {
            "density": DENSITY,
            "gamma": GAMMA,
            "normalize": _normalize(False),
            "rescale": _rescale("none"),
        },
    ),
    _method(
        "breadcrumbs_ties",
        BREADCRUMBS_URL,
        "Model Breadcrumbs mask, then TIES sign election and disjoint sum (mergekit defaults).",
        sparsify_outliers,
        True,
        {
            "density": DENSITY,
            "gamma": GAMMA,
            "normalize": _normalize(False),
            "rescale": _rescale("none"),
        },
    ),
    _method(
        "della",
        DELLA_URL,
        "DELLA: MagPrune (keep probability in [density−ε, density+ε] by magnitude rank, rescale "
        "to the L1 norm; 'inverse' is the paper's 1/p) → elect sign → disjoint mean; mergekit "
        "defaults (normalize=True, ε=0.15).",
        sparsify_magprune,
        True,
        {
            "density": DENSITY,
            "epsilon": EPSILON,
            "rank_scope": RANK_SCOPE,
            "normalize": _normalize(True),
            "rescale": _rescale("l1"),
        },
    ),
    _method(
        "della_linear",
        DELLA_URL,
        "DELLA's MagPrune, then task arithmetic (mergekit della_linear, normalize=False).",
        sparsify_magprune,
        False,
        {
            "density": DENSITY,
            "epsilon": EPSILON,
            "rank_scope": RANK_SCOPE,
            "normalize": _normalize(False),
            "rescale": _rescale("l1"),
        },
    ),
)

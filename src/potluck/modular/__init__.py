"""Modular models: routing among low-rank / (IA)³ experts of one base (pure numpy).

``ROUTERS`` maps a strategy name to a router class with
``build(n_experts, settings, artifacts) -> Router``; every router answers
``select(hidden [T, d], ctx) -> (indices [T, k], weights [T, k])``. Built in: ``uniform``
(= the uniform merge), ``oracle`` (task name → expert), ``arrow``, ``phatgoose``, ``learned``
(linear softmax), ``smear`` (learned, aggregated over parameters), ``static`` (fixed weights, e.g.
from ``lorahub_search``). Third-party routers register through the ``potluck.routers``
entry-point group. Libraries, manifests and the torch runtime live in ``potluck.ops``.
"""

from __future__ import annotations

from potluck.modular.fit import fit_softmax_router, lorahub_search, softmax_router_loss
from potluck.modular.mixing import (
    arrow_prototype,
    concat_factors,
    mix_outputs,
    pad_factors,
    smear_factors,
    smear_outputs,
)
from potluck.modular.routers import (
    ArrowRouter,
    LearnedRouter,
    OracleRouter,
    PhatgooseRouter,
    SmearRouter,
    StaticRouter,
    UniformRouter,
)
from potluck.modular.routing import (
    GRANULARITIES,
    RouteContext,
    Router,
    dense_weights,
    pool_examples,
    renormalise,
    softmax,
    standardize,
    top_k,
)
from potluck.registry import Registry

__all__ = [
    "AGGREGATIONS",
    "GRANULARITIES",
    "ROUTERS",
    "ArrowRouter",
    "LearnedRouter",
    "OracleRouter",
    "PhatgooseRouter",
    "RouteContext",
    "Router",
    "SmearRouter",
    "StaticRouter",
    "UniformRouter",
    "arrow_prototype",
    "concat_factors",
    "dense_weights",
    "fit_softmax_router",
    "lorahub_search",
    "mix_outputs",
    "pad_factors",
    "pool_examples",
    "renormalise",
    "smear_factors",
    "smear_outputs",
    "softmax",
    "softmax_router_loss",
    "standardize",
    "top_k",
]

#: ``output``: Σ wₑ·ΔWₑ·x (mixture of expert outputs); ``parameters``: (Σ wB)(Σ wA)·x (SMEAR).
AGGREGATIONS = ("output", "parameters")

ROUTERS: Registry[type[Router]] = Registry("router", "potluck.routers")
for _cls in (
    UniformRouter,
    OracleRouter,
    ArrowRouter,
    PhatgooseRouter,
    LearnedRouter,
    SmearRouter,
    StaticRouter,
):
    ROUTERS.register(_cls.name, _cls)
del _cls

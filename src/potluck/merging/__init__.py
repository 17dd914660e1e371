"""Merge methods: pure numpy functions that combine one tensor of several fine-tunes.

``MERGE_METHODS.get(name).merge(tensors, base, weights, name=..., seed=..., **params)`` validates
its inputs and returns float64; casting back to the checkpoint's dtype is the caller's job.

Built in: ``linear``, ``task_arithmetic``, ``ties``, ``dare_linear``, ``dare_ties``,
``breadcrumbs``, ``breadcrumbs_ties``, ``della``, ``della_linear``, ``slerp``, ``model_stock``,
``passthrough`` and the data-aware ``fisher`` and ``regmean``, which also take per-model
statistics (``merge(..., stats=[...])``, see ``MergeMethod.needs_stats`` and
``docs/merging-stats.md``). Third-party methods register through the ``potluck.merge_methods``
entry-point group (a ``MergeMethod`` instance per entry point).
"""

from __future__ import annotations

from potluck.merging import (
    adamerging,
    average,
    emr,
    fisher,
    isotropic,
    lines,
    masks,
    mergekit_extra,
    regmean,
    spherical,
    task_arithmetic,
    tsv,
)
from potluck.merging.base import (
    COMPUTE_DTYPE,
    STATS_KINDS,
    Combine,
    MergeFn,
    MergeInputs,
    MergeMethod,
    StatsEntry,
    TensorStats,
    three_way_combine,
)
from potluck.merging.rng import keyed_generator
from potluck.params import Param
from potluck.registry import Registry

__all__ = [
    "COMPUTE_DTYPE",
    "MERGE_METHODS",
    "STATS_KINDS",
    "Combine",
    "MergeFn",
    "MergeInputs",
    "MergeMethod",
    "Param",
    "StatsEntry",
    "TensorStats",
    "keyed_generator",
    "three_way_combine",
]

MERGE_METHODS: Registry[MergeMethod] = Registry("merge method", "potluck.merge_methods")
for _method in (
    *average.METHODS,
    *task_arithmetic.METHODS,
    *fisher.METHODS,
    *regmean.METHODS,
    *tsv.METHODS,
    *isotropic.METHODS,
    *masks.METHODS,
    *emr.METHODS,
    *adamerging.METHODS,
    *spherical.METHODS,
    *mergekit_extra.METHODS,
):
    MERGE_METHODS.register(_method.name, lines.lines_option(_method))
del _method

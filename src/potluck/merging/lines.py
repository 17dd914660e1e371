"""LiNeS (Wang et al., ICLR 2025, "LiNeS: Post-training layer scaling prevents forgetting and
enhances model merging", https://arxiv.org/abs/2410.17146): scale a merged task vector by depth.

Shallow layers hold general features that every task needs; deep layers hold task-specific
ones. LiNeS scales the merged task vector Δ = θ_merged − θ_base of each tensor by a factor that
grows linearly with the depth of the layer it belongs to:

    λ(ℓ) = α + β · ℓ / (L − 1)      for layer ℓ = 0 … L − 1 (the paper's (ℓ − 1)/(L − 1), 1-based)
    λ    = α                         for tensors outside the layers (embeddings, final norm, heads)

and θ = θ_base + λ·Δ. It composes with any task-vector method: the method merges as usual, then
its update is rescaled (``with_lines``), so ``lines`` is a parameter of task arithmetic, TIES,
DARE, breadcrumbs, DELLA, TSV, Iso-C and Iso-CTS.

**Layer depth from tensor names.** A tensor belongs to layer ℓ when its name has a component
``layers.ℓ.``, ``layer.ℓ.``, ``h.ℓ.``, ``blocks.ℓ.`` or ``block.ℓ.`` (Llama/Mistral
``model.layers.3…``, BERT ``encoder.layer.3…``, GPT-2 ``transformer.h.3…``, ViT ``blocks.3…``) —
the same rule ``potluck merge`` uses to number layers for gradients and slices. ℓ/(L − 1) is the
merge plan's depth ``t`` of the tensor (L: the number of layers of the merged model, or of the
slice); a model with one layer gets α + β for it. Every other tensor is outside the layers and
gets α, as in the authors' code (which matches blocks by ``.ℓ.`` and gives every unmatched key
the minimum α).

In a merge configuration (``potluck merge``) ``lines: {alpha: A, beta: B}`` is resolved per
tensor into this scale (``lines_scale``); the method itself receives the number (``lines``,
default 1: unchanged), so ``--explain`` shows each tensor's factor.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np

from potluck.errors import UserError
from potluck.merging.base import MergeInputs, MergeMethod
from potluck.params import Param

__all__ = [
    "LINES",
    "LINES_KEYS",
    "LINES_METHODS",
    "check_lines",
    "layer_depth",
    "lines_option",
    "lines_scale",
    "scale_task_vector",
    "with_lines",
]

#: A layer component of a tensor name (see the module docstring).
LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")
#: The keys of a ``lines:`` mapping.
LINES_KEYS = ("alpha", "beta")
#: Registered methods that take ``lines`` (every method that merges task vectors over a base).
LINES_METHODS = (
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "tsv",
    "iso_c",
    "iso_cts",
)
LINES = Param(
    float,
    1.0,
    "LiNeS scale of this tensor's merged task vector; set per tensor by depth from "
    "`lines: {alpha, beta}` (α + β·depth in the layers, α elsewhere)",
)


def layer_depth(name: str) -> int | None:
    """The layer a tensor belongs to (``encoder.layer.3.output.dense.weight`` → 3), or None."""
    m = LAYER.search(name)
    return None if m is None else int(m.group(1))


def check_lines(value: Any, where: str) -> tuple[float, float]:
    """``(alpha, beta)`` of a ``lines:`` mapping, or a ``UserError`` naming what is wrong."""
    hint = "write lines: {alpha: 0.5, beta: 1.0} (or --lines 0.5,1.0)"
    if not isinstance(value, Mapping) or sorted(value) != sorted(LINES_KEYS):
        raise UserError(
            f"{where}: lines must be a mapping with exactly alpha and beta, not {value!r}",
            hint=hint,
        )
    out = []
    for key in LINES_KEYS:
        x = value[key]
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
            raise UserError(f"{where}: lines.{key} must be a finite number, not {x!r}", hint=hint)
        out.append(float(x))
    return out[0], out[1]


def lines_scale(alpha: float, beta: float, name: str, t: float) -> float:
    """λ of tensor ``name`` at plan depth ``t`` = ℓ/(L − 1): α + β·t in a layer, else α."""
    return alpha + beta * t if layer_depth(name) is not None else alpha


def scale_task_vector(merged: np.ndarray, base: np.ndarray, scale: float) -> np.ndarray:
    """θ_base + scale·(θ_merged − θ_base); ``merged`` itself when the scale is 1."""
    if scale == 1.0:
        return merged
    return np.asarray(base + scale * (merged - base))


def with_lines(method: MergeMethod) -> MergeMethod:
    """``method`` with a ``lines`` parameter: its update rescaled by ``scale_task_vector``."""
    inner = method.fn

    def fn(inputs: MergeInputs, p: Mapping[str, Any]) -> np.ndarray:
        assert inputs.base is not None  # every method in LINES_METHODS needs a base
        rest = {k: v for k, v in p.items() if k != "lines"}
        return scale_task_vector(inner(inputs, rest), inputs.base, float(p["lines"]))

    fn.__name__ = getattr(inner, "__name__", method.name)
    fn.__doc__ = inner.__doc__
    return replace(method, fn=fn, params={**method.params, "lines": LINES})


def lines_option(method: MergeMethod) -> MergeMethod:
    """``with_lines(method)`` for the methods of ``LINES_METHODS``, others unchanged (what the
    registry holds)."""
    return with_lines(method) if method.name in LINES_METHODS else method

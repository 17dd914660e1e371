"""Router math in numpy: top-k selection, renormalisation, granularity, and the ``Router`` base.

Every router answers ``select(hidden, ctx) -> (indices, weights)``:

* ``hidden`` is ``[T, d]`` (T tokens of any number of examples, flattened);
* ``ctx`` (``RouteContext``) says which example each token belongs to (``example_index``, ``[T]``),
  the examples' task names (oracle routing) and the layer being routed;
* ``indices`` is ``[T, k]`` int64 (expert numbers, best first), ``weights`` is ``[T, k]`` float64.

Top-k ties are broken by the lower expert number (a stable sort on −score). Granularity
``example`` scores the mean hidden state of each example's tokens and gives every token of the
example that selection; ``token`` scores each token on its own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from potluck.errors import UserError

__all__ = [
    "GRANULARITIES",
    "RouteContext",
    "Router",
    "dense_weights",
    "pool_examples",
    "renormalise",
    "softmax",
    "standardize",
    "top_k",
]

GRANULARITIES = ("token", "example")


@dataclass(frozen=True)
class RouteContext:
    """What a router may know besides the hidden states.

    ``example_index[t]`` is the example token ``t`` belongs to (default: every token its own
    example); ``task_names[i]`` is example ``i``'s task (oracle routing only); ``layer`` is the
    routed tensor's name.
    """

    example_index: np.ndarray | None = None
    task_names: Sequence[str] | None = None
    layer: str = ""

    def examples(self, n_tokens: int) -> np.ndarray:
        """``example_index`` as int64 ``[T]`` (each token its own example when not given)."""
        if self.example_index is None:
            return np.arange(n_tokens, dtype=np.int64)
        idx = np.asarray(self.example_index, dtype=np.int64).reshape(-1)
        if idx.shape[0] != n_tokens or (idx.size and idx.min() < 0):
            raise UserError(
                f"example_index has {idx.shape[0]} entries for {n_tokens} tokens",
                hint="give one non-negative example number per token",
            )
        return idx


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best experts per row of ``scores [T, E]``: (indices, their scores), best first.

    Ties go to the lower expert number. ``k`` larger than E is an error.
    """
    e = scores.shape[1]
    if not 1 <= k <= e:
        raise UserError(f"top_k={k} but there are {e} experts", hint=f"use 1 ≤ top_k ≤ {e}")
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k].astype(np.int64)
    return order, np.take_along_axis(scores, order, axis=1)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Softmax over the last axis of ``logits / temperature`` (float64, max-shifted)."""
    if temperature <= 0:
        raise UserError(f"temperature must be > 0, got {temperature}", hint="use e.g. 1.0")
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    ez = np.exp(z)
    out: np.ndarray = ez / ez.sum(axis=-1, keepdims=True)
    return out


def renormalise(weights: np.ndarray) -> np.ndarray:
    """Scale each row of non-negative ``weights`` to sum to 1 (an all-zero row becomes uniform)."""
    w = np.asarray(weights, dtype=np.float64)
    total = w.sum(axis=-1, keepdims=True)
    uniform = np.full_like(w, 1.0 / w.shape[-1])
    out: np.ndarray = np.where(total > 0, w / np.where(total > 0, total, 1.0), uniform)
    return out


def standardize(x: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """Zero mean, unit variance over the last axis (LayerNorm without affine; biased variance)."""
    x64 = np.asarray(x, dtype=np.float64)
    mu = x64.mean(axis=-1, keepdims=True)
    var = x64.var(axis=-1, keepdims=True)
    out: np.ndarray = (x64 - mu) / np.sqrt(var + eps)
    return out


def pool_examples(hidden: np.ndarray, example_index: np.ndarray) -> np.ndarray:
    """Mean of each example's token states: ``[n_examples, d]`` (examples 0..max index)."""
    n = int(example_index.max()) + 1 if example_index.size else 0
    sums = np.zeros((n, hidden.shape[1]), dtype=np.float64)
    np.add.at(sums, example_index, hidden.astype(np.float64))
    counts = np.bincount(example_index, minlength=n).astype(np.float64)
    out: np.ndarray = sums / np.maximum(counts, 1.0)[:, None]
    return out


def dense_weights(indices: np.ndarray, weights: np.ndarray, n_experts: int) -> np.ndarray:
    """``[T, E]`` matrix with ``weights`` at ``indices`` and zeros elsewhere."""
    out = np.zeros((indices.shape[0], n_experts), dtype=np.float64)
    np.put_along_axis(out, indices, weights, axis=1)
    return out


def _check_hidden(hidden: np.ndarray) -> np.ndarray:
    h = np.asarray(hidden)
    if h.ndim != 2:
        raise UserError(f"hidden must be [tokens, dim], got shape {h.shape}", hint="flatten it")
    return h


class Router:
    """Base router: ``scores`` per expert, then top-k and a weighting rule.

    Subclasses set ``name``/``reference_url`` and implement ``scores(hidden, ctx) -> [N, E]``.
    ``weighting`` is ``softmax`` (softmax of the selected scores / temperature) or
    ``renormalise`` (selected non-negative scores scaled to sum to 1) or ``raw`` (kept as is).
    """

    name: ClassVar[str] = ""
    reference_url: ClassVar[str | None] = None
    weighting: ClassVar[str] = "softmax"

    def __init__(
        self,
        n_experts: int,
        *,
        top_k: int | None = None,
        temperature: float = 1.0,
        granularity: str = "token",
    ) -> None:
        if n_experts < 1:
            raise UserError("a router needs at least one expert", hint="add experts")
        if granularity not in GRANULARITIES:
            raise UserError(
                f"unknown granularity {granularity!r}", hint=f"use one of {GRANULARITIES}"
            )
        self.n_experts = n_experts
        self.k = n_experts if top_k is None else top_k
        if not 1 <= self.k <= n_experts:
            raise UserError(
                f"top_k={self.k} but the {self.name} router has {n_experts} experts",
                hint=f"use 1 ≤ top_k ≤ {n_experts}",
            )
        if temperature <= 0:
            raise UserError(f"temperature must be > 0, got {temperature}", hint="use e.g. 1.0")
        self.temperature = temperature
        self.granularity = granularity

    @classmethod
    def build(
        cls, n_experts: int, settings: Mapping[str, Any], artifacts: Sequence[np.ndarray | None]
    ) -> Router:
        """A router for one layer from the manifest's settings and the experts' artifacts."""
        raise NotImplementedError

    def scores(self, hidden: np.ndarray, ctx: RouteContext, rows: np.ndarray) -> np.ndarray:
        """Routing scores ``[N, E]`` for ``hidden [N, d]``; ``rows[n]`` is row n's example."""
        raise NotImplementedError

    def _weights(self, selected: np.ndarray) -> np.ndarray:
        if self.weighting == "softmax":
            return softmax(selected, self.temperature)
        if self.weighting == "renormalise":
            return renormalise(np.maximum(selected, 0.0))
        return np.asarray(selected, dtype=np.float64)

    def select(
        self, hidden: np.ndarray, ctx: RouteContext | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k experts and their weights for every token of ``hidden [T, d]``."""
        ctx = ctx or RouteContext()
        h = _check_hidden(hidden)
        examples = ctx.examples(h.shape[0])
        if self.granularity == "example":
            pooled = pool_examples(h, examples)
            rows = np.arange(pooled.shape[0], dtype=np.int64)
            idx, sel = top_k(self.scores(pooled, ctx, rows), self.k)
            return idx[examples], self._weights(sel)[examples]
        idx, sel = top_k(self.scores(h, ctx, examples), self.k)
        return idx, self._weights(sel)

"""Fitting routers in numpy: LoraHub's gradient-free weight search and a softmax router.

``lorahub_search`` follows LoraHub (Huang et al. 2023) in spirit — per-expert weights bounded to
[-1.5, 1.5], objective = task loss + ``l1``·mean|w| on a few examples, no gradients — but
replaces Nevergrad's CMA-ES with a documented, seeded two-phase search:

1. **random search**: the starting point (all zeros unless ``init``) and ``n_random`` points drawn
   uniformly in the box from ``numpy.random.Generator(PCG64(seed))``; keep the best;
2. **coordinate descent**: for each expert in order, try w ± step (clipped to the box) and keep
   a strict improvement; after a sweep without improvement halve the step (start 0.5); stop when
   the step is below ``min_step`` or ``budget`` objective evaluations are spent.

The same inputs and seed give the same weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from potluck.errors import UserError
from potluck.modular.routing import softmax

__all__ = ["SearchResult", "fit_softmax_router", "lorahub_search", "softmax_router_loss"]

BOUND = 1.5


@dataclass(frozen=True)
class SearchResult:
    """Best weights found, their objective value and the number of evaluations spent."""

    weights: np.ndarray
    objective: float
    evaluations: int


class _Budget:
    def __init__(self, fn: Callable[[np.ndarray], float], l1: float, budget: int) -> None:
        self.fn, self.l1, self.left, self.used = fn, l1, budget, 0

    def __call__(self, w: np.ndarray) -> float:
        self.left -= 1
        self.used += 1
        return float(self.fn(w)) + self.l1 * float(np.mean(np.abs(w)))


def _descend(obj: _Budget, w: np.ndarray, best: float, min_step: float) -> tuple[np.ndarray, float]:
    step = 0.5
    while step >= min_step and obj.left > 0:
        improved = False
        for e in range(w.size):
            for sign in (1.0, -1.0):
                if obj.left <= 0:
                    return w, best
                cand = w.copy()
                cand[e] = np.clip(cand[e] + sign * step, -BOUND, BOUND)
                val = obj(cand)
                if val < best:
                    w, best, improved = cand, val, True
                    break
        if not improved:
            step /= 2
    return w, best


def lorahub_search(
    loss: Callable[[np.ndarray], float],
    n_experts: int,
    *,
    seed: int = 0,
    budget: int = 200,
    n_random: int = 20,
    l1: float = 0.05,
    min_step: float = 1e-3,
    init: np.ndarray | None = None,
) -> SearchResult:
    """Search per-expert weights minimising ``loss(w) + l1·mean|w|`` (see the module doc)."""
    if n_experts < 1 or budget < 1:
        raise UserError("lorahub_search needs ≥ 1 expert and a budget ≥ 1", hint="check inputs")
    obj = _Budget(loss, l1, budget)
    rng = np.random.Generator(np.random.PCG64(seed))
    w = (
        np.zeros(n_experts)
        if init is None
        else np.clip(np.asarray(init, np.float64), -BOUND, BOUND)
    )
    best = obj(w)
    for _ in range(min(n_random, obj.left)):
        cand = rng.uniform(-BOUND, BOUND, n_experts)
        val = obj(cand)
        if val < best:
            w, best = cand, val
    w, best = _descend(obj, w, best, min_step)
    return SearchResult(w, best, obj.used)


def softmax_router_loss(
    weight: np.ndarray, bias: np.ndarray, hidden: np.ndarray, labels: np.ndarray, l2: float
) -> tuple[float, np.ndarray, np.ndarray]:
    """Mean cross-entropy of softmax(h Wᵀ + b) against ``labels`` + l2/2·‖W‖²; and its gradients."""
    n = hidden.shape[0]
    p = softmax(hidden @ weight.T + bias)
    loss = -float(np.mean(np.log(p[np.arange(n), labels] + 1e-300)))
    loss += 0.5 * l2 * float(np.sum(weight**2))
    g = p.copy()
    g[np.arange(n), labels] -= 1.0
    g /= n
    return loss, g.T @ hidden + l2 * weight, g.sum(axis=0)


def fit_softmax_router(
    hidden: np.ndarray,
    labels: np.ndarray,
    n_experts: int,
    *,
    steps: int = 300,
    lr: float = 0.5,
    l2: float = 1e-4,
) -> tuple[np.ndarray, np.ndarray]:
    """Train a linear softmax router (full-batch gradient descent from zeros; deterministic).

    ``hidden [N, d]`` are routing inputs, ``labels [N]`` the expert each should go to.
    Returns (weight [E, d], bias [E]).
    """
    h = np.asarray(hidden, np.float64)
    y = np.asarray(labels, np.int64)
    if y.size and (y.min() < 0 or y.max() >= n_experts):
        raise UserError("router labels must be expert numbers 0..E-1", hint="check the labels")
    w, b = np.zeros((n_experts, h.shape[1])), np.zeros(n_experts)
    for _ in range(steps):
        _loss, gw, gb = softmax_router_loss(w, b, h, y, l2)
        w -= lr * gw
        b -= lr * gb
    return w, b

"""The built-in routers (see ``potluck.modular.routing`` for the interface).

Each router class has ``build(n_experts, settings, artifacts)``: ``settings`` are the manifest's
router options (``top_k``, ``temperature``, ``granularity`` and strategy-specific ones) and
``artifacts`` the per-expert arrays of the layer being routed (Arrow prototypes, PHATGOOSE gates;
``None`` for an expert without one).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from potluck.errors import UserError
from potluck.modular.routing import RouteContext, Router, standardize

__all__ = [
    "ArrowRouter",
    "LearnedRouter",
    "OracleRouter",
    "PhatgooseRouter",
    "SmearRouter",
    "StaticRouter",
    "UniformRouter",
]

Settings = Mapping[str, Any]
Artifacts = Sequence[np.ndarray | None]


def _common(settings: Settings, default_k: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"granularity": str(settings.get("granularity", "token"))}
    k = settings.get("top_k")
    k = default_k if k is None else k
    out["top_k"] = None if k is None else int(k)
    if settings.get("temperature") is not None:
        out["temperature"] = float(settings["temperature"])
    return out


def _stack(name: str, artifacts: Artifacts, what: str) -> np.ndarray:
    missing = [i for i, a in enumerate(artifacts) if a is None]
    if missing:
        raise UserError(
            f"the {name} router needs {what} for every expert; expert #{missing[0]} has none",
            hint=f"compute or add the {what} artifact for that expert (potluck experts add)",
            expert_index=missing[0],
        )
    arrs = [np.asarray(a, dtype=np.float64).reshape(-1) for a in artifacts if a is not None]
    if len({a.shape for a in arrs}) != 1:
        raise UserError(f"{what} of the experts have different sizes", hint="recompute them")
    return np.stack(arrs)


class UniformRouter(Router):
    """Equal weights for the first ``top_k`` experts (all by default): the uniform merge."""

    name: ClassVar[str] = "uniform"
    weighting: ClassVar[str] = "renormalise"

    def scores(self, hidden: np.ndarray, ctx: RouteContext, rows: np.ndarray) -> np.ndarray:
        """All ones: every expert is as good as any other."""
        return np.ones((hidden.shape[0], self.n_experts))

    @classmethod
    def build(cls, n_experts: int, settings: Settings, artifacts: Artifacts) -> UniformRouter:
        """A uniform router over ``n_experts``."""
        return cls(n_experts, **_common(settings))


class OracleRouter(Router):
    """Route each example to the expert serving its task name (``ctx.task_names``).

    ``tasks[e]`` lists the task names expert ``e`` serves; top-1 by default.
    """

    name: ClassVar[str] = "oracle"
    weighting: ClassVar[str] = "renormalise"

    def __init__(self, tasks: Sequence[Sequence[str]], **kw: Any) -> None:
        kw.setdefault("top_k", 1)
        super().__init__(len(tasks), **kw)
        self.task_to_expert: dict[str, int] = {}
        for e, names in enumerate(tasks):
            for t in names:
                self.task_to_expert.setdefault(t, e)

    def scores(self, hidden: np.ndarray, ctx: RouteContext, rows: np.ndarray) -> np.ndarray:
        """One-hot rows: 1 for the expert of the row's example's task."""
        if ctx.task_names is None:
            raise UserError("the oracle router needs task names", hint="pass --task per input")
        out = np.zeros((hidden.shape[0], self.n_experts))
        for n, ex in enumerate(rows):
            task = ctx.task_names[int(ex)]
            if task not in self.task_to_expert:
                raise UserError(
                    f"no expert serves task {task!r}",
                    hint=f"known tasks: {', '.join(sorted(self.task_to_expert))}",
                    task=task,
                )
            out[n, self.task_to_expert[task]] = 1.0
        return out

    @classmethod
    def build(cls, n_experts: int, settings: Settings, artifacts: Artifacts) -> OracleRouter:
        """``settings['tasks']``: one list of task names per expert."""
        tasks = settings.get("tasks")
        if tasks is None or len(tasks) != n_experts:
            raise UserError("the oracle router needs task names per expert", hint="tag experts")
        return cls(tasks, **_common(settings, 1))


class ArrowRouter(Router):
    """Arrow (Ostapenko et al. 2024): logits |⟨h, pₑ⟩| with pₑ the unit top right-singular
    vector of expert e's ΔW = B·A; softmax of the top-k logits / temperature (as peft's
    ``ArrowLoraLinearLayer``: no normalisation of h, sign-agnostic)."""

    name: ClassVar[str] = "arrow"
    reference_url: ClassVar[str | None] = "https://arxiv.org/abs/2405.11157"

    def __init__(self, prototypes: np.ndarray, **kw: Any) -> None:
        super().__init__(prototypes.shape[0], **kw)
        self.prototypes = np.asarray(prototypes, dtype=np.float64)

    def scores(self, hidden: np.ndarray, ctx: RouteContext, rows: np.ndarray) -> np.ndarray:
        """|h · pₑ| for every expert."""
        out: np.ndarray = np.abs(hidden.astype(np.float64) @ self.prototypes.T)
        return out

    @classmethod
    def build(cls, n_experts: int, settings: Settings, artifacts: Artifacts) -> ArrowRouter:
        """From each expert's prototype of this layer."""
        return cls(_stack("arrow", artifacts, "Arrow prototypes"), **_common(settings))


class PhatgooseRouter(Router):
    """PHATGOOSE (Muqeeth et al. 2024): logits = standardize(h) · standardize(vₑ) with vₑ the
    expert's trained sigmoid-gate vector for this module; top-k (default 2), softmax of the
    selected logits / temperature (default √d, as in the reference implementation)."""

    name: ClassVar[str] = "phatgoose"
    reference_url: ClassVar[str | None] = "https://arxiv.org/abs/2402.05859"

    def __init__(self, gates: np.ndarray, **kw: Any) -> None:
        kw.setdefault("temperature", math.sqrt(gates.shape[1]))
        kw.setdefault("top_k", min(2, gates.shape[0]))
        super().__init__(gates.shape[0], **kw)
        self.gates = standardize(gates)

    def scores(self, hidden: np.ndarray, ctx: RouteContext, rows: np.ndarray) -> np.ndarray:
        """Dot products of the standardized hidden state and standardized gates."""
        out: np.ndarray = standardize(hidden) @ self.gates.T
        return out

    @classmethod
    def build(cls, n_experts: int, settings: Settings, artifacts: Artifacts) -> PhatgooseRouter:
        """From each expert's gate vector of this layer."""
        common = _common(settings, min(2, n_experts))
        return cls(_stack("phatgoose", artifacts, "PHATGOOSE gates"), **common)


class LearnedRouter(Router):
    """A learned linear softmax router: logits = h Wᵀ + b, top-k, softmax of the selected logits
    / temperature (= the full softmax renormalised over the selected experts at temperature 1).
    Train it with ``potluck.modular.fit.fit_softmax_router``."""

    name: ClassVar[str] = "learned"

    def __init__(self, weight: np.ndarray, bias: np.ndarray | None = None, **kw: Any) -> None:
        super().__init__(weight.shape[0], **kw)
        self.weight = np.asarray(weight, dtype=np.float64)
        self.bias = np.zeros(weight.shape[0]) if bias is None else np.asarray(bias, np.float64)

    def scores(self, hidden: np.ndarray, ctx: RouteContext, rows: np.ndarray) -> np.ndarray:
        """Linear logits."""
        out: np.ndarray = hidden.astype(np.float64) @ self.weight.T + self.bias
        return out

    @classmethod
    def build(cls, n_experts: int, settings: Settings, artifacts: Artifacts) -> LearnedRouter:
        """``settings['router_weight']`` [E, d] and optional ``router_bias`` [E] of this layer."""
        w = settings.get("router_weight")
        if w is None or np.asarray(w).shape[0] != n_experts:
            raise UserError(
                f"the {cls.name} router needs a [{n_experts}, d] weight for this layer",
                hint="set router.weights_file to a safetensors file of <layer>.weight/.bias",
            )
        return cls(np.asarray(w), settings.get("router_bias"), **_common(settings))


class SmearRouter(LearnedRouter):
    """SMEAR (Muqeeth et al. 2023): a learned softmax router over all experts, per example by
    default, whose weights average the experts' *parameters* (aggregation ``parameters``)."""

    name: ClassVar[str] = "smear"
    reference_url: ClassVar[str | None] = "https://arxiv.org/abs/2306.03745"


class StaticRouter(Router):
    """Fixed per-expert weights (LoraHub's searched weights, or hand-set ones) for every token.

    The ``top_k`` largest |w| are kept with their signed values (not renormalised; LoraHub's
    weights need not sum to 1).
    """

    name: ClassVar[str] = "static"
    reference_url: ClassVar[str | None] = "https://arxiv.org/abs/2307.13269"
    weighting: ClassVar[str] = "raw"

    def __init__(self, weights: Sequence[float], **kw: Any) -> None:
        super().__init__(len(weights), **kw)
        self.static = np.asarray(weights, dtype=np.float64)

    def scores(self, hidden: np.ndarray, ctx: RouteContext, rows: np.ndarray) -> np.ndarray:
        """|w| for every token."""
        return np.broadcast_to(np.abs(self.static), (hidden.shape[0], self.n_experts)).copy()

    def select(
        self, hidden: np.ndarray, ctx: RouteContext | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by |w|; the weights are the signed static values."""
        idx, _ = super().select(hidden, ctx)
        return idx, self.static[idx]

    @classmethod
    def build(cls, n_experts: int, settings: Settings, artifacts: Artifacts) -> StaticRouter:
        """``settings['weights']``: one weight per expert, in expert order."""
        w = settings.get("weights")
        if w is None or len(w) != n_experts:
            raise UserError(
                f"the static router needs {n_experts} weights",
                hint="set router.weights = {expert = w, …} in the manifest",
            )
        return cls([float(x) for x in w], **_common(settings))

"""Rows that need routing data pooled across contributors: learned softmax router and LoraHub.

Unlike Arrow and PHATGOOSE (each contributor only ever sees its own task), both rows below are
fit on a SMALL labelled set pooled from every task's TRAINING split (never test texts), like
the base joint probe. The routers are potluck's own (``learned`` / ``static``), fit with
potluck's fitting code (``potluck.modular.fit_softmax_router`` / ``lorahub_search``).

* **learned softmax**: the oracle composition runs on the pooled texts (each text routed to its
  own task's expert), and the input of every adapted linear is recorded, per token (or per
  example mean with ``granularity = example``), labelled with the text's task. Per layer, the
  states are standardised per dimension (mean / sd of the pooled states), a linear softmax router
  is fit on them by ``fit_softmax_router`` (full-batch gradient descent from zeros, step size
  1/λ_max of the second-moment matrix of [z, 1], so it cannot diverge), and the standardisation
  is folded back into W and b (exact: W·(h−μ)/σ + b = (W/σ)·h + b − W·μ/σ); at most 2,048 states
  per layer (a seeded subsample of the pooled tokens) keep the fit cheap. The router file holds
  ``<weight>/weight`` and ``<weight>/bias`` per layer; the composition uses strategy ``learned``.
* **LoraHub**: one static weight per expert searched by ``lorahub_search`` (bounded to ±1.5,
  l1 = 0.05, seeded random + coordinate search) on a few pooled training texts; the loss is the
  cross-entropy over the joint label space (all heads' logits concatenated) of the static
  composition, since the task is hidden at test time. The weights are then evaluated as an
  ordinary ``static`` composition: a fixed mixture, i.e. a merge with searched coefficients.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import data, model
from bench.modular import evaluate
from bench.modular.contrib import save_st


@dataclass(frozen=True)
class PooledConfig:
    """How much pooled training data the two rows see, and the fit settings."""

    router_per_task: int = 32
    router_steps: int = 300
    router_max_states: int = 2048
    router_l2: float = 1e-4
    lorahub_per_task: int = 5
    lorahub_budget: int = 100
    lorahub_l1: float = 0.05


def pick(tasks: Sequence[data.Task], per_task: int, seed: int) -> evaluate.Mixture:
    """``per_task`` seeded TRAINING texts of each task (task index and label kept)."""
    return evaluate.draw(tasks, per_task, np.random.default_rng(seed), "train")


def _record_inputs(composed: Any) -> dict[str, list[Any]]:
    """Forward pre-hooks that keep the input of every expert container (one list per layer)."""
    seen: dict[str, list[Any]] = {}
    for name, container in composed.containers.items():
        seen[f"{name}.weight"] = []

        def hook(_mod: Any, args: Any, key: str = f"{name}.weight") -> None:
            seen[key].append(args[0].detach().double().numpy())

        container.register_forward_pre_hook(hook)
    return seen


def routing_states(
    oracle_manifest: Path, pool: evaluate.Mixture, tokenizer: Any, max_length: int, example: bool
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per adapted weight, the routing inputs [N, d] under oracle routing; and their task [N]."""
    import torch

    from potluck.ops.compose.runtime import compose

    composed = compose(oracle_manifest, model=model.load_encoder())
    seen = _record_inputs(composed)
    enc = tokenizer(
        pool.texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    names = [pool.task_names[t] for t in pool.task]
    with torch.inference_mode():
        composed(task_names=names, **enc)
    mask = enc["attention_mask"].numpy() > 0
    states = {}
    for key, (x,) in seen.items():
        if example:
            m = mask[..., None]
            states[key] = (x * m).sum(1) / m.sum(1)
        else:
            states[key] = x[mask]
    labels = pool.task if example else np.broadcast_to(pool.task[:, None], mask.shape)[mask]
    return states, np.asarray(labels)


def fit_layer(h: np.ndarray, y: np.ndarray, n: int, cfg: PooledConfig) -> tuple[Any, Any]:
    """potluck's ``fit_softmax_router`` on standardised states, folded back to raw-h (W, b)."""
    from potluck.modular import fit_softmax_router

    mu, sd = h.mean(0), h.std(0) + 1e-6
    z = (h - mu) / sd
    z1 = np.concatenate([z, np.ones((z.shape[0], 1))], axis=1)
    lam = float(np.linalg.eigvalsh(z1.T @ z1 / z1.shape[0])[-1])
    w, b = fit_softmax_router(z, y, n, steps=cfg.router_steps, lr=1.0 / lam, l2=cfg.router_l2)
    return w / sd, b - (w / sd) @ mu


def learned_router_file(
    out: Path, states: dict[str, np.ndarray], labels: np.ndarray, n: int, cfg: PooledConfig
) -> tuple[Path, float]:
    """Fit one router per layer, write them as ``<weight>/weight|bias``; (file, train acc)."""
    arrays, accs = {}, []
    rng = np.random.default_rng(0)
    keep = np.sort(rng.permutation(len(labels))[: cfg.router_max_states])
    for key, h in sorted(states.items()):
        w, b = fit_layer(h[keep], labels[keep], n, cfg)
        arrays[f"{key}/weight"] = w.astype(np.float32)
        arrays[f"{key}/bias"] = b.astype(np.float32)
        accs.append(float(np.mean((h @ w.T + b).argmax(1) == labels)))
    return save_st(out, arrays), float(np.mean(accs))


def _joint_targets(pool: evaluate.Mixture, heads: Sequence[Any]) -> np.ndarray:
    sizes = [int(h.out_features) for h in heads]
    offsets = np.cumsum([0, *sizes])[:-1]
    return np.asarray(offsets[pool.task] + pool.label)


def _joint_ce(logits: list[np.ndarray], target: np.ndarray) -> float:
    z = np.concatenate(logits, axis=1)
    z = z - z.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    return float(-logp[np.arange(len(target)), target].mean())


def lorahub_weights(
    manifest: Path,
    pool: evaluate.Mixture,
    tokenizer: Any,
    heads: Sequence[Any],
    max_length: int,
    cfg: PooledConfig,
    seed: int,
) -> tuple[np.ndarray, float, int]:
    """``lorahub_search`` over the static composition's weights; (weights, objective, evals).

    One composition is built; each evaluation sets the weights of its ``static`` routers (the
    router's own ``static`` array) and runs the pooled texts through it.
    """
    import torch

    from potluck.modular import lorahub_search
    from potluck.ops.compose.runtime import compose

    composed = compose(manifest, model=model.load_encoder())
    enc = tokenizer(
        pool.texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    target = _joint_targets(pool, heads)

    def loss(w: np.ndarray) -> float:
        for container in composed.containers.values():
            container.router.static = np.asarray(w, np.float64)
        with torch.inference_mode():
            out = composed(**enc)
            emb = model.mean_pool(out.last_hidden_state, enc["attention_mask"]).numpy()
        return _joint_ce(evaluate.head_logits(heads, emb), target)

    res = lorahub_search(loss, len(heads), seed=seed, budget=cfg.lorahub_budget, l1=cfg.lorahub_l1)
    return res.weights, res.objective, res.evaluations

"""Why does Arrow route poorly here? A per-layer look at a kept library, on TRAINING texts only.

Run after ``python -m bench.modular --seeds S --keep DIR``::

    .venv/bin/python -m bench.modular.arrow_diag DIR/seedS --seed S

The oracle composition runs on the same pooled training texts the learned router uses (32 per
task, ``pooled.pick(..., seed + 303)``); at every adapted linear its input states are routed with
potluck's ``ArrowRouter`` (the library's prototypes, top-1) and the per-token choice is compared
with the text's task. Per layer it prints: Arrow's token routing accuracy; the share of tokens
sent to the most-chosen expert (1.0 = one expert takes everything); the largest |cos| between
two experts' prototypes; the mean |cos| between a prototype and the layer's mean input state
(a prototype aligned with the common component of every token ranks experts by that component,
not by the task); and the training accuracy of a linear softmax router fit on the same states.
Nothing here sees test texts.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from bench.common import data, model


def layer_stats(h: np.ndarray, y: np.ndarray, protos: np.ndarray) -> dict[str, float]:
    """Arrow top-1 accuracy, top share, prototype cosines for one layer's states."""
    from potluck.modular import ArrowRouter

    idx, _ = ArrowRouter(protos, top_k=1).select(h)
    pick = idx[:, 0]
    share = np.bincount(pick, minlength=protos.shape[0]).max() / len(pick)
    unit = protos / np.linalg.norm(protos, axis=1, keepdims=True)
    cos = np.abs(unit @ unit.T)
    np.fill_diagonal(cos, 0.0)
    mu = h.mean(0) / np.linalg.norm(h.mean(0))
    return {
        "arrow_acc": float(np.mean(pick == y)),
        "top_share": float(share),
        "max_cos_pp": float(cos.max()),
        "mean_cos_mu_p": float(np.mean(np.abs(unit @ mu))),
    }


def main(argv: list[str] | None = None) -> int:
    """CLI: per-layer table for one kept seed folder."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folder", help="DIR/seedS written by python -m bench.modular --keep DIR")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--tasks", default="fortune_topic,fortune_lang,vader_words,tweet_sentiment")
    p.add_argument("--max-length", type=int, default=48)
    args = p.parse_args(argv)
    model.cpu_threads(2)
    model.offline()
    from bench.modular import evaluate, pooled
    from potluck.ops.compose.library import find_expert, load_artifact

    lib = Path(args.folder) / "library"
    tasks = [data.load_task(n, seed=args.seed) for n in args.tasks.split(",")]
    names = [t.name for t in tasks]
    cfg = pooled.PooledConfig()
    pool = pooled.pick(tasks, cfg.router_per_task, args.seed + 303)
    work = Path(tempfile.mkdtemp(prefix="arrow-diag-"))
    man = evaluate.write_manifest(work, lib, names, {"strategy": "oracle", "top_k": 1})
    states, y = pooled.routing_states(man, pool, model.load_tokenizer(), args.max_length, False)
    arts = [load_artifact(find_expert(lib, f"{n}@1.0"), "arrow") for n in names]
    print("| layer | Arrow top-1 token acc | top share | max cos(p,p') | mean cos(μ,p) | learned |")
    print("|---|---|---|---|---|---|")
    for key in sorted(states):
        protos = np.stack([a[key] for a in arts]).astype(np.float64)
        s = layer_stats(states[key], y, protos)
        w, b = pooled.fit_layer(states[key], y, len(names), cfg)
        learned = float(np.mean((states[key] @ w.T + b).argmax(1) == y))
        short = key.removeprefix("encoder.layer.").removesuffix(".weight")
        print(
            f"| {short} | {s['arrow_acc']:.2f} | {s['top_share']:.2f} | {s['max_cos_pp']:.2f} "
            f"| {s['mean_cos_mu_p']:.2f} | {learned:.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

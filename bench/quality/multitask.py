"""Multi-task upper bound: one encoder fine-tuned on all tasks at once, one head per task.

Same recipe as the individual fine-tunes (``bench.quality.stages.finetune_config``: AdamW lr 5e-5,
heads 1e-3, batch 8, warm-up 10 % then linear decay, max 64 tokens) for ``steps × tasks`` steps;
step ``i`` takes the next batch of task ``i mod T`` (round-robin; each task's batches are the
ones its individual fine-tune draws, in the same order). Each task is scored on test with its own
head. Run: ``python -m bench.quality.multitask --seed 0`` → ``results-multitask-s<seed>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import data, finetune, model

from . import merges, report, stages
from .run import TASKS


def round_robin(per_task: list[list[np.ndarray]]) -> list[tuple[int, np.ndarray]]:
    """(task index, batch) with step ``i`` taking task ``i mod T``'s next batch (equal counts)."""
    n = min(len(b) for b in per_task)
    return [(t, per_task[t][i]) for i in range(n) for t in range(len(per_task))]


def _train(tasks: list[data.Task], cfg: finetune.FinetuneConfig) -> tuple[Any, list[Any]]:
    import torch

    torch.manual_seed(cfg.seed)
    tok, encoder = model.load_tokenizer(), model.load_encoder()
    heads = [torch.nn.Linear(384, len(t.label_names)) for t in tasks]
    total = dataclasses.replace(cfg, steps=cfg.steps * len(tasks))
    lengths = [[len(ids) for ids in tok(t.train.texts)["input_ids"]] for t in tasks]
    order = round_robin([finetune._batches(n, cfg) for n in lengths])
    encoder.train()
    finetune.train_loop(
        encoder, heads, list(encoder.parameters()), tasks, order, tok,
        lr=cfg.lr, head_lr=cfg.head_lr, max_length=cfg.max_length, weight_decay=cfg.weight_decay,
        schedule=lambda s: finetune._schedule(s, total), log_every=100,
    )  # fmt: skip
    encoder.train(False)
    return encoder, heads


def main(argv: list[str] | None = None) -> int:
    """Train (or reuse) the multi-task encoder, score each task with its head, write JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=200, help="steps per task (batch 8)")
    p.add_argument("--out", type=Path, default=stages.RESULTS)
    args = p.parse_args(argv)
    import torch
    from safetensors.torch import save_file

    torch.set_num_threads(2)
    tasks = [data.load_task(n, seed=args.seed) for n in TASKS]
    cfg = stages.finetune_config("+".join(TASKS), args.seed, args.steps)
    folder = args.out / f"multitask-s{args.seed}-{cfg.key()}"
    heads_path = {t.name: folder / f"head-{t.name}.safetensors" for t in tasks}
    t0 = time.perf_counter()
    if not all(h.is_file() for h in heads_path.values()):
        encoder, heads = _train(tasks, cfg)
        folder.mkdir(parents=True, exist_ok=True)
        model.save_encoder(encoder.state_dict(), folder / "encoder.safetensors")
        for t, h in zip(tasks, heads, strict=True):
            save_file({k: v.detach().contiguous() for k, v in h.state_dict().items()},
                      str(heads_path[t.name]))  # fmt: skip
    train_s = round(time.perf_counter() - t0, 1)
    loaded = {n: finetune.load_head(h) for n, h in heads_path.items()}
    t0 = time.perf_counter()
    test = stages.Evaluator(tasks, "test").scores(folder / "encoder.safetensors", loaded)
    out: dict[str, Any] = {"config": dataclasses.asdict(cfg), "folder": str(folder),
                           "test": test, "times_s": {"train": train_s,
                           "test": round(time.perf_counter() - t0, 1)}}  # fmt: skip
    single = args.out / f"results-s{args.seed}.json"
    if single.is_file():
        r = json.loads(single.read_text())
        out["metrics_vs_results"] = report.row_metrics(test, r)
    merges.save_json(args.out / f"results-multitask-s{args.seed}.json", out)
    print(json.dumps(out, indent=2), file=sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

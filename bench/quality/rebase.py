"""``python -m bench.quality.rebase``: contributors' patches follow a moving base (issue 17 item 6).

v1 is the shipped all-MiniLM-L6-v2. Contributors fine-tune v1 on their task (the quality
benchmark's cached fine-tunes) and ship exact patches of the encoder. The base then moves: v2 is
v1 after a multi-task step on the other tasks (``multitask._train``, ``--move-steps`` per task).
Each patch is ported with ``potluck patch rebase`` (per ``--methods``) and applied to v2; the
result is scored on the contributor's task with the contributor's own head, and on the moving
tasks with v2's heads (does the port keep what v2 learned?). The alternative, re-fine-tuning the
contributor's task from v2 with the same recipe, gives the reference accuracy and cost.

Writes ``rebase-s<seed>.json`` in ``--out`` and prints one line per (contributor, variant).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import data, finetune, model

from . import multitask, stages

CONTRIBUTORS = ("fortune_topic", "vader_words")
MOVERS = ("fortune_lang", "fortune_topic_es", "tweet_sentiment")


def _save_heads(heads: dict[str, Any], folder: Path) -> None:
    from safetensors.torch import save_file

    for name, h in heads.items():
        state = {k: v.detach().contiguous() for k, v in h.state_dict().items()}
        save_file(state, str(folder / f"head-{name}.safetensors"))


def move_base(tasks: list[data.Task], cfg: finetune.FinetuneConfig, folder: Path) -> float:
    """v2 = v1 after a multi-task step on ``tasks`` (cached in ``folder``); the seconds spent."""
    if (folder / "encoder.safetensors").is_file():
        return 0.0
    t0 = time.perf_counter()
    encoder, heads = multitask._train(tasks, cfg)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_encoder(encoder.state_dict(), folder / "encoder.safetensors")
    _save_heads({t.name: h for t, h in zip(tasks, heads, strict=True)}, folder)
    return time.perf_counter() - t0


def finetune_from(
    weights: Path, task: data.Task, cfg: finetune.FinetuneConfig, out: Path
) -> tuple[float, float]:
    """Fine-tune ``weights`` on ``task`` with the contributors' recipe; encoder + head to
    ``out``; (wall seconds, CPU seconds of this process) spent training."""
    import torch

    torch.manual_seed(cfg.seed)
    tok = model.load_tokenizer()
    encoder = model.load_encoder(weights)
    head = torch.nn.Linear(int(encoder.config.hidden_size), len(task.label_names))
    lengths = [len(ids) for ids in tok(task.train.texts)["input_ids"]]
    t0, c0 = time.perf_counter(), time.process_time()
    encoder.train()
    finetune.train_loop(
        encoder, [head], list(encoder.parameters()), [task],
        [(0, idx) for idx in finetune._batches(lengths, cfg)], tok,
        lr=cfg.lr, head_lr=cfg.head_lr, max_length=cfg.max_length,
        schedule=lambda s: finetune._schedule(s, cfg), log_every=100, label="refit ",
    )  # fmt: skip
    encoder.train(False)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    out.mkdir(parents=True, exist_ok=True)
    model.save_encoder(encoder.state_dict(), out / "encoder.safetensors")
    _save_heads({task.name: head}, out)
    return seconds, cpu


class NotCached(RuntimeError):
    """A contributor's fine-tune is not in the cache (this benchmark never trains them)."""


def cached_only(cfg: finetune.FinetuneConfig, root: Path) -> finetune.Finetuned:
    """The cached fine-tune of ``cfg`` under ``root`` (bench.quality's ``finetunes/``, or
    bench.common's cache); ``NotCached`` rather than training it."""
    folder = f"{cfg.task}-{cfg.key()}"
    names = ("meta.json", "encoder.safetensors", "head.safetensors")
    if not any(all((d / folder / n).is_file() for n in names)
               for d in (root, stages.MINILM_CACHE)):  # fmt: skip
        raise NotCached(
            f"{cfg.task}: no cached fine-tune {folder} under {root} or {stages.MINILM_CACHE}; "
            "run `python -m bench.quality` first (its first stage trains them)"
        )
    return stages.cached_finetune(cfg, root)


def _port(
    patch: Path, v1: Path, v2: Path, method: str, folder: Path
) -> tuple[Path, float, float, int]:
    """Rebase ``patch`` onto v2 with ``method`` and apply it: (encoder, wall seconds, CPU
    seconds, conflicts)."""
    from potluck.ops.patch import apply_patch
    from potluck.ops.patch.rebase import rebase_patch

    t0, c0 = time.perf_counter(), time.process_time()
    report = rebase_patch(patch, v1, v2, folder / f"{method}.patch", method=method)
    enc = folder / f"{method}.safetensors"
    apply_patch(v2, folder / f"{method}.patch", enc)
    return enc, time.perf_counter() - t0, time.process_time() - c0, len(report.conflicts)


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=200, help="contributor fine-tune steps")
    p.add_argument("--move-steps", type=int, default=100, help="base move: steps per task")
    p.add_argument("--refit-steps", type=int, help="re-fine-tune steps (default: --steps)")
    p.add_argument("--methods", nargs="+", default=["ta", "ties"])
    p.add_argument("--out", type=Path, default=stages.RESULTS)
    return p.parse_args(argv)


class _Scorer:
    """Scores encoders on one contributor task and on the moving tasks; collects the rows."""

    def __init__(self, ev: stages.Evaluator, mover_heads: dict[str, Any]) -> None:
        self.ev, self.mover_heads = ev, mover_heads
        self.rows: list[dict[str, Any]] = []

    def row(self, task: str, variant: str, enc: Path, head: Any, seconds: float | None,
            **kw: Any) -> None:  # fmt: skip
        """Score ``enc`` with ``head`` on ``task`` and with v2's heads on the moving tasks."""
        acc = self.ev.scores(enc, {task: head})[task]
        kept = self.ev.scores(enc, self.mover_heads)
        mean_kept = sum(kept.values()) / len(kept)
        self.rows.append({"task": task, "variant": variant, "acc": acc, "seconds": seconds,
                          "movers": kept, "movers_mean": mean_kept, **kw})  # fmt: skip
        took = "" if seconds is None else f"{seconds:.1f} s"
        print(f"{task:16} {variant:22} acc {acc:.4f}  movers {mean_kept:.4f}  {took}", flush=True)


def _contributor(task: data.Task, args: argparse.Namespace, root: Path, sc: _Scorer) -> None:
    """One contributor: the original, v2 with the old head, each rebase, the re-fine-tune."""
    from potluck.ops.patch import create_patch

    v1, v2 = model.base_weights(), root / "v2" / "encoder.safetensors"
    cfg = stages.finetune_config(task.name, args.seed, args.steps)
    run = cached_only(cfg, args.out / "finetunes")
    head = finetune.load_head(run.head)
    work = root / task.name
    work.mkdir(parents=True, exist_ok=True)
    create_patch(v1, run.encoder, work / "contrib.patch")
    sc.row(task.name, "v1 + patch (original)", run.encoder, head, run.meta.get("train_s"))
    sc.row(task.name, "v2, old head", v2, head, None)
    for method in args.methods:
        enc, sec, cpu, conflicts = _port(work / "contrib.patch", v1, v2, method, work)
        sc.row(task.name, f"rebase {method}", enc, head, sec, cpu_s=cpu, conflicts=conflicts)
    refit_cfg = dataclasses.replace(cfg, steps=args.refit_steps or args.steps)
    refit_s, refit_cpu = finetune_from(v2, task, refit_cfg, work / f"refit-{refit_cfg.steps}")
    refit = work / f"refit-{refit_cfg.steps}"
    refit_head = finetune.load_head(refit / f"head-{task.name}.safetensors")
    sc.row(task.name, f"re-fine-tune from v2 ({refit_cfg.steps} steps)",
           refit / "encoder.safetensors", refit_head, refit_s, cpu_s=refit_cpu)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Run the protocol of the module docstring; print and write the results."""
    args = _args(argv)
    import torch

    torch.set_num_threads(2)
    movers = [data.load_task(n, seed=args.seed) for n in MOVERS]
    contributors = [data.load_task(n, seed=args.seed) for n in CONTRIBUTORS]
    try:  # before the base moves: never train a contributor here
        for t in contributors:
            cached_only(
                stages.finetune_config(t.name, args.seed, args.steps), args.out / "finetunes"
            )
    except NotCached as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    move_cfg = stages.finetune_config("+".join(MOVERS), args.seed, args.move_steps)
    root = args.out / f"rebase-s{args.seed}-{move_cfg.key()}"
    move_s = move_base(movers, move_cfg, root / "v2")
    mover_heads = {t.name: finetune.load_head(root / "v2" / f"head-{t.name}.safetensors")
                   for t in movers}  # fmt: skip
    sc = _Scorer(stages.Evaluator([*movers, *contributors], "test"), mover_heads)
    v2_movers = sc.ev.scores(root / "v2" / "encoder.safetensors", mover_heads)
    for task in contributors:
        _contributor(task, args, root, sc)
    out = {"seed": args.seed, "steps": args.steps, "move_steps": args.move_steps,
           "refit_steps": args.refit_steps or args.steps,
           "move_s": round(move_s, 1), "v2_movers": v2_movers, "rows": sc.rows}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rebase-s{args.seed}.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({"v2_movers": v2_movers}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    model.cpu_threads(2)  # OMP_WAIT_POLICY=PASSIVE: without it, 5-10x slower under load here
    raise SystemExit(main())

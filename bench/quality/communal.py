"""``python -m bench.quality.communal``: every merge's evaluation as potluck evaluation records,
the merge gate over the tasks with per-item outcomes, and the PR report (issue 17).

Inputs are what ``python -m bench.quality`` leaves in ``--results`` (never trained here): the
contributors' cached fine-tunes (``finetunes/``) and each method's best merge on validation
(``merges-s<seed>/<method>.json``). In a scratch git repository (``--work``), with the real
``git`` and ``potluck`` commands a user would type:

* ``main``: the shipped all-MiniLM-L6-v2 encoder and, per task, its linear probe (the frozen
  base's head, L2 picked on validation) in ``heads.safetensors`` (tensors ``<task>.weight``,
  ``<task>.bias``: one file, so no two heads share a tensor name in the weights digest);
* ``contrib/<task>``: the contributor's fine-tuned encoder and its head in place of the probe;
* ``merge/<method>``: a merge commit of every ``contrib/*`` branch (``git merge -s ours``, then
  the merged encoder and every contributor's head committed as its result).

The test split of each task is a JSONL dataset of a suite (``suite.yaml``: every task;
``suite-<task>.yaml``: one), scored by ``load_model`` below (the bench's own embedding and
heads). ``potluck eval run`` records ``main`` and every merge on every task and each contributor
on its task; ``potluck gate contrib/<task> merge/<best>`` tests the best merge (on validation)
against the contributor's own fine-tune on its task, ``potluck gate main merge/<best>`` against
the base with probes on every task (one run), and ``potluck report main..merge/<best>
--markdown`` is the PR comment. The recorded values (read back with ``potluck eval list``) are
compared with the accuracies the bench computed itself.

``--smoke``: seconds-sized inputs made here instead (tiny splits, a few fine-tuning steps, two
merges); used by ``tests/test_quality_communal.py``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import data, finetune, model

from . import merges, stages
from .rebase import NotCached, cached_only
from .stages import log
from .workflow import Workspace

TASKS = ("fortune_topic", "fortune_lang", "fortune_topic_es", "vader_words", "tweet_sentiment")
SMOKE_TASKS = ("vader_words", "fortune_lang")
SMOKE_CAPS = (16, 4, 16)
LOADER = "bench.quality.communal:load_model"
HEADS = "heads.safetensors"
ENCODER = "encoder.safetensors"
Head = Any  # torch.nn.Linear


@dataclass
class Entry:
    """A model of the communal repository: its branch, encoder, heads and the test accuracies the
    bench computed itself (``bench``), per task."""

    branch: str
    encoder: Path
    heads: dict[str, Path]
    bench: dict[str, float] = field(default_factory=dict)
    val_mean: float | None = None


@dataclass
class Inputs:
    """Everything the repository is built from."""

    tasks: list[data.Task]
    probes: dict[str, Path]
    base: Entry
    contributors: dict[str, Entry]
    merges: dict[str, Entry]

    @property
    def best(self) -> str:
        """The merge method with the best mean validation accuracy."""
        return max(self.merges, key=lambda m: self.merges[m].val_mean or 0.0)


# -- the suite's model loader (runs inside ``potluck eval run`` / ``potluck gate``) -------------


def load_heads(path: Path) -> dict[str, Head]:
    """``heads.safetensors`` → {task: torch.nn.Linear}."""
    import torch
    from safetensors.torch import load_file

    state = load_file(str(path))
    out = {}
    for name in sorted({k.rsplit(".", 1)[0] for k in state}):
        w, b = state[f"{name}.weight"], state[f"{name}.bias"]
        head = torch.nn.Linear(w.shape[1], w.shape[0])
        head.load_state_dict({"weight": w, "bias": b})
        out[name] = head
    return out


def load_model(model_dir: str | Path) -> Callable[[list[dict[str, Any]]], list[int]]:
    """The suite's loader: ``predict(items)`` embeds the items' texts with the directory's
    encoder (``bench.common.model.embed``, as ``stages.Evaluator`` does) and applies the head of
    each item's ``task``; one predicted label per item."""
    import torch

    d = Path(model_dir)
    tok, enc = model.load_tokenizer(), model.load_encoder(d / ENCODER)
    heads = load_heads(d / HEADS)

    def predict(items: list[dict[str, Any]]) -> list[int]:
        out = np.zeros(len(items), np.int64)
        for task in sorted({str(it["task"]) for it in items}):
            if task not in heads:
                raise KeyError(f"{d}: no head for task {task!r} in {HEADS}")
            idx = [i for i, it in enumerate(items) if it["task"] == task]
            emb = model.embed(enc, tok, [items[i]["text"] for i in idx],
                              max_length=stages.MAX_LENGTH)  # fmt: skip
            with torch.inference_mode():
                out[idx] = heads[task](torch.from_numpy(emb)).argmax(-1).numpy()
        return [int(x) for x in out]

    return predict


# -- inputs ---------------------------------------------------------------------------------


def save_heads(heads: Mapping[str, Path], out: Path) -> Path:
    """One ``heads.safetensors`` from per-task head files (``weight``, ``bias`` each)."""
    from safetensors.torch import load_file, save_file

    state = {}
    for task, path in sorted(heads.items()):
        for k, v in load_file(str(path)).items():
            state[f"{task}.{k}"] = v.contiguous()
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out), metadata={"format": "pt"})
    return out


def _save_head(head: Head, path: Path) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in head.state_dict().items()}, str(path))
    return path


def probe_heads(tasks: Sequence[data.Task], seed: int, folder: Path) -> dict[str, Path]:
    """Each task's linear probe on the frozen base (``finetune.probe_head``), cached."""
    out, tok, enc = {}, None, None
    for t in tasks:
        path = folder / f"{t.name}.safetensors"
        if not path.is_file():
            if enc is None:
                tok, enc = model.load_tokenizer(), model.load_encoder()
            cfg = stages.finetune_config(t.name, seed, 0)
            _save_head(finetune.probe_head(enc, t, tok, cfg), path)
        out[t.name] = path
    return out


def _bench_scores(results: Path) -> dict[str, float]:
    """The per-task test accuracies of the fine-tunes in ``results-s<seed>.json``, if any."""
    if not results.is_file():
        return {}
    got: dict[str, float] = json.loads(results.read_text()).get("individual", {})
    return got


def full_inputs(args: argparse.Namespace) -> Inputs:
    """The bench's cached fine-tunes and best merges (never trained here)."""
    tasks = [data.load_task(n, seed=args.seed) for n in args.tasks]
    individual = _bench_scores(args.results / f"results-s{args.seed}.json")
    contributors = {}
    for t in tasks:
        run = cached_only(
            stages.finetune_config(t.name, args.seed, 200), args.results / "finetunes"
        )
        # results-s<seed>.json's "individual" (stages.Evaluator), else the run's own test_acc
        acc = individual.get(t.name, run.meta.get("test_acc"))
        bench = {} if acc is None else {t.name: float(acc)}
        contributors[t.name] = Entry(f"contrib/{t.name}", run.encoder, {t.name: run.head}, bench)
    heads = {t: c.heads[t] for t, c in contributors.items()}
    found = {}
    for method in args.methods or merges.GRID:
        path = args.results / f"merges-s{args.seed}" / f"{method}.json"
        if not path.is_file():
            continue
        best = json.loads(path.read_text())
        if "weights" in best and Path(best["weights"]).is_file():
            found[method] = Entry(f"merge/{method}", Path(best["weights"]), heads,
                                  dict(best.get("test", {})), float(best["val_mean"]))  # fmt: skip
    found.update(merge_here(args, tasks, contributors))
    if not found:
        raise NotCached(f"no merges in {args.results}/merges-s{args.seed}/; run bench.quality")
    probes = probe_heads(tasks, args.seed, args.work / "probes")
    path = args.results / f"probes-s{args.seed}.json"
    known = json.loads(path.read_text()) if path.is_file() else {}
    bench = {t: float(known[t]["test_acc"]) for t in probes if t in known}
    base = Entry("main", model.base_weights(), probes, bench)
    return Inputs(tasks, probes, base, contributors, found)


def merge_here(
    args: argparse.Namespace, tasks: Sequence[data.Task], contributors: Mapping[str, Entry]
) -> dict[str, Entry]:
    """``--merge-here`` methods (no statistics): bench.quality's grid search on validation
    (``merges.grid_search``) run here into ``--work``, the best point scored on test."""
    if not args.merge_here:
        return {}
    heads = {t: c.heads[t] for t, c in contributors.items()}
    loaded = {t: finetune.load_head(p) for t, p in heads.items()}
    val, test = stages.Evaluator(tasks, "val"), stages.Evaluator(tasks, "test")
    mc = [merges.Contributor(t, c.encoder, c.heads[t], {}) for t, c in contributors.items()]
    out = {}
    (args.work / "merges").mkdir(parents=True, exist_ok=True)
    for method in args.merge_here:
        best = merges.grid_search(method, mc, args.work / "merges", lambda w: val.scores(w, loaded),
                                  args.seed)  # fmt: skip
        w = Path(best["weights"])
        out[method] = Entry(f"merge/{method}", w, heads, test.scores(w, loaded), best["val_mean"])
    return out


def smoke_finetune(task: data.Task, seed: int, steps: int, out: Path) -> Entry:
    """A few steps of the contributors' recipe on a tiny split (bench.quality.smoke's)."""
    import torch

    torch.manual_seed(seed)
    tok, enc = model.load_tokenizer(), model.load_encoder()
    head = torch.nn.Linear(384, len(task.label_names))
    rng = np.random.default_rng(seed)
    order = [(0, rng.choice(len(task.train), size=8, replace=False)) for _ in range(steps)]
    enc.train()
    finetune.train_loop(enc, [head], list(enc.parameters()), [task], order, tok,
                        lr=1e-4, head_lr=1e-2, max_length=32)  # fmt: skip
    enc.train(False)
    out.mkdir(parents=True, exist_ok=True)
    model.save_encoder(enc.state_dict(), out / ENCODER)
    return Entry(f"contrib/{task.name}", out / ENCODER,
                 {task.name: _save_head(head, out / "head.safetensors")})  # fmt: skip


def smoke_inputs(args: argparse.Namespace) -> Inputs:
    """Seconds-sized inputs: tiny splits, ``--smoke-steps`` fine-tuning steps, two merges
    (task arithmetic λ 1, linear), the best picked on validation."""
    tasks = [data.load_task(n, seed=args.seed, caps=SMOKE_CAPS) for n in args.tasks]
    work = args.work / "inputs"
    contributors = {t.name: smoke_finetune(t, args.seed, args.smoke_steps, work / t.name)
                    for t in tasks}  # fmt: skip
    heads = {t: c.heads[t] for t, c in contributors.items()}
    loaded = {t: finetune.load_head(p) for t, p in heads.items()}
    test, val = stages.Evaluator(tasks, "test"), stages.Evaluator(tasks, "val")
    for t, c in contributors.items():
        c.bench = test.scores(c.encoder, loaded, [t])
    mc = [merges.Contributor(t, c.encoder, c.heads[t], {}) for t, c in contributors.items()]
    found = {}
    for method, top in (("task_arithmetic", {"lambda": 1.0}), ("linear", {})):
        cfg = merges.merge_config(method, top, {"weight": 1.0}, mc, args.seed)
        weights = merges.run_one(cfg, work / f"merge-{method}")
        v = val.scores(weights, loaded)
        found[method] = Entry(f"merge/{method}", weights, heads,
                              test.scores(weights, loaded), sum(v.values()) / len(v))  # fmt: skip
    probes = probe_heads(tasks, args.seed, work / "probes")
    base = Entry(
        "main",
        model.base_weights(),
        probes,
        test.scores(None, {t: finetune.load_head(p) for t, p in probes.items()}),
    )
    return Inputs(tasks, probes, base, contributors, found)


# -- suites, repository, records ----------------------------------------------------------------


def write_suites(tasks: Sequence[data.Task], folder: Path, tolerance: float, seed: int) -> None:
    """``suite.yaml`` (every task) and ``suite-<task>.yaml``: the test splits as JSONL items
    (``id``, ``task``, ``text``, ``label``); one ``predict`` call per task (batch = the split)."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for t in tasks:
        with (folder / f"{t.name}.jsonl").open("w", encoding="utf-8") as f:
            for i, (text, label) in enumerate(zip(t.test.texts, t.test.labels, strict=True)):
                row = {"id": f"{t.name}-{i}", "task": t.name, "text": text, "label": int(label)}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        entries.append({"name": t.name, "version": f"bench.quality seed {seed}",
                        "dataset": {"path": f"{t.name}.jsonl", "split": "test"},
                        "metric": "accuracy", "tolerance": tolerance,
                        "batch_size": len(t.test), "seed": seed})  # fmt: skip
    doc = {"potluck_suite": 1, "name": "bench-quality", "loader": LOADER}
    (folder / "suite.yaml").write_text(yaml.safe_dump({**doc, "tasks": entries}, sort_keys=False))
    for e in entries:
        text = yaml.safe_dump({**doc, "tasks": [e]}, sort_keys=False)
        (folder / f"suite-{e['name']}.yaml").write_text(text)


def _commit(ws: Workspace, encoder: Path, heads: Mapping[str, Path], message: str) -> str:
    shutil.copyfile(encoder, ws.root / ENCODER)
    save_heads(heads, ws.root / HEADS)
    ws.run("git", "add", ENCODER, HEADS)
    ws.run("git", "commit", "-q", "-m", message)
    return ws.head()


def build_repo(inp: Inputs, root: Path, keep_records: bool = True) -> Workspace:
    """The scratch repository (module docstring): main, contrib/*, merge/*. With
    ``keep_records``, the evaluation records of a previous repository at ``root`` are fetched
    into the new one (``refs/potluck/evals``: ``eval run`` / ``gate`` find them cached for the
    same weights and suite digests)."""
    old = root.with_name(root.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if root.exists():
        root.rename(old)
    root.mkdir(parents=True)
    ws = Workspace(root)
    ws.env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])  # the suite's loader
    ws.env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # bench.common.env.cpu_threads' settings
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        ws.env[var] = "2"
    ws.run("git", "init", "-q", "-b", "main")
    ws.run("potluck", "init")
    ws.run("potluck", "track", "*.safetensors")
    ws.run("git", "add", ".gitattributes")
    _commit(ws, inp.base.encoder, inp.probes, "base: all-MiniLM-L6-v2 + linear probes")
    for t, c in inp.contributors.items():
        ws.run("git", "switch", "-q", "-c", c.branch, "main")
        _commit(ws, c.encoder, {**inp.probes, **c.heads}, f"fine-tune on {t}")
    branches = [c.branch for c in inp.contributors.values()]
    for method, m in inp.merges.items():
        ws.run("git", "switch", "-q", "-c", m.branch, "main")
        ws.run("git", "merge", "-q", "-s", "ours", "--no-commit", *branches)
        _commit(
            ws,
            m.encoder,
            {**inp.probes, **m.heads},
            f"merge: {method} of {', '.join(branches)} (best grid point on validation)",
        )
    ws.run("git", "switch", "-q", "main")
    if old.exists():
        if keep_records and ws.run("git", "-C", str(old), "rev-parse", "-q", "--verify",
                                   "refs/potluck/evals", check=False).strip():  # fmt: skip
            ws.run("git", "fetch", "-q", str(old), "+refs/potluck/evals:refs/potluck/evals")
        shutil.rmtree(old)
    return ws


def potluck_json(ws: Workspace, *args: str, ok: Sequence[int] = (0,)) -> Any:
    """``potluck ARGS --json`` in the repository; its parsed output (exit code in ``ok``)."""
    import subprocess

    cmd = ["potluck", *args, "--json"]
    r = subprocess.run(cmd, cwd=ws.root, env=ws.env, capture_output=True, text=True)
    if r.returncode not in ok:
        raise RuntimeError(f"{' '.join(cmd)}: exit {r.returncode}\n{r.stdout}\n{r.stderr}")
    return json.loads(r.stdout)


def recorded(ws: Workspace, rev: str) -> dict[str, dict[str, Any]]:
    """The score records stored for ``rev``'s weights (``potluck eval list``), by task."""
    got = potluck_json(ws, "eval", "list", rev)
    return {r["suite"]["task"]: r for r in got["records"] if r["kind"] == "score"}


def evaluate_all(ws: Workspace, inp: Inputs, suites: Path) -> dict[str, float]:
    """``potluck eval run``: main and every merge on every task, each contributor on its own;
    the seconds of each command."""
    times = {}
    runs = [("main", suites / "suite.yaml")]
    runs += [(c.branch, suites / f"suite-{t}.yaml") for t, c in inp.contributors.items()]
    runs += [(m.branch, suites / "suite.yaml") for m in inp.merges.values()]
    for rev, suite in runs:
        t0 = time.perf_counter()
        got = potluck_json(ws, "eval", "run", str(suite), rev)
        times[rev] = round(time.perf_counter() - t0, 1)
        hits = sum(bool(r["cached"]) for r in got)
        log(f"  potluck eval run {suite.name} {rev}: {times[rev]} s ({hits}/{len(got)} cached)")
    return times


def gates(ws: Workspace, inp: Inputs, suites: Path) -> dict[str, Any]:
    """``potluck gate``: the best merge against each contributor on its task, and against
    main on every task (one run)."""
    best = inp.merges[inp.best].branch
    out: dict[str, Any] = {}
    for t, c in inp.contributors.items():
        suite = str(suites / f"suite-{t}.yaml")
        out[t] = potluck_json(ws, "gate", c.branch, best, "--suite", suite, ok=(0, 1, 3))
    out["main"] = potluck_json(ws, "gate", "main", best, "--suite", str(suites / "suite.yaml"),
                               ok=(0, 1, 3))  # fmt: skip
    return out


# -- the run ----------------------------------------------------------------------------------


def _gate_cells(task: Mapping[str, Any]) -> str:
    t = task.get("test")
    if not t:
        return f"{task['verdict']} | – | – | – ({task.get('reason')})"
    return (f"{task['verdict']} | {t['mean_diff']:+.4f} | [{t['lo']:+.4f}, {t['hi']:+.4f}] | "
            f"{t['mde']:.4f}")  # fmt: skip


def tables(res: Mapping[str, Any]) -> str:
    """The gate table (per task) and the records table (every model), markdown."""
    best, rec = res["best"], res["recorded"]
    lines = [
        f"Gate of merge/{best} (best on validation); tolerance {res['tolerance']}, "
        f"interval = two-sided {1 - 2 * 0.05:.0%}, MDE = minimum detectable effect",
        "",
        "| task | n | base+probe | fine-tune | merge | vs fine-tune: verdict | Δ | interval | MDE"
        " | vs base: verdict | Δ | interval | MDE |",
        "|---|---:|---:|---:|---:|---|---:|---|---:|---|---:|---|---:|",
    ]
    main_gate = {t["task"]: t for t in res["gates"]["main"]["tasks"]}
    for task in res["tasks"]:
        g = res["gates"][task]["tasks"][0]
        m = rec[f"merge/{best}"][task]
        lines.append(
            f"| {task} | {m['n']} | {rec['main'][task]['value']:.4f} | "
            f"{rec[f'contrib/{task}'][task]['value']:.4f} | {m['value']:.4f} | "
            f"{_gate_cells(g)} | {_gate_cells(main_gate[task])} |"
        )
    lines += ["", "Every model's records (potluck eval list) vs the bench's own test accuracy", "",
              "| model | val mean | recorded mean | bench mean | tasks equal | items |",
              "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for branch, per in rec.items():
        bench = res["bench"].get(branch, {})
        same = sum(abs(per[t]["value"] - bench[t]) < 1e-12 for t in per if t in bench)
        vals = [r["value"] for r in per.values()]
        bmean = f"{np.mean(list(bench.values())):.4f}" if bench else "–"
        val = res["val_mean"].get(branch)
        lines.append(
            f"| {branch} | {'–' if val is None else f'{val:.4f}'} | {np.mean(vals):.4f} | {bmean} "
            f"| {same}/{len(bench) if bench else 0} | {sum(r['n'] for r in per.values())} |"
        )
    return "\n".join(lines)


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.quality.communal",
                                description=__doc__.split("\n")[0])  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tasks", nargs="+", default=None, choices=sorted(data.TASKS))
    p.add_argument("--tolerance", type=float, default=0.02, help="the gate's margin per task")
    p.add_argument("--results", type=Path, default=stages.RESULTS, help="bench.quality's output")
    p.add_argument("--work", type=Path, default=Path("/tmp/bench-quality-communal"))
    p.add_argument("--out", type=Path, help="results JSON (default RESULTS/communal-s<seed>.json)")
    p.add_argument("--methods", nargs="+", choices=sorted(merges.GRID),
                   help="merges to record (default: every method bench.quality left)")  # fmt: skip
    p.add_argument("--merge-here", nargs="+", default=[],
                   choices=sorted(set(merges.GRID) - set(merges.STATS_KIND)),
                   help="also merge with these methods here (grid on validation), e.g. when "
                        "bench.quality has not left them")  # fmt: skip
    p.add_argument(
        "--fresh",
        action="store_true",
        help="do not carry the previous run's records over (every model re-run)",
    )
    p.add_argument("--smoke", action="store_true", help="seconds-sized inputs made here")
    p.add_argument("--smoke-steps", type=int, default=3)
    args = p.parse_args(argv)
    if args.tasks is None:
        args.tasks = list(SMOKE_TASKS if args.smoke else TASKS)
    if args.tolerance < 0:
        p.error("--tolerance must be >= 0")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build the repository, record, gate, report; the results (also written as JSON)."""
    import torch

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    inp = smoke_inputs(args) if args.smoke else full_inputs(args)
    suites = args.work / "suite"
    write_suites(inp.tasks, suites, args.tolerance, args.seed)
    t1 = time.perf_counter()
    ws = build_repo(inp, args.work / "repo", keep_records=not args.fresh)
    t2 = time.perf_counter()
    eval_s = evaluate_all(ws, inp, suites)
    t3 = time.perf_counter()
    gate = gates(ws, inp, suites)
    t4 = time.perf_counter()
    best = inp.merges[inp.best].branch
    report = ws.run("potluck", "report", f"main..{best}", "--markdown")
    entries = {"main": inp.base, **{c.branch: c for c in inp.contributors.values()},
               **{m.branch: m for m in inp.merges.values()}}  # fmt: skip
    res: dict[str, Any] = {
        "seed": args.seed, "tasks": [t.name for t in inp.tasks], "tolerance": args.tolerance,
        "smoke": args.smoke, "best": inp.best, "repo": str(ws.root),
        "weights": {b: str(e.encoder) for b, e in entries.items()},
        "heads": {b: {t: str(p) for t, p in e.heads.items()} for b, e in entries.items()},
        "probes": {t: str(p) for t, p in inp.probes.items()},
        "recorded": {rev: recorded(ws, rev) for rev in entries},
        "bench": {b: e.bench for b, e in entries.items()},
        "val_mean": {b: e.val_mean for b, e in entries.items() if e.val_mean is not None},
        "gates": gate, "report": report,
        "times_s": {"inputs": round(t1 - t0, 1), "repository": round(t2 - t1, 1),
                    "eval_run": eval_s, "gates": round(t4 - t3, 1),
                    "total": round(time.perf_counter() - t0, 1)},
    }  # fmt: skip
    out = args.out or args.results / f"communal-s{args.seed}.json"
    merges.save_json(out, res)
    return res


def main(argv: list[str] | None = None) -> int:
    """Run; print the tables and the report. Exit 2 when the bench's inputs are missing."""
    args = _args(argv)
    try:
        res = run(args)
    except NotCached as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(tables(res))
    print()
    print(res["report"])
    return 0


if __name__ == "__main__":
    model.cpu_threads(2)
    raise SystemExit(main())

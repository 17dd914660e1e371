"""``python -m bench.quality``: the whole pipeline, stage by stage, with wall times.

Stages: fine-tunes (cached) → linear probes → contributors' statistics → merges with every
method (grid on validation, best point scored on test) → the communal git repository (branches,
``git merge`` through the driver, merge commits, evaluation notes) → patches → table.
Results: ``bench/results/quality/results-s<seed>.json`` and the markdown table on stdout.
``--no-git`` / ``--no-patches`` skip those stages (seeds 1 and 2); ``--lora`` uses LoRA
contributors (``finetune.lora_recipe``) and writes ``results-lora-s<seed>.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import data, finetune, model

from . import merges, patches, report, stages, taskparts, workflow
from .stages import RESULTS, Stopwatch, log

TASKS = ("fortune_topic", "fortune_lang", "fortune_topic_es", "vader_words", "tweet_sentiment")
METHODS = tuple(merges.GRID)
GIT_MERGE_TASKS = ("fortune_topic", "fortune_topic_es")


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n")[0])
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=sorted(data.TASKS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=200, help="fine-tune steps (batch 8)")
    p.add_argument("--fisher-n", type=int, default=64, help="examples for each Fisher")
    p.add_argument("--gram-n", type=int, default=256, help="examples for each Gram")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--no-patches", action="store_true")
    p.add_argument("--no-git", action="store_true", help="skip the git-workflow stage")
    p.add_argument(
        "--no-task-parts",
        action="store_true",
        help="skip tall_masks / emr (merged model + per-task masks, rebuilt tasks)",
    )
    p.add_argument(
        "--recipe",
        choices=sorted(stages.RECIPES),
        default="base",
        help="fine-tuning recipe (stages.RECIPES); lpft: results-lpft-s<seed>.json",
    )
    p.add_argument("--lora", action="store_true",
                   help="LoRA contributors (finetune.lora_recipe) instead of full fine-tunes; "
                        "results-lora-s<seed>.json, merges in merges-lora-s<seed>/")  # fmt: skip
    p.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch threads and merge workers (fine-tunes keep their own setting)",
    )
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args(argv)


def _tag(args: argparse.Namespace) -> str:
    """``s<seed>`` for full fine-tunes, ``lora-s<seed>`` for LoRA contributors,
    ``<recipe>-s<seed>`` for another fine-tuning recipe."""
    if args.lora:
        return f"lora-s{args.seed}"
    return f"s{args.seed}" if args.recipe == "base" else f"{args.recipe}-s{args.seed}"


def _contributors(
    args: argparse.Namespace, tasks: list[data.Task], clock: Stopwatch
) -> tuple[list[merges.Contributor], dict[str, finetune.Finetuned]]:
    t0 = time.perf_counter()
    runs = {}
    for t in reversed(tasks):  # bench/common trains in forward order: share its cache
        cfg = finetune.lora_recipe(t.name, args.seed) if args.lora \
            else stages.finetune_config(t.name, args.seed, args.steps, args.recipe)  # fmt: skip
        runs[t.name] = stages.cached_finetune(cfg, args.out / "finetunes")
    clock.stage("fine-tunes", t0)
    t0 = time.perf_counter()
    contributors = []
    need = not args.no_git or any(m in merges.STATS_KIND for m in args.methods)  # their readers
    for t in tasks:
        run = runs[t.name]
        folder = args.out / "stats" / f"{run.folder.name}-f{args.fisher_n}-g{args.gram_n}"
        st = stages.contributor_stats(run, t, folder, args.fisher_n, args.gram_n) if need else {}
        contributors.append(merges.Contributor(t.name, run.encoder, run.head, st))
    if need:
        clock.stage("statistics (Fisher + Gram per contributor)", t0)
    return contributors, runs


def _merges(
    args: argparse.Namespace,
    contributors: list[merges.Contributor],
    val: stages.Evaluator,
    test: stages.Evaluator,
    heads: dict[str, Any],
    clock: Stopwatch,
) -> dict[str, dict[str, Any]]:
    out = {}
    work = args.out / f"merges-{_tag(args)}"
    for method in args.methods:
        t0 = time.perf_counter()
        cache = work / f"{method}.json"
        if cache.is_file() and Path(json.loads(cache.read_text())["weights"]).is_file():
            out[method] = json.loads(cache.read_text())
            continue
        best = merges.grid_search(
            method, contributors, work, lambda w: val.scores(w, heads), args.seed
        )
        best["test"] = test.scores(Path(best["weights"]), heads)
        merges.save_json(cache, best)
        out[method] = best
        log(f"  {method}: test {best['test']}")
        clock.stage(f"merge {method} ({len(merges.GRID[method])} grid points)", t0)
    return out


def _git_workflow(
    args: argparse.Namespace,
    contributors: list[merges.Contributor],
    runs: dict[str, finetune.Finetuned],
    results: dict[str, Any],
    test: stages.Evaluator,
    heads: dict[str, Any],
) -> dict[str, Any]:
    """Branches, notes, the git merge and the merge commits; what was recorded where."""
    ties = results["merges"].get("ties")
    top, per = (ties["config"]["parameters"], ties["config"]["models"][0]["parameters"]) if ties \
        else ({"lambda": 1.0}, {"density": 0.2})  # fmt: skip
    params = {"lambda_": top.get("lambda", 1.0), "density": per.get("density", 0.2)}
    ws = workflow.init_repo(args.out / "repo", model.base_weights(),
                            workflow.merge_rules("ties", params, args.seed))  # fmt: skip
    commits: dict[str, Any] = {"params": params}
    for c in contributors:
        acc = results["individual"][c.task]
        commit = workflow.contribute(
            ws,
            c.task,
            c.encoder,
            c.head,
            c.stats,
            f"bench.quality fine-tune key {runs[c.task].folder.name}",
        )
        workflow.record(ws, commit, {c.task: {"accuracy": acc}})
        commits[f"contrib/{c.task}"] = commit
    pair = [c for c in contributors if c.task in GIT_MERGE_TASKS] or contributors[:2]
    merged = workflow.git_merge(ws, [c.task for c in pair])
    got = workflow.checkout_file(
        ws, merged, "encoder.safetensors", args.out / "gitmerge.safetensors"
    )
    names = [c.task for c in pair]
    scores = test.scores(got, heads, names)
    workflow.record(ws, merged, {n: {"accuracy": scores[n]} for n in names})
    ref_cfg = merges.merge_config(
        "ties",
        {"lambda": params["lambda_"]},
        {"weight": 1.0, "density": params["density"]},
        pair,
        args.seed,
    )
    ref = merges.run_one(ref_cfg, args.out / "gitmerge-reference")
    commits["gitmerge"] = {
        "commit": merged,
        "tasks": names,
        "test": scores,
        "max_abs_diff_vs_potluck_merge": report.max_abs_diff(got, ref),
    }
    for method, best in results["merges"].items():
        if "weights" not in best:  # task-part rows: no single merged model to commit
            continue
        msg = f"potluck merge config (best on validation): {best['config']}"
        commit = workflow.commit_merge(ws, method, Path(best["weights"]), msg)
        workflow.record(ws, commit, {t: {"accuracy": a} for t, a in best["test"].items()})
        commits[f"merge/{method}"] = commit
    commits["eval_show_gitmerge"] = workflow.eval_show(ws, merged)
    log(commits["eval_show_gitmerge"])
    return commits


def _task_parts(
    args: argparse.Namespace,
    contributors: list[merges.Contributor],
    val: stages.Evaluator,
    test: stages.Evaluator,
    heads: dict[str, Any],
) -> dict[str, dict[str, Any]]:
    """tall_masks / emr rows (``taskparts``): each task rebuilt from its mask patch."""

    def on(ev: stages.Evaluator) -> Callable[[Path, str], float]:
        return lambda weights, task: ev.scores(weights, heads, [task])[task]

    work = args.out / f"taskparts-{_tag(args)}"
    rows = taskparts.run(contributors, work, on(val), on(test), args.seed)
    return {f"{m} + task masks": row for m, row in rows.items()}


def _scorer(test: stages.Evaluator, heads: dict[str, Any], task: str) -> Callable[[Path], float]:
    def score(weights: Path) -> float:
        return test.scores(weights, heads, [task])[task]

    return score


def _keep_previous(path: Path, results: dict[str, Any]) -> None:
    """A rerun that skipped the git workflow or the patches keeps those sections of the
    previous results file, and the previous runs' stage times (``earlier_times_s``)."""
    if not path.is_file():
        return
    old = json.loads(path.read_text())
    for key in ("git", "patches"):
        if key not in results and key in old:
            results[key] = old[key]
    results["earlier_times_s"] = [*old.get("earlier_times_s", []), old.get("times_s", {})]


def main(argv: list[str] | None = None) -> int:
    """Run every stage; print the table; write the results JSON."""
    args = _args(argv)
    import torch

    torch.set_num_threads(args.threads)
    merges.WORKERS = args.threads
    clock = Stopwatch({})
    start = time.perf_counter()
    t0 = time.perf_counter()
    tasks = [data.load_task(n, seed=args.seed) for n in args.tasks]
    for t in tasks:
        log(t.summary())
    clock.stage("data", t0)
    contributors, runs = _contributors(args, tasks, clock)
    t0 = time.perf_counter()
    probe = stages.probes(tasks, args.seed, args.out)
    clock.stage("linear probes", t0)
    heads = {c.task: finetune.load_head(c.head) for c in contributors}
    val, test = stages.Evaluator(tasks, "val"), stages.Evaluator(tasks, "test")
    t0 = time.perf_counter()
    individual = {c.task: test.scores(c.encoder, heads, [c.task])[c.task] for c in contributors}
    clock.stage("individual fine-tunes on test", t0)
    results: dict[str, Any] = {"tasks": [t.summary() for t in tasks], "probe": probe,
                               "individual": individual}  # fmt: skip
    results["merges"] = _merges(args, contributors, val, test, heads, clock)
    if not args.no_task_parts:
        t0 = time.perf_counter()
        results["merges"].update(_task_parts(args, contributors, val, test, heads))
        clock.stage("task parts (tall_masks, emr: merge, rebuild each task)", t0)
    if not args.no_git:
        t0 = time.perf_counter()
        results["git"] = _git_workflow(args, contributors, runs, results, test, heads)
        clock.stage("git workflow (branches, git merge, notes)", t0)
    if not args.no_patches:
        t0 = time.perf_counter()
        results["patches"] = {}
        for c in contributors:
            log(f"  patches {c.task}")
            results["patches"][c.task] = patches.patch_rows(
                model.base_weights(), c.encoder, args.out / "patches",
                _scorer(test, heads, c.task), args.seed,
            )  # fmt: skip
        clock.stage("patches", t0)
    clock.stage("total", start)
    results["times_s"] = clock.times
    results["machine"] = {"platform": platform.platform(), "threads": args.threads,
                          "torch": torch.__version__}  # fmt: skip
    results["variant"] = "lora" if args.lora else "full"
    results["recipe"] = "lora" if args.lora else args.recipe
    path = args.out / f"results-{_tag(args)}.json"
    _keep_previous(path, results)
    merges.save_json(path, results)
    print(report.markdown(results))
    return 0

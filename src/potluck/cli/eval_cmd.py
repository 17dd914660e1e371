"""``potluck eval record|show``: evaluation results on commits (git notes, see git/evalrec)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from potluck.cli.main import cli, handle_errors
from potluck.cli.render import echo, emit_json
from potluck.errors import UserError
from potluck.git import evalrec
from potluck.git.repo import Repo


@cli.group("eval")
def eval_group() -> None:
    """Record evaluation results on commits and show them (refs/notes/potluck-evals)."""


def _from_file(path: str, task: str | None) -> dict[str, Any]:
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read JSON: {e}", hint="a JSON object", path=path) from e
    if task is not None:
        return {task: doc}
    if not isinstance(doc, dict):
        raise UserError(f"{path}: expected a JSON object", hint="{task: {metric: number}}")
    return doc


@eval_group.command("record")
@click.argument("rev", default="HEAD")
@click.option("--task", help="Task the metrics are about (required with --metric).")
@click.option("--metric", "metrics", multiple=True, help="NAME=VALUE (repeatable).")
@click.option(
    "--json-file",
    type=click.Path(exists=True, dir_okay=False),
    help="JSON {metric: number} (with --task) or {task: {metric: number}}.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the commit's record as JSON.")
@handle_errors
def record(
    rev: str, task: str | None, metrics: tuple[str, ...], json_file: str | None, as_json: bool
) -> None:
    """Record metrics for REV (default HEAD), merged with what REV already holds."""
    results: dict[str, Any] = {}
    if json_file is not None:
        results = _from_file(json_file, task)
    if metrics:
        if task is None:
            raise UserError("--metric needs --task", hint="e.g. --task sst2 --metric accuracy=0.9")
        parsed = dict(evalrec.parse_metric(m) for m in metrics)
        results = evalrec.merge_results(evalrec.validate_results(results), {task: parsed})
    commit, merged = evalrec.record_evals(Repo(".").git, rev, results)
    if as_json:
        emit_json({"commit": commit, "results": merged})
    else:
        n = sum(len(m) for m in evalrec.validate_results(results).values())
        echo(f"{commit[:10]}: recorded {n} metric(s); {len(merged)} task(s) on record")


def _fmt(c: evalrec.Comparison) -> str:
    line = f"  {c.task:<24} {c.metric:<12} {c.value:.4f}"
    if c.delta is not None:
        worse = c.delta > 0 if "loss" in c.metric else c.delta < 0
        mark = "  REGRESSION" if worse else ""
        line += f"   parents' best {c.parent_best:.4f} ({c.delta:+.4f}){mark}"
    return line


@eval_group.command("show")
@click.argument("revs", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")
@handle_errors
def show(revs: tuple[str, ...], as_json: bool) -> None:
    """Results recorded on REVS (default HEAD), each next to its parents' best value."""
    git = Repo(".").git
    rows = []
    for rev in revs or ("HEAD",):
        commit = git.rev_parse(f"{rev}^{{commit}}") or rev
        comps = evalrec.compare_parents(git, rev)
        rows.append({"rev": rev, "commit": commit, "results": [c.to_dict() for c in comps]})
        if not as_json:
            echo(f"{commit[:10]} ({rev})" + ("" if comps else ": no results recorded"))
            for c in comps:
                echo(_fmt(c))
    if as_json:
        emit_json(rows)

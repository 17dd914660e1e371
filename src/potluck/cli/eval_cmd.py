"""``potluck eval``: point values on commits (``record|show``, git notes) and evaluation records
tied to exact weights (``run|import|list|export|push|pull``, refs/potluck/evals)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from potluck.cli.main import cli, handle_errors
from potluck.cli.render import echo, emit_json, safe_field
from potluck.errors import UserError
from potluck.git import evalgate, evalrec, evalstore, evalsync
from potluck.git.repo import Repo
from potluck.ops.evals import hfexport, lmeval
from potluck.ops.evals.records import EvalRecord, record_from_dict
from potluck.ops.evals.suite import load_suite


def _records_repo() -> Repo:
    """This repository, with the records fetched from its remotes merged in (a union)."""
    repo = Repo(".")
    evalstore.absorb(repo)
    return repo


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


# -- evaluation records tied to exact weights (refs/potluck/evals, docs/evaluations.md) ---------


def _record_line(rec: EvalRecord) -> str:
    se = "" if rec.stderr is None else f" ± {rec.stderr:.4f}"
    oc = "outcomes" if rec.outcomes else "no per-item outcomes"
    extra = f" gate {rec.gate.get('verdict')}" if rec.gate else ""
    return (
        f"  {safe_field(rec.task):<20} {rec.kind:<5} {safe_field(rec.metric):<10} "
        f"{rec.value:.4f}{se}  n={rec.n}  {rec.trust}, {oc}{extra}  "
        f"suite {rec.suite_digest[:12]}"
    )


@eval_group.command("run")
@click.argument("suite_file", metavar="SUITE", type=click.Path(exists=True, dir_okay=False))
@click.argument("model", metavar="[REV|DIR]", default="HEAD")
@click.option("--path", "paths", multiple=True, help="Only checkpoints under PATH (with REV).")
@click.option("--device", default="cpu", show_default=True, help="Recorded with the results.")
@click.option("--force", is_flag=True, help="Run again even when a record is cached.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")
@handle_errors
def run(
    suite_file: str, model: str, paths: tuple[str, ...], device: str, force: bool, as_json: bool
) -> None:
    """Evaluate REV (default HEAD) or a model DIR on SUITE and record the results."""
    repo = _records_repo()
    m = evalgate.resolve_model(repo, model, paths)
    done = evalgate.evaluate(repo, load_suite(suite_file), m, device=device, force=force)
    if as_json:
        rows = [(t.name, hit, None if r is None else {**r.to_dict(), "id": r.id})
                for t, r, _, hit in done]  # fmt: skip
        emit_json([{"task": n, "cached": hit, "record": rec} for n, hit, rec in rows])
        return
    echo(f"{safe_field(model)}: weights {m.weights[:12]}")
    for t, rec, _, hit in done:
        if rec is None:
            echo(f"  {safe_field(t.name):<20} external task: no record for these weights")
        else:
            echo(_record_line(rec) + ("  (cached)" if hit else ""))


@eval_group.command("import")
@click.argument("results", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--samples",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    help="samples_<task>_*.jsonl of the same run (repeatable): per-item outcomes.",
)
@click.option("--rev", help="The revision whose weights were evaluated.")
@click.option("--model", "model_dir", help="The model directory that was evaluated.")
@click.option("--weights", help="The weights digest, checked against --rev/--model if given.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")
@handle_errors
def import_(
    results: str,
    samples: tuple[str, ...],
    rev: str | None,
    model_dir: str | None,
    weights: str | None,
    as_json: bool,
) -> None:
    """Record lm-evaluation-harness RESULTS (results_*.json) for exact weights."""
    repo = _records_repo()
    if (rev is None) == (model_dir is None):
        raise UserError("give exactly one of --rev and --model", hint="which weights were run")
    spec = rev if rev is not None else model_dir
    assert spec is not None
    actual = evalgate.resolve_model(repo, spec).weights
    if weights is not None and weights != actual:
        raise UserError(
            f"--weights {weights[:12]} is not the digest of {spec} ({actual[:12]})",
            hint="record results of the exact weights that were evaluated",
        )
    pairs = lmeval.import_results(results, samples, actual)
    evalstore.store_records(repo, [r for r, _ in pairs], [o for _, o in pairs if o is not None])
    if as_json:
        emit_json([{**r.to_dict(), "id": r.id} for r, _ in pairs])
        return
    echo(f"{safe_field(spec)}: weights {actual[:12]}: {len(pairs)} record(s) imported")
    for rec, _ in pairs:
        echo(_record_line(rec))


@eval_group.command("add")
@click.argument("record_file", metavar="RECORD.json", type=click.Path(exists=True, dir_okay=False))
@click.argument("model", metavar="[REV|DIR]", default="HEAD")
@handle_errors
def add(record_file: str, model: str) -> None:
    """Add records written elsewhere (a JSON record or list of them, schema potluck_eval 1) for
    the weights of REV (default HEAD) or DIR; refused unless they name exactly those weights."""
    repo = _records_repo()
    m = evalgate.resolve_model(repo, model)
    recs = _records_file(record_file)
    for rec in recs:
        evalstore.check_record_weights(rec, m.weights, model)
        if rec.trust == "verified" or rec.outcomes is not None:
            raise UserError(
                f"{record_file}: a record added from a file is 'community' and has no outcomes",
                hint="potluck eval run writes verified records; import lm-eval with --samples",
            )
    evalstore.store_records(repo, recs)
    echo(f"{safe_field(model)}: weights {m.weights[:12]}: {len(recs)} record(s) added")


def _records_file(path: str) -> list[EvalRecord]:
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(
            f"{path}: cannot read JSON: {e}", hint="a record or a list", path=path
        ) from e
    docs = doc if isinstance(doc, list) else [doc]
    out = []
    for i, d in enumerate(docs):
        try:
            out.append(record_from_dict(d))
        except UserError as e:
            raise UserError(f"{path}: record {i}: {e.message}", hint=e.hint) from e
    return out


@eval_group.command("list")
@click.argument("model", metavar="[REV|DIR]", default="HEAD")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")
@handle_errors
def list_(model: str, as_json: bool) -> None:
    """The records stored for the exact weights of REV (default HEAD) or DIR."""
    repo = _records_repo()
    m = evalgate.resolve_model(repo, model)
    recs = evalstore.records_for(repo, m.weights)
    if as_json:
        emit_json({"weights": m.weights, "records": [{**r.to_dict(), "id": r.id} for r in recs]})
        return
    echo(f"{safe_field(model)}: weights {m.weights[:12]}" + ("" if recs else ": no records"))
    for rec in recs:
        echo(_record_line(rec))


@eval_group.command("export")
@click.argument("model", metavar="[REV|DIR]", default="HEAD")
@click.option("--hf", "hf", is_flag=True, required=True, help="Hugging Face Hub metadata.")
@click.option("-o", "--output", default=".", show_default=True, help="Directory to write to.")
@click.option("--name", help="Model name in model-index (default: the directory's name).")
@handle_errors
def export(model: str, hf: bool, output: str, name: str | None) -> None:
    """Write REV's records as .eval_results/*.yaml and model-index.yaml under --output."""
    repo = _records_repo()
    m = evalgate.resolve_model(repo, model)
    recs = evalstore.records_for(repo, m.weights)
    if not recs:
        raise UserError(f"no records for {model} (weights {m.weights[:12]})",
                        hint="run `potluck eval run SUITE` first")  # fmt: skip
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    for path in hfexport.write_hf(out, name or repo.root.name, recs):
        echo(f"wrote {safe_field(path)}")


@eval_group.command("push")
@click.argument("remote", default="origin")
@handle_errors
def push(remote: str) -> None:
    """Push the records (refs/potluck/evals) to REMOTE, merging its records first."""
    echo(evalsync.push_records(Repo("."), remote))


@eval_group.command("pull")
@click.argument("remote", default="origin")
@handle_errors
def pull(remote: str) -> None:
    """Fetch REMOTE's records and merge them into ours (a union: records never conflict)."""
    echo(evalstore.pull_records(Repo("."), remote))

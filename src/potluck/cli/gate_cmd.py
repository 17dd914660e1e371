"""``potluck gate|report|promote``: the merge gate on exact weights, PR reports, alias refs
(docs/evaluations.md)."""

from __future__ import annotations

import sys

import click

from potluck.cli.main import cli, handle_errors
from potluck.cli.render import echo, emit_json, safe_field
from potluck.git import evalgate, evalreport, evalstore
from potluck.git.repo import Repo
from potluck.ops.evals.gate import GateResult, TaskVerdict, summary
from potluck.ops.evals.report import to_markdown
from potluck.ops.evals.suite import load_suite


def _records_repo() -> Repo:
    """This repository, with the records fetched from its remotes merged in (a union)."""
    repo = Repo(".")
    evalstore.absorb(repo)
    return repo


def _verdict_line(v: TaskVerdict) -> str:
    head = f"  {safe_field(v.task):<20} {v.verdict.upper():<13}"
    if v.test is None:
        return head + f" {safe_field(v.reason or '')}"
    t = v.test
    return (
        head + f" Δ {t.mean_diff:+.4f}  interval [{t.lo:+.4f}, {t.hi:+.4f}]  "
        f"tolerance {v.tolerance:g}  min detectable effect {t.mde:.4f}  n={t.n} ({t.method})"
    )


def _render(result: GateResult) -> None:
    echo(f"gate {safe_field(result.base)} → {safe_field(result.candidate)}")
    for v in result.tasks:
        echo(_verdict_line(v))
    echo(f"verdict: {result.verdict} (exit {result.exit_code})")


@cli.command("gate")
@click.argument("base")
@click.argument("candidate")
@click.option("--suite", "suites", multiple=True, required=True, help="Suite file (repeatable).")
@click.option("--tolerance", type=float, help="Margin for every task (else the suite's).")
@click.option("--alpha", type=float, default=0.05, show_default=True, help="One-sided level.")
@click.option("--device", default="cpu", show_default=True, help="Recorded with the results.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")
@handle_errors
def gate(
    base: str,
    candidate: str,
    suites: tuple[str, ...],
    tolerance: float | None,
    alpha: float,
    device: str,
    as_json: bool,
) -> None:
    """Is CANDIDATE no worse than BASE on every task? Exit 0 pass, 1 fail, 3 inconclusive.

    BASE and CANDIDATE are revisions or model directories; each is evaluated on its own weights
    (cached by weights and suite digest) and the verdicts are recorded.
    """
    if (tolerance is not None and tolerance < 0) or not 0 < alpha < 0.5:
        raise click.BadParameter("--tolerance must be >= 0 and --alpha in (0, 0.5)")
    repo = _records_repo()
    loaded = [load_suite(s) for s in suites]
    b = evalgate.resolve_model(repo, base)
    c = evalgate.resolve_model(repo, candidate)
    result = evalgate.gate(repo, b, c, loaded, tolerance=tolerance, alpha=alpha, device=device)
    if as_json:
        emit_json(summary(result))
    else:
        _render(result)
    sys.exit(result.exit_code)


@cli.command("report")
@click.argument("revs", metavar="BASE..HEAD")
@click.option("--markdown", "as_md", is_flag=True, help="Markdown for a PR comment.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")
@handle_errors
def report(revs: str, as_md: bool, as_json: bool) -> None:
    """Tensor changes, lineage and evaluation deltas (with gate verdicts) of BASE..HEAD."""
    r = evalreport.build_report(_records_repo(), revs)
    if as_json:
        emit_json(r.to_dict())
    else:
        echo(to_markdown(r).rstrip("\n"))  # markdown escapes its fields; echo the rest


@cli.command("promote")
@click.argument("rev")
@click.option("--as", "name", required=True, help="Alias: refs/potluck/aliases/NAME.")
@click.option("--suite", "suites", multiple=True, help="Require a pass on every task of SUITE.")
@handle_errors
def promote(rev: str, name: str, suites: tuple[str, ...]) -> None:
    """Point refs/potluck/aliases/NAME at REV, only if REV's exact weights passed the gate."""
    ref, commit = evalgate.promote(_records_repo(), rev, name, [load_suite(s) for s in suites])
    echo(f"{ref} -> {commit[:10]}")

"""Use cases over evaluation records in a repository: evaluate a revision or directory (cached
by weights digest and suite digest), the merge gate, and promotion of an alias ref.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from potluck.errors import UserError
from potluck.git.evalstore import digest_at, read_outcomes, records_for, store_records
from potluck.git.repo import Repo
from potluck.ops.evals.gate import (
    GateResult,
    TaskVerdict,
    compare_task,
    gate_record,
    missing_record,
    passing_gates,
    pick,
)
from potluck.ops.evals.records import EvalRecord, Outcomes
from potluck.ops.evals.run import run_suite
from potluck.ops.evals.suite import Suite, Task
from potluck.ops.lineage import weights_digest_of

ALIAS_PREFIX = "refs/potluck/aliases/"


@dataclass(frozen=True)
class Model:
    """A model to evaluate: a revision of the repository or a directory/file on disk."""

    spec: str
    weights: str
    commit: str | None
    path: Path | None


def resolve_model(repo: Repo, spec: str, paths: Sequence[str] = ()) -> Model:
    """``spec`` as a directory/file on disk if it exists, else as a revision (its weights
    digest from the stored manifests, nothing checked out)."""
    p = Path(spec)
    if p.exists():
        return Model(spec, weights_digest_of(p), None, p)
    commit = repo.git.rev_parse(f"{spec}^{{commit}}")
    if commit is None:
        raise UserError(
            f"{spec!r} is neither a path nor a revision",
            hint="give a model directory, a checkpoint file, a branch, tag or commit",
        )
    return Model(spec, digest_at(repo, commit, paths), commit, None)


@contextmanager
def checked_out(repo: Repo, model: Model) -> Iterator[Path]:
    """The model's files on disk: its path, or a temporary worktree of its commit."""
    if model.path is not None:
        yield model.path
        return
    assert model.commit is not None
    with tempfile.TemporaryDirectory(dir=repo.tmp_dir) as tmp:
        wt = Path(tmp) / "wt"
        # git runs potluck's filter to check the model out: make sure it finds this potluck
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        repo.git.run("worktree", "add", "-q", "--detach", str(wt), model.commit, env={"PATH": path})
        try:
            yield wt
        finally:
            repo.git.run("worktree", "remove", "--force", str(wt), check=False)


def _cached(repo: Repo, weights: str, task: Task) -> tuple[EvalRecord, Outcomes | None] | None:
    rec = pick(records_for(repo, weights), task.digest)
    if rec is None:
        return None
    oc = None if rec.outcomes is None else read_outcomes(repo, rec.outcomes)
    if task.external is None and (oc is None or rec.trust != "verified"):
        return None  # a task potluck can run is run again rather than trusted
    return rec, oc


Evaluated = tuple[Task, EvalRecord | None, Outcomes | None, bool]


def evaluate(
    repo: Repo, suite: Suite, model: Model, *, device: str = "cpu", force: bool = False
) -> list[Evaluated]:
    """(task, record, outcomes, from cache) per task. Runs only the runnable tasks not cached
    for these exact weights and suite digests, and stores their records; an external task
    (``digest:`` in the suite) is only looked up (record None when there is none)."""
    done = {
        t.name: None if force and t.external is None else _cached(repo, model.weights, t)
        for t in suite.tasks
    }
    todo = [t for t in suite.tasks if done[t.name] is None and t.external is None]
    fresh: dict[str, tuple[EvalRecord, Outcomes]] = {}
    if todo:
        with checked_out(repo, model) as where:
            results = run_suite(suite, where, model.weights, tasks=todo, device=device)
        store_records(repo, [r.record for r in results], [r.outcomes for r in results])
        fresh = {r.record.task: (r.record, r.outcomes) for r in results}
    out: list[Evaluated] = []
    for t in suite.tasks:
        hit = done[t.name]
        if hit is not None:
            out.append((t, hit[0], hit[1], True))
        elif t.name in fresh:
            out.append((t, *fresh[t.name], False))
        else:
            out.append((t, None, None, False))
    return out


def gate(
    repo: Repo,
    base: Model,
    cand: Model,
    suites: Sequence[Suite],
    *,
    tolerance: float | None = None,
    alpha: float = 0.05,
    device: str = "cpu",
) -> GateResult:
    """Evaluate both models (cached) on every task and test the candidate's non-inferiority;
    records each task's verdict on the candidate's weights."""
    verdicts: list[TaskVerdict] = []
    gate_recs: list[EvalRecord] = []
    for suite in suites:
        b = evaluate(repo, suite, base, device=device)
        c = evaluate(repo, suite, cand, device=device)
        for (task, br, bo, _), (_, cr, co, _) in zip(b, c, strict=True):
            tol = task.tolerance if tolerance is None else tolerance
            if br is None or cr is None:
                side = "base" if br is None else "candidate"
                verdicts.append(missing_record(task.name, task.digest, tol, side))
                continue
            v = compare_task(br, cr, bo, co, tolerance=tol, alpha=alpha, seed=task.seed)
            verdicts.append(v)
            gate_recs.append(gate_record(cr, v, base.weights, cand.commit or cand.spec))
    if gate_recs:
        store_records(repo, gate_recs)
    return GateResult(base.spec, cand.spec, tuple(verdicts), gate_recs)


_ALIAS = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def promote(repo: Repo, rev: str, name: str, suites: Sequence[Suite] = ()) -> tuple[str, str]:
    """Point ``refs/potluck/aliases/NAME`` at ``rev`` if its exact weights have a passing gate
    record (for every task of ``suites`` when given); returns (ref, commit)."""
    if not _ALIAS.match(name) or ".." in name or name.endswith((".lock", ".")):
        raise UserError(f"bad alias name {name!r}", hint="letters, digits, '.', '_' and '-'")
    model = resolve_model(repo, rev)
    if model.commit is None:
        raise UserError(f"{rev!r} is a path; promote names a revision", hint="commit it first")
    passing = passing_gates(records_for(repo, model.weights))
    wanted = [(t.name, t.digest) for s in suites for t in s.tasks]
    missing = [n for n, d in wanted if d not in passing]
    if not passing or missing:
        what = f"tasks {', '.join(missing)}" if missing else "any task"
        raise UserError(
            f"refusing to promote {rev} as {name}: no passing gate record for {what} on its "
            f"weights {model.weights[:12]}",
            hint=f"run `potluck gate BASE {rev} --suite SUITE` and promote when it passes",
            weights=model.weights, missing=missing,
        )  # fmt: skip
    ref = ALIAS_PREFIX + name
    repo.git.run("update-ref", "-m", f"potluck promote {rev}", ref, model.commit)
    return ref, model.commit

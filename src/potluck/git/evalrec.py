"""Evaluation results recorded on commits as git notes (``refs/notes/potluck-evals``).

One note per commit, a JSON object (sorted keys, one line)::

    {"potluck_evals": "1", "results": {"TASK": {"METRIC": 0.93, ...}, ...}}

Recording merges with what the commit's note already holds: a (task, metric) pair given again
replaces the old value, every other entry stays. Notes travel with ``git push/fetch
refs/notes/potluck-evals`` like any notes ref and never change the commit they describe.
``evals_for`` is what ``potluck log`` reads (all rows at once); ``compare_parents`` puts a
commit's results next to its parents' so a merge that regresses a task is visible.

Evaluation records tied to exact weights (schema ``potluck_eval: 1``) live on another ref,
``refs/potluck/evals``: see ``potluck.git.evalstore`` and docs/evaluations.md.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from potluck.errors import UserError
from potluck.git.plumbing import Git

NOTES_REF = "refs/notes/potluck-evals"
FORMAT_VERSION = "1"
Results = dict[str, dict[str, float]]


def _resolve(git: Git, rev: str) -> str:
    commit = git.rev_parse(f"{rev}^{{commit}}")
    if commit is None:
        raise UserError(f"{rev!r} is not a commit", hint="give a branch, tag or commit id", rev=rev)
    return commit


def _check_name(kind: str, name: object) -> str:
    if not isinstance(name, str) or not name.strip() or name != name.strip() or "=" in name:
        raise UserError(
            f"bad {kind} name {name!r}",
            hint=f"a {kind} name is non-empty text without '=' or surrounding spaces",
            name=str(name),
        )
    return name


def _check_value(task: str, metric: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise UserError(
            f"{task}/{metric}: metric value {value!r} is not a finite number",
            hint="metrics are numbers, e.g. accuracy=0.93",
            task=task,
            metric=metric,
        )
    return float(value)


def validate_results(results: Mapping[str, Any]) -> Results:
    """``{task: {metric: number}}`` checked (names, finite numbers) and copied."""
    if not isinstance(results, Mapping):
        raise UserError("results must be a JSON object {task: {metric: number}}", hint="see --help")
    out: Results = {}
    for task, metrics in results.items():
        _check_name("task", task)
        if not isinstance(metrics, Mapping) or not metrics:
            raise UserError(
                f"task {task!r}: expected a non-empty object {{metric: number}}",
                hint='e.g. {"accuracy": 0.93}',
                task=task,
            )
        out[task] = {_check_name("metric", m): _check_value(task, m, v) for m, v in metrics.items()}
    return out


def parse_metric(text: str) -> tuple[str, float]:
    """``NAME=VALUE`` → (name, float value)."""
    name, sep, raw = text.partition("=")
    if not sep:
        raise UserError(f"bad metric {text!r}", hint="write NAME=VALUE, e.g. accuracy=0.93")
    try:
        value = float(raw)
    except ValueError:
        raise UserError(
            f"bad metric value in {text!r}", hint="write NAME=VALUE, e.g. accuracy=0.93"
        ) from None
    return _check_name("metric", name), _check_value("?", name, value)


def _parse_note(commit: str, raw: bytes) -> Results:
    try:
        doc = json.loads(raw)
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or doc.get("potluck_evals") != FORMAT_VERSION:
        raise UserError(
            f"the {NOTES_REF} note of {commit[:12]} is not a potluck evaluation record",
            hint=f"inspect it with 'git notes --ref {NOTES_REF} show {commit}'",
            commit=commit,
        )
    return validate_results(doc.get("results", {}))


def read_evals(git: Git, rev: str) -> Results:
    """The results recorded on commit ``rev`` ({} when it has no note)."""
    commit = _resolve(git, rev)
    proc = git.run_proc("notes", "--ref", NOTES_REF, "show", commit)
    if proc.returncode != 0:
        return {}
    return _parse_note(commit, proc.stdout)


def merge_results(old: Mapping[str, Mapping[str, float]], new: Results) -> Results:
    """``old`` updated with ``new`` per (task, metric); sorted by task and metric."""
    out = {t: dict(m) for t, m in old.items()}
    for task, metrics in new.items():
        out.setdefault(task, {}).update(metrics)
    return {t: dict(sorted(out[t].items())) for t in sorted(out)}


def record_evals(git: Git, rev: str, results: Mapping[str, Any]) -> tuple[str, Results]:
    """Merge ``results`` into commit ``rev``'s note; (commit id, everything it now holds)."""
    new = validate_results(results)
    if not new:
        raise UserError("nothing to record", hint="give --metric NAME=VALUE or --json-file")
    commit = _resolve(git, rev)
    merged = merge_results(read_evals(git, commit), new)
    doc = {"potluck_evals": FORMAT_VERSION, "results": merged}
    text = json.dumps(doc, sort_keys=True, separators=(",", ":")) + "\n"
    git.run("notes", "--ref", NOTES_REF, "add", "-f", "-F", "-", commit, input=text.encode())
    return commit, merged


def evals_for(git: Git, commits: Sequence[str]) -> dict[str, Results]:
    """What ``potluck log`` shows: the recorded results of each full commit id ({} if none).

    One ``git notes list`` finds which commits have a note; only those notes are read.
    """
    proc = git.run_proc("notes", "--ref", NOTES_REF, "list")
    notes: dict[str, str] = {}
    if proc.returncode == 0:
        for line in proc.stdout.decode().splitlines():
            blob, _, target = line.partition(" ")
            notes[target] = blob
    out: dict[str, Results] = {}
    for commit in commits:
        note = notes.get(commit)
        data = None if note is None else git.show_blob(note)
        out[commit] = {} if data is None else _parse_note(commit, data)
    return out


@dataclass(frozen=True)
class Comparison:
    """One (task, metric) of a commit next to the best value any parent recorded."""

    task: str
    metric: str
    value: float
    parent_best: float | None

    @property
    def delta(self) -> float | None:
        """value − best parent value (None when no parent recorded it)."""
        return None if self.parent_best is None else self.value - self.parent_best

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"task": self.task, "metric": self.metric, "value": self.value,
                "parent_best": self.parent_best, "delta": self.delta}  # fmt: skip


def parents(git: Git, commit: str) -> list[str]:
    """The parent commit ids of ``commit``."""
    line = git.run("rev-list", "--parents", "-n", "1", commit).decode().split()
    return line[1:]


def compare_parents(
    git: Git, rev: str, lower_is_better: Sequence[str] = ("loss",)
) -> list[Comparison]:
    """Each recorded (task, metric) of ``rev`` with the best value its parents recorded.

    "Best" is the maximum, or the minimum for metric names containing one of
    ``lower_is_better``.
    """
    commit = _resolve(git, rev)
    mine = read_evals(git, commit)
    theirs = [read_evals(git, p) for p in parents(git, commit)]
    out = []
    for task, metrics in mine.items():
        for metric, value in metrics.items():
            seen = [r[task][metric] for r in theirs if metric in r.get(task, {})]
            low = any(k in metric for k in lower_is_better)
            best = (min(seen) if low else max(seen)) if seen else None
            out.append(Comparison(task, metric, value, best))
    return out

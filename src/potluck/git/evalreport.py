"""``potluck report BASE..HEAD``: the data of a PR report (tensor diff, lineage of the new
commits, evaluation deltas and gate verdicts); rendering is ``potluck.ops.evals.report``."""

from __future__ import annotations

import math

from potluck.errors import UserError
from potluck.git.evalstore import EVALS_REF, digest_at, read_outcomes, records_for
from potluck.git.inspect import diff as diff_revs
from potluck.git.lineage import walk
from potluck.git.repo import Repo
from potluck.ops.evals.gate import pick
from potluck.ops.evals.records import EvalRecord, paired
from potluck.ops.evals.report import EvalDelta, Report, TensorRow
from potluck.ops.evals.stats import mean_stderr


def split_range(spec: str) -> tuple[str, str]:
    """``BASE..HEAD`` → (BASE, HEAD); ``BASE`` alone means ``BASE..HEAD``."""
    base, sep, head = spec.partition("..")
    if head.startswith("."):
        raise UserError(f"{spec!r}: use BASE..HEAD", hint="e.g. origin/main..HEAD")
    return base or "HEAD", (head or "HEAD") if sep else "HEAD"


def _digest(repo: Repo, rev: str) -> str | None:
    try:
        return digest_at(repo, rev)
    except UserError:
        return None


def _tensors(repo: Repo, base: str, head: str) -> tuple[list[TensorRow], int]:
    rows, unchanged = [], 0
    for d in diff_revs(repo, base, head, []):
        unchanged += d.unchanged
        for c in d.changes:
            s = c.stats
            rows.append(TensorRow(d.path, c.name, c.status, s.rel if s else None,
                                  s.frac_changed if s else None))  # fmt: skip
    return rows, unchanged


def _lineage(repo: Repo, base: str, head: str) -> list[str]:
    new = set(repo.git.rev_list(f"{base}..{head}"))
    out = []
    for e in walk(repo, head):
        if e.commit not in new:
            continue
        how = e.relation + (f" [{e.method}]" if e.method else "")
        parents = ", ".join(
            p.digest[:12] + (f" @{p.commit[:10]}" if p.commit else "") for p in e.parents
        )
        out.append(f"{e.commit[:10] if e.commit else '?'} {e.path or ''}: {e.child[:12]} <- "
                   f"{how} <- {parents or '(none)'}")  # fmt: skip
    return out


def _delta(repo: Repo, b: EvalRecord | None, h: EvalRecord | None, gate: EvalRecord | None
           ) -> EvalDelta:  # fmt: skip
    ref = h or b
    assert ref is not None
    se, is_paired = None, False
    if b is not None and h is not None:
        bo = read_outcomes(repo, b.outcomes) if b.outcomes else None
        ho = read_outcomes(repo, h.outcomes) if h.outcomes else None
        if bo is not None and ho is not None:
            bv, hv = paired(bo, ho)
            se, is_paired = mean_stderr(hv - bv)[1], True
        elif b.stderr is not None and h.stderr is not None:
            se = math.hypot(b.stderr, h.stderr)
    g = gate.gate if gate is not None and gate.gate is not None else {}
    return EvalDelta(
        ref.task, ref.metric, None if b is None else b.value, None if b is None else b.stderr,
        None if h is None else h.value, None if h is None else h.stderr, se, is_paired,
        g.get("verdict"), g.get("reason"),
    )  # fmt: skip


def _evals(repo: Repo, bw: str | None, hw: str | None) -> list[EvalDelta]:
    if repo.git.rev_parse(EVALS_REF) is None:
        return []
    brs = records_for(repo, bw) if bw else []
    hrs = records_for(repo, hw) if hw else []
    gates = {r.suite_digest: r for r in hrs
             if r.kind == "gate" and r.gate and r.gate.get("base_weights") == bw}  # fmt: skip
    suites = sorted({r.suite_digest: r.task for r in brs + hrs if r.kind == "score"}.items(),
                    key=lambda kv: (kv[1], kv[0]))  # fmt: skip
    return [_delta(repo, pick(brs, d), pick(hrs, d), gates.get(d)) for d, _ in suites]


def build_report(repo: Repo, spec: str) -> Report:
    """The report of ``BASE..HEAD``."""
    base, head = split_range(spec)
    for rev in (base, head):
        if repo.git.rev_parse(f"{rev}^{{commit}}") is None:
            raise UserError(f"unknown revision {rev!r}", hint="give BASE..HEAD, e.g. main..HEAD")
    bw, hw = _digest(repo, base), _digest(repo, head)
    tensors, unchanged = _tensors(repo, base, head)
    return Report(base, head, bw, hw, tensors, unchanged, _lineage(repo, base, head),
                  _evals(repo, bw, hw))  # fmt: skip

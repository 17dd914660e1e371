"""The merge gate on records: per task, a paired non-inferiority test of a candidate's outcomes
against the base's, and the gate verdict as a record (``kind: gate``).

Records are only ever compared when their suite digests are equal (same dataset content, split,
task version, prompt template, metric). Without per-item outcomes on either side no paired
test can run: the task is ``inconclusive`` with that reason.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from potluck.errors import UserError
from potluck.ops.evals.records import EvalRecord, Outcomes, paired, potluck_version
from potluck.ops.evals.stats import PairedTest, paired_test

#: ``potluck gate`` exit codes (documented in docs/evaluations.md).
EXIT = {"pass": 0, "fail": 1, "inconclusive": 3}


@dataclass(frozen=True)
class TaskVerdict:
    """One task's verdict, the test behind it (None when it could not run) and why."""

    task: str
    suite_digest: str
    metric: str
    verdict: str
    tolerance: float
    base_value: float | None
    cand_value: float | None
    test: PairedTest | None = None
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "task": self.task, "suite": self.suite_digest, "metric": self.metric,
            "verdict": self.verdict, "tolerance": self.tolerance, "base": self.base_value,
            "candidate": self.cand_value, "reason": self.reason,
            "test": None if self.test is None else self.test.to_dict(),
        }  # fmt: skip


@dataclass(frozen=True)
class GateResult:
    """The verdict of every task and the overall one (fail > inconclusive > pass)."""

    base: str
    candidate: str
    tasks: tuple[TaskVerdict, ...]
    records: list[EvalRecord] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        """``fail`` if any task fails, else ``inconclusive`` if any is, else ``pass``."""
        seen = {t.verdict for t in self.tasks}
        for v in ("fail", "inconclusive"):
            if v in seen:
                return v
        return "pass" if self.tasks else "inconclusive"

    @property
    def exit_code(self) -> int:
        """0 pass, 1 fail, 3 inconclusive."""
        return EXIT[self.verdict]


def _inconclusive(base: EvalRecord, cand: EvalRecord | None, tol: float, why: str) -> TaskVerdict:
    return TaskVerdict(
        base.task, base.suite_digest, base.metric, "inconclusive", tol, base.value,
        None if cand is None else cand.value, reason=why,
    )  # fmt: skip


def missing_record(task: str, digest: str, tolerance: float, side: str) -> TaskVerdict:
    """``inconclusive``: one side has no record of the task (an external task not imported)."""
    return TaskVerdict(
        task, digest, "?", "inconclusive", tolerance, None, None,
        reason=f"{side}: no record of this task for its weights (suite {digest[:12]})",
    )  # fmt: skip


def compare_task(
    base: EvalRecord,
    cand: EvalRecord,
    base_oc: Outcomes | None,
    cand_oc: Outcomes | None,
    *,
    tolerance: float,
    alpha: float = 0.05,
    seed: int = 0,
) -> TaskVerdict:
    """The paired test of one task; refuses records of different suites."""
    if base.suite_digest != cand.suite_digest or base.metric != cand.metric:
        raise UserError(
            f"task {base.task}: the two records measure different suites "
            f"({base.suite_digest[:12]} vs {cand.suite_digest[:12]}); they are never compared",
            hint="evaluate both models with the same suite file",
        )
    for side, rec, oc in (("base", base, base_oc), ("candidate", cand, cand_oc)):
        if oc is None:
            why = "no per-item outcomes" if rec.outcomes is None else "outcomes object missing"
            return _inconclusive(base, cand, tolerance, f"{side}: {why}; no paired test possible")
    assert base_oc is not None and cand_oc is not None
    b, c = paired(base_oc, cand_oc)
    test = paired_test(
        b, c, tolerance=tolerance, higher_is_better=base.direction == "higher",
        alpha=alpha, seed=seed,
    )  # fmt: skip
    return TaskVerdict(
        base.task, base.suite_digest, base.metric, test.verdict, tolerance, base.value,
        cand.value, test,
    )  # fmt: skip


def gate_record(
    cand: EvalRecord, verdict: TaskVerdict, base_weights: str, candidate: str
) -> EvalRecord:
    """The verdict of one task as a record on the candidate's weights (``kind: gate``)."""
    return EvalRecord(
        weights=cand.weights, suite=cand.suite, metric=cand.metric, direction=cand.direction,
        value=cand.value, stderr=cand.stderr, n=cand.n, trust="verified", seeds=cand.seeds,
        device=cand.device, batch_size=cand.batch_size, outcomes=cand.outcomes, kind="gate",
        runner={"name": "potluck gate", "version": potluck_version()},
        gate={"base_weights": base_weights, "candidate": candidate, **verdict.to_dict()},
    )  # fmt: skip


def passing_gates(records: Sequence[EvalRecord]) -> dict[str, EvalRecord]:
    """{suite digest: a passing gate record} among ``records``."""
    return {
        r.suite_digest: r
        for r in records
        if r.kind == "gate" and r.gate is not None and r.gate.get("verdict") == "pass"
    }


def pick(records: Sequence[EvalRecord], suite_digest: str) -> EvalRecord | None:
    """The score record of a task, preferring one with outcomes, then ``verified``."""
    found = [r for r in records if r.kind == "score" and r.suite_digest == suite_digest]
    found.sort(key=lambda r: (r.outcomes is None, r.trust != "verified", r.id))
    return found[0] if found else None


def summary(result: GateResult) -> Mapping[str, Any]:
    """JSON-ready form of a gate result."""
    return {
        "base": result.base, "candidate": result.candidate, "verdict": result.verdict,
        "exit_code": result.exit_code, "tasks": [t.to_dict() for t in result.tasks],
    }  # fmt: skip

"""``potluck report`` as Markdown: a PR comment for any forge (pure; the data is collected by
``potluck.git.evalreport``). Every name that comes from a checkpoint, a commit or a record is
escaped: control characters become ``\\uXXXX`` and the Markdown/HTML punctuation that could
start markup inside a line (``\\ ` * _ [ ] < > ! | ~ @ &``) is backslashed,
so a tensor named ``<img src=x>`` or ``a|b`` cannot break the table or inject markup.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2066-\u2069]")
_SPECIAL = re.compile(r"([\\`*_\[\]<>!|~@&])")
_LAYER = re.compile(r"^(.*?\.\d+)\.")


def md(text: object) -> str:
    """``text`` safe inside a Markdown table cell or paragraph."""
    s = _CONTROL.sub(lambda m: f"\\u{ord(m.group()):04x}", str(text))
    return _SPECIAL.sub(r"\\\1", s)


def layer_of(name: str) -> str:
    """The layer a tensor belongs to: up to the first numbered component (``h.3``,
    ``model.layers.11``), else the name itself (embeddings, final norms)."""
    m = _LAYER.match(name)
    return m.group(1) if m else name


@dataclass(frozen=True)
class TensorRow:
    """One changed tensor of one file."""

    path: str
    name: str
    status: str
    rel: float | None
    frac_changed: float | None


@dataclass(frozen=True)
class EvalDelta:
    """One task on both sides: values, the delta and its standard error, the gate verdict."""

    task: str
    metric: str
    base: float | None
    base_se: float | None
    head: float | None
    head_se: float | None
    delta_se: float | None
    paired: bool
    verdict: str | None
    reason: str | None = None

    @property
    def delta(self) -> float | None:
        """head − base (None when a side has no record)."""
        return None if self.base is None or self.head is None else self.head - self.base


@dataclass
class Report:
    """Everything ``potluck report`` shows."""

    base: str
    head: str
    base_weights: str | None
    head_weights: str | None
    tensors: list[TensorRow] = field(default_factory=list)
    unchanged: int = 0
    lineage: list[str] = field(default_factory=list)
    evals: list[EvalDelta] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "base": self.base, "head": self.head, "base_weights": self.base_weights,
            "head_weights": self.head_weights, "unchanged": self.unchanged,
            "tensors": [vars(t) for t in self.tensors], "lineage": self.lineage,
            "evals": [{**vars(e), "delta": e.delta} for e in self.evals],
        }  # fmt: skip


def _num(x: float | None, se: float | None = None, sign: bool = False) -> str:
    if x is None:
        return "–"
    text = f"{x:+.4f}" if sign else f"{x:.4f}"
    return text if se is None or not math.isfinite(se) else f"{text} ± {se:.4f}"


def _layers(rows: Sequence[TensorRow]) -> list[str]:
    groups: dict[tuple[str, str], list[TensorRow]] = {}
    for r in rows:
        groups.setdefault((r.path, layer_of(r.name)), []).append(r)
    out = [
        "| file | layer | tensors changed | max ‖Δ‖/‖W‖ | changed entries |",
        "|---|---|---:|---:|---:|",
    ]
    for (path, layer), rs in sorted(groups.items()):
        rels = [r.rel for r in rs if r.rel is not None]
        fracs = [r.frac_changed for r in rs if r.frac_changed is not None]
        rel = f"{max(rels):.2e}" if rels else "–"
        frac = f"{100 * max(fracs):.1f} %" if fracs else "–"
        out.append(f"| {md(path)} | {md(layer)} | {len(rs)} | {rel} | {frac} |")
    return out


def _evals(deltas: Sequence[EvalDelta]) -> list[str]:
    out = ["| task | metric | base | head | Δ | gate |", "|---|---|---:|---:|---:|---|"]
    for e in deltas:
        kind = "" if e.delta is None else (" (paired)" if e.paired else " (unpaired)")
        gate = "–" if e.verdict is None else f"**{e.verdict}**"
        if e.reason:
            gate += f": {md(e.reason)}"
        out.append(
            f"| {md(e.task)} | {md(e.metric)} | {_num(e.base, e.base_se)} | "
            f"{_num(e.head, e.head_se)} | {_num(e.delta, e.delta_se, sign=True)}{kind} | {gate} |"
        )
    return out


def to_markdown(r: Report, top: int = 10) -> str:
    """The report as Markdown."""
    lines = [f"## potluck report `{_tick(r.base)}..{_tick(r.head)}`", ""]
    if r.base_weights or r.head_weights:
        lines += [
            f"Weights: `{(r.base_weights or '–')[:16]}` → `{(r.head_weights or '–')[:16]}`",
            "",
        ]
    lines += ["### Tensors", ""]
    if r.tensors:
        lines += [f"{len(r.tensors)} tensors changed, {r.unchanged} unchanged.", ""]
        lines += [*_layers(r.tensors), ""]
        big = sorted((t for t in r.tensors if t.rel is not None), key=lambda t: -(t.rel or 0))
        if big:
            lines += ["Largest changes:", ""]
            lines += [f"- {md(t.name)} ({md(t.path)}): ‖Δ‖/‖W‖ = {t.rel:.2e}" for t in big[:top]]
            lines.append("")
        other = [t for t in r.tensors if t.rel is None]
        lines += [f"- {md(t.name)} ({md(t.path)}): {md(t.status)}" for t in other[:top]]
        lines += [""] if other else []
    else:
        lines += ["No tensor changed.", ""]
    lines += ["### Lineage", ""]
    lines += [f"- {md(x)}" for x in r.lineage] or ["No model-changing commits."]
    lines += ["", "### Evaluations", ""]
    lines += _evals(r.evals) if r.evals else ["No evaluation records for these weights."]
    return "\n".join(lines) + "\n"


def _tick(text: str) -> str:
    return md(text).replace("`", "'")

"""Recording lineage for a written output: the one call each writer (merge, patch apply, peft
apply, compose export) makes after its output is in place, and the card lines it gets."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from potluck.ops.lineage.digest import weights_digest_of
from potluck.ops.lineage.edge import Edge, Lineage, Parent, read_lineage, write_lineage
from potluck.ops.models.sources import ModelSource

__all__ = [
    "card_lines",
    "inherited_edges",
    "pin",
    "plan_edge",
    "record_output",
    "with_card_lineage",
]


def pin(source: ModelSource) -> Parent:
    """``source`` pinned: its commit (``identity["commit"]``, for ``file@rev``) and digest."""
    return Parent(source.identity.get("commit"), weights_digest_of(source))


def plan_edge(
    sources: Sequence[ModelSource],
    relation: str,
    method: str | None = None,
    params: Mapping[str, Any] | None = None,
    refs: Sequence[str] | None = None,
) -> Edge:
    """The edge of an output made from ``sources`` (its child digest still empty: filled in by
    ``record_output`` once the output is written). ``refs`` default to the sources' labels."""
    return Edge(
        child="",
        parents=tuple(pin(s) for s in sources),
        relation=relation,
        method=method,
        params=dict(params or {}),
        refs=tuple(refs if refs is not None else [s.label for s in sources]),
    )


def inherited_edges(refs: Sequence[str], parents: Sequence[Parent]) -> list[Edge]:
    """The edges of the parents that are outputs with their own lineage file whose weights are
    still the pinned ones (a parent changed since is not vouched for), each edge once."""
    out: list[Edge] = []
    for ref, parent in zip(refs, parents, strict=False):
        if not ref or not os.path.exists(ref):
            continue
        lin = read_lineage(ref)
        if lin is None or lin.weights_digest != parent.digest:
            continue
        out += [e for e in lin.edges if e not in out]
    return out


def record_output(out: str | os.PathLike[str], edge: Edge) -> Lineage:
    """Write the lineage of the output ``out`` (a directory or a file): the weights digest of
    what is there now, ``edge`` with that child and path, then the parents' inherited edges."""
    child = weights_digest_of(out)
    first = Edge(
        child=child,
        parents=edge.parents,
        relation=edge.relation,
        method=edge.method,
        params=edge.params,
        commit=None,
        path=os.fspath(out),
        refs=edge.refs,
    )
    lineage = Lineage(child, (first, *inherited_edges(edge.refs, edge.parents)))
    write_lineage(out, lineage)
    return lineage


def card_lines(edge: Edge) -> list[str]:
    """YAML front-matter lines (HF-compatible custom keys) pinning the parents by digest."""
    lines = ["potluck_lineage:", f"  relation: {edge.relation}"]
    if edge.method:
        lines.append(f"  method: {edge.method}")
    lines.append("  parents:")
    refs = list(edge.refs) + [""] * (len(edge.parents) - len(edge.refs))
    for p, ref in zip(edge.parents, refs, strict=True):
        lines.append(f"  - weights_digest: {p.digest}")
        if ref:
            lines.append(f"    ref: {_yaml(ref)}")
        if p.commit:
            lines.append(f"    commit: {p.commit}")
    return lines


def _yaml(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def with_card_lineage(card: str, edge: Edge) -> str:
    """``card`` (a model card with YAML front matter) with ``card_lines(edge)`` added at the
    end of its front matter; a card without front matter gets one."""
    lines = card.split("\n")
    if lines and lines[0] == "---" and "---" in lines[1:]:
        end = lines.index("---", 1)
        return "\n".join([*lines[:end], *card_lines(edge), *lines[end:]])
    return "\n".join(["---", *card_lines(edge), "---", card])

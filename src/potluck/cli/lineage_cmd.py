"""``potluck lineage [TARGET] [--json|--dot]``: where a model came from (docs/lineage.md)."""

from __future__ import annotations

import click

from potluck.cli.main import cli, handle_errors
from potluck.cli.render import echo, emit_json, safe_field
from potluck.errors import UserError
from potluck.git.lineage import LineageResult, lineage_of
from potluck.ops.lineage import Edge


def _parent_text(edge: Edge, i: int) -> str:
    p = edge.parents[i]
    ref = edge.refs[i] if i < len(edge.refs) and edge.refs[i] else None
    where = f" @{p.commit[:10]}" if p.commit else ""
    return f"{p.digest[:12]}{where}" + (f" ({safe_field(ref)})" if ref else "")


def _edge_text(edge: Edge) -> str:
    how = edge.relation + (f" [{safe_field(edge.method)}]" if edge.method else "")
    at = f" @{edge.commit[:10]}" if edge.commit else ""
    place = f" {safe_field(edge.path)}" if edge.path else ""
    parents = ", ".join(_parent_text(edge, i) for i in range(len(edge.parents))) or "(none)"
    return f"{edge.child[:12]}{at}{place}  <- {how} <- {parents}"


def _dot(result: LineageResult) -> str:
    lines = ["digraph lineage {", "  rankdir=BT;"]
    for e in result.edges:
        for p in e.parents:
            label = e.relation + (f": {e.method}" if e.method else "")
            lines.append(f'  "{p.digest[:12]}" -> "{e.child[:12]}" [label="{label}"];')
    lines.append("}")
    return "\n".join(lines)


@cli.command("lineage")
@click.argument("target", required=False)
@click.option("--path", "model_path", help="With a revision: only this model (file or folder).")
@click.option("--limit", default=200, show_default=True, help="Commits walked per model.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")
@click.option("--dot", "as_dot", is_flag=True, help="Graphviz dot output.")
@handle_errors
def lineage(
    target: str | None, model_path: str | None, limit: int, as_json: bool, as_dot: bool
) -> None:
    """Where TARGET's weights came from: a revision (default HEAD), a model path in a
    repository, an output directory potluck wrote (lineage.json) or a patch file."""
    if as_json and as_dot:
        raise UserError("--json and --dot exclude each other", hint="pick one output format")
    result = lineage_of(target, model_path, limit)
    if as_json:
        emit_json(result.to_dict())
        return
    if as_dot:
        echo(_dot(result))
        return
    echo(f"{safe_field(result.target)} ({result.kind}): {len(result.edges)} edge(s)")
    for e in result.edges:
        echo(f"  {_edge_text(e)}")
    for note in result.notes:
        echo(f"note: {note}", err=True)

"""The lineage graph and the evaluation dashboard (on ``potluck.git.lineage`` and the indexed
evaluation records of ``potluck.git.evalstore``)."""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa

from potluck.git.lineage import walk
from potluck.hub import index as ix
from potluck.hub import svg
from potluck.hub.pages import Hub, resolve


def _edges(hub: Hub, name: str, sha: str) -> list[dict[str, Any]]:
    """The edges of ``sha``'s history (``walk``), cached in the index per commit."""
    key = f"lineage:{sha}"
    with hub.engine.connect() as c:
        cached = ix.get_state(c, name, key)
    if cached is not None:
        got: list[dict[str, Any]] = json.loads(cached)
        return got
    edges = [e.to_dict() | {"source": e.source} for e in walk(hub.repo(name), sha)]
    with ix.begin(hub.engine) as conn:
        ix.set_state(conn, name, key, json.dumps(edges, sort_keys=True))
    return edges


def lineage(hub: Hub, name: str, rev: str) -> dict[str, Any]:
    """Every lineage edge reachable from ``rev`` and their graph (parents left of children)."""
    sha = resolve(hub, name, rev)
    edges = _edges(hub, name, sha)
    nodes: dict[str, str] = {}
    lines: list[tuple[str, str, str]] = []
    for e in reversed(edges):  # oldest first: roots get the first places
        for p in e["parents"]:
            nodes.setdefault(p["digest"], (p.get("commit") or "")[:10] or p.get("ref") or "")
            lines.append((p["digest"], e["child"], e["relation"]))
        label = f"{(e.get('commit') or '')[:10]} {e.get('path') or ''}".strip()
        nodes[e["child"]] = label
    return {
        "repo": name,
        "rev": rev,
        "commit": sha,
        "edges": edges,
        "svg": svg.lineage_graph(nodes, lines),
    }


def evals(hub: Hub, name: str) -> dict[str, Any]:
    """Scores per task over commits (oldest first, with standard errors) and gate verdicts."""
    hub.repo(name)
    e, c = ix.EVALS, ix.COMMITS
    with hub.engine.connect() as conn:
        got = ix.rows(
            conn,
            sa.select(e, c.c.sha, c.c.time, c.c.subject)
            .join(c, sa.and_(c.c.repo == e.c.repo, c.c.weights == e.c.weights))
            .where(e.c.repo == name)
            .order_by(c.c.time, c.c.sha, e.c.task),
        )
        by_weights = {
            w: s
            for w, s in conn.execute(
                sa.select(c.c.weights, c.c.sha).where(c.c.repo == name).order_by(c.c.time)
            )
        }
    tasks: dict[str, list[dict[str, Any]]] = {}
    gates: dict[str, dict[str, Any]] = {}
    for r in got:
        row = {k: r[k] for k in ("task", "metric", "direction", "value", "stderr", "n", "trust")}
        row.update(commit=r["sha"], subject=r["subject"], weights=r["weights"])
        if r["kind"] == "score":
            tasks.setdefault(r["task"], []).append(row)
        else:
            row.update(verdict=r["verdict"], base_commit=by_weights.get(r["base_weights"]))
            gates[r["id"]] = row
    charts = {
        t: svg.eval_chart(
            t, [(p["commit"][:7], p["value"], p["stderr"]) for p in pts if p["value"] is not None]
        )
        for t, pts in tasks.items()
    }
    return {"repo": name, "tasks": tasks, "gates": list(gates.values()), "charts": charts}

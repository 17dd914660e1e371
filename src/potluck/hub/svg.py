"""Server-rendered SVG charts: the per-layer heat map, histograms, the lineage graph, the
evaluation chart. Every text and attribute value is escaped (tensor names are user data)."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from html import escape
from typing import Any

from potluck.ops.evals.report import layer_of

CELL_W, CELL_H, LABEL_W = 22, 18, 170
_NUM = re.compile(r"(\d+)")


def _natural(s: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in _NUM.split(s)]


def _svg(w: float, h: float, body: list[str], cls: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="{cls}" width="{w:.0f}" height="{h:.0f}" '
        f'viewBox="0 0 {w:.0f} {h:.0f}" role="img">' + "".join(body) + "</svg>"
    )


def heat_color(rel: float | None) -> str:
    """‖Δ‖/‖W‖ → a fill colour on a log scale from 1e-4 (pale) to ≥ 1 (dark red)."""
    if rel is None:
        return "#bbbbbb"  # added, removed, reshaped: no ratio
    if rel <= 0:
        return "#ffffff"
    t = min(1.0, max(0.0, (math.log10(rel) + 4) / 4))
    r, g, b = 255, int(245 - 205 * t), int(220 - 200 * t)
    return f"#{r:02x}{g:02x}{b:02x}"


def heatmap(cells: Sequence[tuple[str, str, float | None]]) -> str:
    """One cell per tensor ``(name, status, rel)``, one row per layer (``layer_of``)."""
    layers: dict[str, list[tuple[str, str, float | None]]] = {}
    for cell in sorted(cells, key=lambda c: _natural(c[0])):
        layers.setdefault(layer_of(cell[0]), []).append(cell)
    width = LABEL_W + CELL_W * max([len(v) for v in layers.values()] or [1]) + 4
    body = []
    for y, (layer, row) in enumerate(layers.items()):
        top = 4 + y * (CELL_H + 4)
        body.append(
            f'<text class="layer" x="{LABEL_W - 6}" y="{top + 13}" text-anchor="end" '
            f'font-size="11">{escape(layer)}</text>'
        )
        for x, (name, status, rel) in enumerate(row):
            value = "n/a" if rel is None else f"{rel:.3g}"
            body.append(
                f'<rect class="cell" x="{LABEL_W + x * CELL_W}" y="{top}" width="{CELL_W - 2}" '
                f'height="{CELL_H}" fill="{heat_color(rel)}" stroke="#888" '
                f'data-name="{escape(name)}" data-rel="{value}" data-status="{escape(status)}">'
                f"<title>{escape(name)} ({escape(status)}): ‖Δ‖/‖W‖ = {value}</title></rect>"
            )
    height = 8 + len(layers) * (CELL_H + 4)
    return _svg(width, max(height, CELL_H + 8), body, "heatmap")


def histogram(counts: Sequence[int], lo: float, hi: float, title: str) -> str:
    """Bars of a histogram (``counts`` over equal bins from ``lo`` to ``hi``)."""
    w, h, pad = 360, 140, 20
    top = max(counts) if counts and max(counts) > 0 else 1
    bw = (w - 2 * pad) / max(len(counts), 1)
    body = [f'<text x="{pad}" y="12" font-size="11">{escape(title)}</text>']
    for i, c in enumerate(counts):
        bh = (h - 2 * pad - 10) * c / top
        body.append(
            f'<rect class="bar" x="{pad + i * bw:.2f}" y="{h - pad - bh:.2f}" '
            f'width="{max(bw - 1, 0.5):.2f}" height="{bh:.2f}" fill="#4a78b0" data-count="{c}"/>'
        )
    body.append(f'<text x="{pad}" y="{h - 4}" font-size="10">{lo:.3g}</text>')
    body.append(f'<text x="{w - pad}" y="{h - 4}" font-size="10" text-anchor="end">{hi:.3g}</text>')
    return _svg(w, h, body, "histogram")


def _depths(nodes: Sequence[str], edges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """Longest-path depth of each node from the roots (parents before children)."""
    depth = dict.fromkeys(nodes, 0)
    for _ in range(len(nodes)):  # bounded relaxation: terminates on cycles too
        moved = False
        for p, c in edges:
            if depth[c] < depth[p] + 1 <= len(nodes):
                depth[c] = depth[p] + 1
                moved = True
        if not moved:
            break
    return depth


def lineage_graph(nodes: dict[str, str], edges: Sequence[tuple[str, str, str]]) -> str:
    """Nodes ``{digest: label}``, edges ``(parent, child, relation)``; parents left of children."""
    order = list(nodes)
    depth = _depths(order, [(p, c) for p, c, _ in edges])
    cols: dict[int, list[str]] = {}
    for n in order:
        cols.setdefault(depth[n], []).append(n)
    nw, nh, gx, gy = 150, 34, 60, 16
    pos = {
        n: (10 + d * (nw + gx), 10 + i * (nh + gy))
        for d, ns in cols.items()
        for i, n in enumerate(ns)
    }
    body = [
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="6" '
        'markerHeight="6" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#555"/></marker></defs>'
    ]
    for p, c, rel in edges:
        (x1, y1), (x2, y2) = pos[p], pos[c]
        body.append(
            f'<line class="edge" x1="{x1 + nw}" y1="{y1 + nh / 2}" x2="{x2}" y2="{y2 + nh / 2}" '
            f'stroke="#555" marker-end="url(#arrow)" data-relation="{escape(rel)}">'
            f"<title>{escape(rel)}</title></line>"
        )
    for n in order:
        x, y = pos[n]
        body.append(
            f'<g class="node" data-digest="{escape(n)}"><rect x="{x}" y="{y}" width="{nw}" '
            f'height="{nh}" rx="4" fill="#eef3fa" stroke="#4a78b0"/>'
            f'<text x="{x + 6}" y="{y + 14}" font-size="11" font-family="monospace">'
            f"{escape(n[:12])}</text>"
            f'<text x="{x + 6}" y="{y + 28}" font-size="10">{escape(nodes[n])}</text></g>'
        )
    w = 20 + (max(cols or {0: []}) + 1) * (nw + gx)
    h = 20 + max([len(v) for v in cols.values()] or [1]) * (nh + gy)
    return _svg(w, h, body, "lineage")


def eval_chart(task: str, points: Sequence[tuple[str, float, float | None]]) -> str:
    """One task over commits: ``(label, value, stderr)`` points with 95 % error bars."""
    w, h, pad = max(200, 60 + 50 * len(points)), 160, 30
    vals = [v for _, v, _ in points] + [v + 1.96 * (s or 0) for _, v, s in points]
    vals += [v - 1.96 * (s or 0) for _, v, s in points]
    lo, hi = (min(vals), max(vals)) if vals else (0.0, 1.0)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5

    def y(v: float) -> float:
        return h - pad - (h - 2 * pad) * (v - lo) / (hi - lo)

    body = [
        f'<text x="4" y="12" font-size="11">{escape(task)}</text>',
        f'<text x="4" y="{y(hi) + 4:.1f}" font-size="9">{hi:.3g}</text>',
        f'<text x="4" y="{y(lo) + 4:.1f}" font-size="9">{lo:.3g}</text>',
    ]
    for i, (label, v, s) in enumerate(points):
        x = 50 + 50 * i
        e = 1.96 * (s or 0)
        body.append(
            f'<line class="errbar" x1="{x}" x2="{x}" y1="{y(v - e):.1f}" y2="{y(v + e):.1f}" '
            f'stroke="#333"/><circle class="point" cx="{x}" cy="{y(v):.1f}" r="4" fill="#b04a4a" '
            f'data-value="{v:.6g}"><title>{escape(label)}: {v:.4g} ± {e:.2g}</title></circle>'
            f'<text x="{x}" y="{h - 8}" font-size="9" text-anchor="middle">{escape(label)}</text>'
        )
    return _svg(w, h, body, "evalchart")

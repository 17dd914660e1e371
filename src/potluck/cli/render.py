"""Human and JSON rendering: the only place that formats output for people."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from potluck.git.inspect import FileDiff
from potluck.objects.manifest import Manifest


def emit_json(obj: Any) -> None:
    """Print ``obj`` as JSON on stdout."""
    click.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))


def human_bytes(n: float) -> str:
    """1536 → '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def table(rows: list[list[str]], header: list[str]) -> str:
    """A plain left-aligned text table."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*["-" * w for w in widths])]
    lines += [fmt.format(*map(str, r)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def file_diff_text(d: FileDiff) -> str:
    """Text of one file's tensor-level diff (used by `potluck diff` and the git diff driver)."""
    out = [f"potluck diff a/{d.path} b/{d.path}"]
    for c in d.changes:
        sig = {"added": c.new, "removed": c.old}.get(c.status) or f"{c.old} -> {c.new}"
        if c.status == "changed" and c.old == c.new:
            sig = c.new or ""
        line = f"  {c.status:<8} {c.name}  {sig}"
        if c.stats is not None:
            s = c.stats
            line += (
                f"  ‖Δ‖₂={s.l2:.4g} ‖Δ‖/‖W‖={s.rel:.3g} changed={100 * s.frac_changed:.2f}%"
                f" max|Δ|={s.max_abs:.3g}"
            )
        out.append(line)
    out.append(f"  ({len(d.changes)} tensors differ, {d.unchanged} unchanged)")
    return "\n".join(out)


def tensor_lines(m: Manifest | None) -> str:
    """Text form of a manifest for line diffs: ``name  dtype[shape]  oid-prefix`` per tensor."""
    if m is None:
        return ""
    lines = [f"# {m.format}, {m.size} bytes"]
    for name, e in sorted(m.tensors().items()):
        lines.append(f"{name}  {e.dtype}[{','.join(map(str, e.shape))}]  {e.oid[:16]}")
    for v in sorted(m.views, key=lambda v: v.name):
        lines.append(f"{v.name}  {v.dtype}[{','.join(map(str, v.shape))}]  view of {v.storage}")
    return "\n".join(lines)


def err(msg: str) -> None:
    """Print to stderr."""
    print(msg, file=sys.stderr)

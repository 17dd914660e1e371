"""``potluck patch create|apply|info``: ship a fine-tune as a small update of a pinned base."""

from __future__ import annotations

import json
from typing import Any

import click

from potluck.cli.main import cli, handle_errors
from potluck.codecs.rules import Rule
from potluck.errors import UserError
from potluck.ops.patch import apply_patch, create_patch, patch_info


def parse_rule(text: str) -> Rule:
    """``'GLOB=codec[:k=v,…]'`` → (pattern, codec, params); values stay strings (codecs convert)."""
    pattern, eq, spec = text.partition("=")
    codec, _, rest = spec.partition(":")
    if not eq or not pattern or not codec:
        raise UserError(
            f"bad --rule {text!r}",
            hint="write GLOB=codec or GLOB=codec:k=v,k=v (e.g. '*attn*=lowrank:rank=8')",
        )
    params: dict[str, object] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise UserError(f"bad parameter {item!r} in --rule {text!r}", hint="write k=v")
        params[key.strip()] = value.strip()
    return (pattern, codec.strip(), params)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


@cli.group()
def patch() -> None:
    """Create, apply and inspect patches (a fine-tune as a small update of a pinned base)."""


@patch.command("create")
@click.argument("base", type=click.Path(exists=True, dir_okay=False))
@click.argument("target", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False))
@click.option("--codec", default="exact_xor", show_default=True, help="Default codec.")
@click.option("--rank", type=int, help="lowrank: maximum rank.")
@click.option("--density", type=float, help="sparse codecs: fraction of elements kept.")
@click.option("--bits", type=int, help="quant: bits per code (4 or 8).")
@click.option("--tensors", "glob", help="Only tensors whose name matches this glob.")
@click.option("--rule", "rules", multiple=True, help="GLOB=codec[:k=v,…]; first match wins.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for random codecs.")
@click.option("--author", help="Recorded in the patch description.")
@click.option("--task", help="Recorded in the patch description.")
@click.option("--license", "license_", help="Recorded in the patch description.")
@handle_errors
def create_cmd(
    base: str,
    target: str,
    out: str,
    codec: str,
    rank: int | None,
    density: float | None,
    bits: int | None,
    glob: str | None,
    rules: tuple[str, ...],
    seed: int,
    author: str | None,
    task: str | None,
    license_: str | None,
) -> None:
    """Write a patch turning BASE into TARGET (both checkpoint files)."""
    flags = {"rank": rank, "density": density, "bits": bits}
    described = {"author": author, "task": task, "license": license_}
    info = create_patch(
        base,
        target,
        out,
        rules=[parse_rule(r) for r in rules],
        default_codec=codec,
        params={k: v for k, v in flags.items() if v is not None},
        seed=seed,
        description={k: v for k, v in described.items() if v is not None},
        tensors_glob=glob,
    )
    for e in info.entries:
        err = "exact" if e.relative_error is None else f"rel.err {e.relative_error:.3g}"
        mark = " (added)" if e.name in info.added else ""
        click.echo(f"{e.name}{mark}: {e.codec}, {_fmt_bytes(e.nbytes)}, {err}")
    for name in info.removed:
        click.echo(f"{name}: removed")
    full = sum(e.full_nbytes for e in info.entries)
    ratio = full / info.size if info.size else 0.0
    click.echo(
        f"{len(info.entries)} changed, {len(info.removed)} removed, {info.unchanged} unchanged; "
        f"patch {_fmt_bytes(info.size)} for {_fmt_bytes(full)} of changed tensors "
        f"({ratio:.1f}x) → {info.path}"
    )


@patch.command("apply")
@click.argument("base", type=click.Path(exists=True, dir_okay=False))
@click.argument("patch_file", metavar="PATCH", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False))
@click.option("--scale", type=float, default=1.0, show_default=True, help="Scale lossy deltas.")
@click.option("--force", is_flag=True, help="Apply even to a base the patch was not made for.")
@handle_errors
def apply_cmd(base: str, patch_file: str, out: str, scale: float, force: bool) -> None:
    """Apply PATCH to BASE and write the result (safetensors) to -o."""
    report = apply_patch(base, patch_file, out, scale=scale, force=force)
    for warning in report.warnings:
        click.secho(f"potluck: WARNING: {warning}", err=True, fg="red", bold=True)
    checked = "results verified" if report.results_verified else "results not hash-checked"
    click.echo(
        f"{len(report.changed)} changed, {len(report.added)} added, {len(report.removed)} "
        f"removed; {checked} → {report.out_path}"
    )


def _render_info(info: dict[str, Any]) -> None:
    click.echo(f"patch {info['path']}: {_fmt_bytes(info['size'])}, base {info['base_digest'][:16]}")
    for name, t in info["tensors"].items():
        err = t["error"]
        text = "exact" if err is None else f"rel.err {err['relative_error']:.3g}"
        params = ",".join(f"{k}={v}" for k, v in sorted(t["params"].items()))
        click.echo(f"  {name}: {t['codec']}[{params}] {_fmt_bytes(t['bytes'])}, {text}")
    for name in info["removed"]:
        click.echo(f"  {name}: removed")
    click.echo(
        f"{_fmt_bytes(info['full_bytes'])} of changed tensors, "
        f"compression {info['compression_ratio']:.1f}x"
    )
    if info["description"]:
        click.echo(f"description: {json.dumps(info['description'], sort_keys=True)}")


@patch.command("info")
@click.argument("patch_file", metavar="PATCH", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@handle_errors
def info_cmd(patch_file: str, as_json: bool) -> None:
    """Show what PATCH changes: codecs, sizes, errors and the base it needs."""
    info = patch_info(patch_file)
    if as_json:
        click.echo(json.dumps(info, indent=2, sort_keys=True))
    else:
        _render_info(info)

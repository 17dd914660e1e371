"""``potluck stats fisher|gram``: per-model statistics for data-aware merges (Fisher, RegMean)."""

from __future__ import annotations

from typing import Any

import click

from potluck.cli.main import cli, handle_errors
from potluck.cli.render import echo, emit_json


@cli.group()
def stats() -> None:
    """Compute statistics files for 'fisher' and 'regmean' merges (needs torch + transformers)."""


def _options(fn: Any) -> Any:
    fn = click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")(fn)
    fn = click.option(
        "--device", default="cpu", show_default=True, help="torch device (cpu, cuda, cuda:1, mps)."
    )(fn)
    fn = click.option(
        "--max-length", type=int, default=512, show_default=True, help="JSONL: truncate to."
    )(fn)
    fn = click.option("--batch-size", type=int, default=8, show_default=True)(fn)
    fn = click.option("--max-samples", type=int, help="Use at most N examples of the data.")(fn)
    fn = click.option(
        "-o", "--output", "out", required=True, type=click.Path(dir_okay=False), help="Stats file."
    )(fn)
    fn = click.option(
        "--data",
        required=True,
        type=click.Path(exists=True, dir_okay=False),
        help='.jsonl ({"text": …, "label": int?} per line) or .npz (input_ids, attention_mask, '
        "labels?).",
    )(fn)
    return click.argument("model", type=click.Path(exists=True, file_okay=False))(fn)


def _run(kind: str, model: str, data: str, out: str, as_json: bool, **kw: Any) -> None:
    from potluck.ops.merge.stats_torch import compute_stats

    summary = compute_stats(kind, model, data, out, **kw)
    if as_json:
        emit_json(summary)
        return
    echo(
        f"{summary['kind']} statistics of {summary['tensors']} tensors ({summary['task']}) on "
        f"{summary['samples']} samples, {summary['tokens']} tokens → {summary['path']}"
    )


@stats.command("fisher")
@_options
@handle_errors
def fisher_cmd(model: str, data: str, out: str, as_json: bool, **kw: Any) -> None:
    """Empirical diagonal Fisher of MODEL (a Hugging Face model directory) on --data."""
    _run("fisher", model, data, out, as_json, **kw)


@stats.command("gram")
@_options
@click.option(
    "--embeddings",
    is_flag=True,
    help="Also count each embedding row's lookups (a diagonal Gram), so RegMean merges "
    "embeddings by usage instead of averaging them.",
)
@handle_errors
def gram_cmd(model: str, data: str, out: str, as_json: bool, **kw: Any) -> None:
    """Gram matrices XᵀX of every linear layer's inputs of MODEL on --data (for RegMean)."""
    _run("gram", model, data, out, as_json, **kw)

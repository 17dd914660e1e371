"""``potluck merge``: merge models from a mergekit YAML file, or from flags for quick use."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from potluck.cli.commands import json_opt
from potluck.cli.main import cli, handle_errors
from potluck.cli.progress import byte_progress
from potluck.cli.render import echo, emit_json
from potluck.errors import UserError
from potluck.git.models import open_model
from potluck.ops.merge import (
    MergeConfig,
    MergePlan,
    add_exclusions,
    explain_merge,
    load_config,
    parse_config,
    run_merge,
)
from potluck.ops.models import DEFAULT_SHARD_BYTES, parse_size


def _value(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


def _flag_config(
    method: str, base: str | None, models: tuple[str, ...], params: tuple[str, ...],
    weights: str | None, seed: int, dtype: str | None, lines: str | None = None,
) -> tuple[MergeConfig, str]:  # fmt: skip
    import yaml

    entries: list[dict[str, Any]] = [{"model": m} for m in models]
    if weights is not None:
        ws = [float(w) for w in weights.split(",")]
        if len(ws) != len(models):
            raise UserError(f"--weights has {len(ws)} values for {len(models)} models")
        for e, w in zip(entries, ws, strict=True):
            e["parameters"] = {"weight": w}
    data: dict[str, Any] = {"merge_method": method, "models": entries, "seed": seed}
    if base:
        data["base_model"] = base
    if dtype:
        data["dtype"] = dtype
    pairs = {}
    for p in params:
        key, eq, value = p.partition("=")
        if not eq or not key:
            raise UserError(f"bad -p {p!r}", hint="write -p name=value, e.g. -p density=0.2")
        pairs[key.strip()] = _value(value)
    if lines is not None:
        pairs["lines"] = _lines(lines)
    if pairs:
        data["parameters"] = pairs
    return parse_config(data, where="flags"), yaml.safe_dump(data, sort_keys=False)


def _lines(text: str) -> dict[str, float]:
    """``--lines ALPHA,BETA`` → the ``lines: {alpha, beta}`` mapping (LiNeS)."""
    parts = text.split(",")
    try:
        alpha, beta = (float(x) for x in parts)
    except ValueError:
        raise UserError(
            f"--lines {text!r}: expected two numbers ALPHA,BETA", hint="e.g. --lines 0.5,1.0"
        ) from None
    return {"alpha": alpha, "beta": beta}


def _render_plan(plan: MergePlan) -> None:
    echo(f"method {plan.method.name} ({plan.method.reference_url}), {len(plan.jobs)} tensors")
    for note in plan.notes:
        echo(f"note: {note}")
    for j in plan.jobs:
        if j.carried:
            echo(f"{j.out.name} {j.out.dtype}{list(j.out.shape)} carried unmerged from "
                 f"{Path(j.models[0][0]).name} (a buffer)")  # fmt: skip
            continue
        params = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in sorted(j.params.items()))  # fmt: skip
        weights = "" if j.weights is None else " weights=" + ",".join(f"{w:g}" for w in j.weights)
        base = "" if j.base is None else f" base={j.base[1]}"
        inputs = " + ".join(f"{Path(m).name}:{n}" if n != j.out.name else Path(m).name
                            for m, n in j.models)  # fmt: skip
        echo(f"{j.out.name} {j.out.dtype}{list(j.out.shape)} t={j.t:.3g} "
                   f"{params}{weights}{base} ← {inputs}")  # fmt: skip


@cli.command()
@click.argument("args", nargs=-1)
@click.option("--method", help="Flag form: the merge method (then ARGS are the models).")
@click.option("--base", "base", help="Flag form: the base model.")
@click.option("-o", "--output", help="Flag form: the output directory.")
@click.option("-p", "--param", "params", multiple=True, metavar="K=V", help="Flag form: param.")
@click.option("--weights", help="Flag form: per-model weights, comma separated.")
@click.option("--seed", type=int, default=0, show_default=True, help="Flag form: random seed.")
@click.option("--dtype", help="Flag form: dtype (float32, float16, bfloat16).")
@click.option("--lines", metavar="ALPHA,BETA", help="Flag form: LiNeS depth scaling of the update.")
@click.option("--workers", type=int, default=2, show_default=True, help="Worker threads.")
@click.option("--max-memory", help="Bound on working memory, e.g. 2GB (default: none).")
@click.option("--shard-size", default=None, help="Largest output shard (default 5GB).")
@click.option("--explain", is_flag=True, help="Print the per-tensor plan; merge nothing.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output directory.")
@click.option(
    "--exclude-tensors", "exclude", multiple=True, metavar="GLOB",
    help="Leave tensors matching GLOB out of the output (repeatable; reported).",
)  # fmt: skip
@json_opt
@handle_errors
def merge(
    args: tuple[str, ...], method: str | None, base: str | None, output: str | None,
    params: tuple[str, ...], weights: str | None, seed: int, dtype: str | None, workers: int,
    max_memory: str | None, shard_size: str | None, explain: bool, overwrite: bool,
    exclude: tuple[str, ...], as_json: bool, lines: str | None = None,
) -> None:  # fmt: skip
    """Merge models: `potluck merge CONFIG.yaml OUT_DIR` (mergekit YAML), or
    `potluck merge --method ties --base B A1 A2 -o OUT -p density=0.2`.

    Models may be checkpoint files, Hugging Face directories or potluck revisions
    (`model.safetensors@branch`, `dir@v1`).
    """
    if method:
        config, text = _flag_config(method, base, args, params, weights, seed, dtype, lines)
        out = output
    else:
        if not args or len(args) > 2:
            raise UserError("give CONFIG.yaml OUT_DIR, or --method with models and -o OUT")
        if lines is not None:
            raise UserError("--lines is a flag-form option", hint="in YAML: lines: {alpha, beta}")
        config = load_config(args[0])
        text = Path(args[0]).read_text()
        out = args[1] if len(args) > 1 else output
    config, text = add_exclusions(config, text, exclude)
    if explain:
        plan = explain_merge(config, opener=open_model)
        if as_json:
            data = {"method": plan.method.name, "notes": plan.notes,
                    "tensors": [j.to_dict() for j in plan.jobs],
                    **plan.unmerged_dict()}  # fmt: skip
            emit_json(data)  # a closed pipe: cli.main ends quietly
        else:
            _render_plan(plan)
        return
    if not out:
        raise UserError("no output directory", hint="give OUT_DIR (or -o OUT in the flag form)")
    with byte_progress("potluck: merging") as on_bytes:
        report = run_merge(
            config, out, opener=open_model, workers=workers,
            max_memory=None if max_memory is None else parse_size(max_memory),
            max_shard_bytes=DEFAULT_SHARD_BYTES if shard_size is None else parse_size(shard_size),
            overwrite=overwrite, progress=on_bytes, config_text=text,
        )  # fmt: skip
    if as_json:
        emit_json(report.to_dict())
        return
    for note in report.notes:
        echo(f"note: {note}", err=True)
    echo(f"merged {report.tensors} tensors with {report.method} into {report.out_dir} "
               f"({', '.join(report.files)}) in {report.seconds:.1f} s")  # fmt: skip

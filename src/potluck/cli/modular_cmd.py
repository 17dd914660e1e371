"""``potluck experts add|list|show|verify`` and ``potluck compose lock|export|run``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from potluck.cli.main import cli, handle_errors
from potluck.cli.render import echo, emit_json
from potluck.errors import IntegrityError, UserError
from potluck.git.models import open_model
from potluck.ops.compose import (
    AddOptions,
    ExpertRecord,
    add_expert,
    attach_artifact,
    base_mismatches,
    export_mixture,
    find_expert,
    list_experts,
    load_composition,
    lock_manifest,
    mismatch_error,
    write_lock,
)
from potluck.ops.compose import verify_library as verify_experts
from potluck.ops.patch import read_patch

_LIB = click.option(
    "-L",
    "--library",
    default="experts",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Expert library directory.",
)
_JSON = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")


def _emit(data: Any, as_json: bool, text: str) -> None:
    if as_json:
        emit_json(data)
    else:
        echo(text)


def _pairs(items: tuple[str, ...], what: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not key.strip():
            raise UserError(f"invalid {what} {item!r}", hint=f"use --{what} NAME=NUMBER")
    return out


def _line(r: ExpertRecord) -> str:
    arts = ",".join(sorted(r.meta.get("artifacts", {}))) or "-"
    tags = ",".join(r.meta.get("tags", [])) or "-"
    return f"{r.ref}\t{r.meta.get('kind')}\t{r.sha256[:12]}\ttags={tags}\tartifacts={arts}"


@cli.group()
def experts() -> None:
    """A library of versioned experts (low-rank / (IA)³ patches of a pinned base)."""


@experts.command("add")
@click.argument("source", type=click.Path(exists=True))
@_LIB
@click.option("--name", required=True, help="Expert name.")
@click.option("--version", "version", required=True, help="Version (dot-separated integers).")
@click.option("--base", help="Base model (checked; needed to import a PEFT adapter directory).")
@click.option("--tag", "tags", multiple=True, help="Task tag (repeatable).")
@click.option("--license", "license_", help="License of the expert.")
@click.option("--description", help="Free-text description.")
@click.option("--eval", "evals", multiple=True, help="Eval result NAME=VALUE (repeatable).")
@click.option("--arrow", is_flag=True, help="Compute Arrow prototypes (LoRA experts).")
@click.option(
    "--gates",
    type=click.Path(exists=True, dir_okay=False),
    help="PHATGOOSE gates: safetensors, one [in] vector per adapted weight.",
)
@_JSON
@handle_errors
def add_cmd(
    source: str,
    library: str,
    name: str,
    version: str,
    base: str | None,
    tags: tuple[str, ...],
    license_: str | None,
    description: str | None,
    evals: tuple[str, ...],
    arrow: bool,
    gates: str | None,
    as_json: bool,
) -> None:
    """Add SOURCE (a potluck patch or a PEFT adapter directory) as NAME@VERSION."""
    opts = AddOptions(list(tags), license_, description, _pairs(evals, "eval"), arrow, gates)
    if base is not None and not Path(source).is_dir():
        with open_model(base) as src:
            rec = add_expert(library, source, name, version, base=src, options=opts)
    else:
        rec = add_expert(library, source, name, version, base=base, options=opts)
    _emit(rec.summary(), as_json, f"added {_line(rec)}")


@experts.command("list")
@_LIB
@_JSON
@handle_errors
def list_cmd(library: str, as_json: bool) -> None:
    """List every expert version in the library."""
    recs = list_experts(library)
    _emit([r.summary() for r in recs], as_json, "\n".join(_line(r) for r in recs))


@experts.command("show")
@click.argument("ref")
@_LIB
@_JSON
@handle_errors
def show_cmd(ref: str, library: str, as_json: bool) -> None:
    """Show the newest expert matching REF (name or name@constraint)."""
    rec = find_expert(library, ref)
    text = json.dumps(rec.meta, indent=2, sort_keys=True)
    _emit(rec.summary(), as_json, f"{rec.ref} ({rec.path})\n{text}")


@experts.command("train-gate")
@click.argument("ref")
@_LIB
@click.option(
    "--base",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="Base model directory (with its tokenizer).",
)
@click.option(
    "--data",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help='JSON lines {"text": …, "label": …} (no label: causal-LM loss).',
)
@click.option("--model-class", default="AutoModelForSequenceClassification", show_default=True)
@click.option("--steps", default=100, show_default=True, type=click.IntRange(min=1))
@click.option("--lr", default=1e-2, show_default=True, type=float)
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--replace", is_flag=True, help="Overwrite an existing gates artifact.")
@_JSON
@handle_errors
def train_gate_cmd(
    ref: str,
    library: str,
    base: str,
    data: str,
    model_class: str,
    steps: int,
    lr: float,
    batch_size: int,
    replace: bool,
    as_json: bool,
) -> None:
    """Train REF's PHATGOOSE gates on its own data (base and expert frozen) and store them."""
    from potluck.ops.compose.runtime import load_model, load_tokenizer, text_batches, train_gates

    rec = find_expert(library, ref)
    rows = _jsonl(data)
    with open_model(base) as src:
        bad = base_mismatches(read_patch(rec.patch_path).base, src, {})
    if bad:
        raise mismatch_error(rec.ref, bad)
    model = load_model(base, model_class)
    batches = text_batches(load_tokenizer(base), rows, batch_size)
    gates = train_gates(model, rec, batches, steps=steps, lr=lr)
    rec = attach_artifact(rec, "phatgoose", gates, replace=replace)
    _emit(
        rec.summary(),
        as_json,
        f"{rec.ref}: {len(gates)} gate(s) trained on {len(rows)} example(s), {steps} step(s)",
    )


def _jsonl(path: str) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(Path(path).read_text("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict) or "text" not in row:
            raise UserError(
                f"{path}:{n}: not a JSON object with a 'text'",
                hint='one {"text": …, "label": …} per line',
            )
        rows.append(row)
    if not rows:
        raise UserError(f"{path}: no examples", hint="add JSON lines")
    return rows


@experts.command("verify")
@click.argument("refs", nargs=-1)
@_LIB
@click.option("--base", help="Also check every expert's pinned base tensors against this model.")
@_JSON
@handle_errors
def verify_cmd(refs: tuple[str, ...], library: str, base: str | None, as_json: bool) -> None:
    """Check hashes, base match and artifact freshness (exit 3 on any problem)."""
    if base is not None:
        with open_model(base) as src:
            problems = verify_experts(library, base=src, refs=refs)
    else:
        problems = verify_experts(library, refs=refs)
    data = [{"expert": p.expert, "problem": p.message} for p in problems]
    n = len(refs) or len(list_experts(library))
    _emit(
        {"ok": not problems, "problems": data},
        as_json,
        "\n".join(f"{p.expert}: {p.message}" for p in problems) or f"{n} expert(s) ok",
    )
    if problems:
        sys.exit(IntegrityError.exit_code)


@cli.group()
def compose() -> None:
    """Compose a base with experts: manifests, lockfiles, fixed mixtures, routed runs."""


@compose.command("lock")
@click.argument("manifest", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False),
    help="Lockfile (default: MANIFEST with the suffix .lock).",
)
@_JSON
@handle_errors
def lock_cmd(manifest: str, output: str | None, as_json: bool) -> None:
    """Resolve MANIFEST's experts to exact hashes and write the lockfile."""
    out = output or str(Path(manifest).with_suffix(".lock"))
    lock = lock_manifest(manifest, open_base=open_model, lock_dir=Path(out).parent)
    write_lock(out, lock)
    names = ", ".join(f"{e['name']}@{e['version']}" for e in lock["experts"])
    _emit(lock, as_json, f"locked {names} → {out}")


@compose.command("export")
@click.argument("source", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False))
@click.option("--weight", "weights", multiple=True, help="NAME=W (default: static or uniform).")
@click.option(
    "--all-modules",
    is_flag=True,
    help="Mix every module the experts adapt, not only those router.layers selects.",
)
@_JSON
@handle_errors
def export_cmd(
    source: str, output: str, weights: tuple[str, ...], all_modules: bool, as_json: bool
) -> None:
    """Write a fixed mixture of SOURCE's experts (manifest or lock) as one ordinary patch."""
    comp = load_composition(source, open_base=open_model)
    info = export_mixture(
        comp, output, _pairs(weights, "weight") if weights else None, all_modules=all_modules
    )
    mix = ", ".join(f"{k}={v:g}" for k, v in sorted(info["weights"].items()))
    left = info["left_out"]
    if left and not as_json:
        shown = ", ".join(left[:4]) + (f" and {len(left) - 4} more" if len(left) > 4 else "")
        echo(
            f"note: left out {len(left)} expert tensor(s) outside router.layers "
            f"{info['layers']}: {shown} (--all-modules mixes them too)",
            err=True,
        )
    _emit(info, as_json, f"{len(info['tensors'])} tensor(s), {mix} → {output}")


@compose.command("run")
@click.argument("source", type=click.Path(exists=True, dir_okay=False))
@click.option("--input", "inputs", multiple=True, help="Input text (repeatable).")
@click.option("--task", "tasks", multiple=True, help="Task name per input (oracle router).")
@_JSON
@handle_errors
def run_cmd(source: str, inputs: tuple[str, ...], tasks: tuple[str, ...], as_json: bool) -> None:
    """Run SOURCE (manifest or lock) on TEXTS; print outputs and the experts each one used."""
    if not inputs:
        raise UserError("no inputs", hint="pass --input TEXT (repeatable)")
    if tasks and len(tasks) != len(inputs):
        raise UserError("give one --task per --input", hint="or none")
    from potluck.ops.compose.runtime import compose as build
    from potluck.ops.compose.runtime import load_tokenizer, run_texts

    comp = load_composition(source, open_base=open_model)
    composed = build(comp, open_base=open_model)
    tok = load_tokenizer(comp.base)
    results = run_texts(composed, tok, list(inputs), list(tasks) or None)
    lines = []
    for r in results:
        used = ", ".join(
            f"{k} {v:.2f}" for k, v in sorted(r["experts"].items(), key=lambda t: -t[1])
        )
        lines.append(f"{r['input']!r}: {json.dumps(r['output'])}  experts: {used}")
    _emit(results, as_json, "\n".join(lines))


@experts.command("rebase")
@click.argument("ref")
@_LIB
@click.option("--onto", required=True, help="The new base (path or PATH@REV).")
@click.option("--version", "version", required=True, help="Version of the rebased expert.")
@click.option("--old-base", help="The expert's base (default: found by its pinned hashes).")
@click.option("--method", default="ta", show_default=True, help="Merge method (ta, ties, …).")
@click.option("--param", "params", multiple=True, help="Method parameter NAME=VALUE.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for random methods.")
@_JSON
@handle_errors
def rebase_cmd(
    ref: str,
    library: str,
    onto: str,
    version: str,
    old_base: str | None,
    method: str,
    params: tuple[str, ...],
    seed: int,
    as_json: bool,
) -> None:
    """Port expert REF to a new base version; adds it as NAME@VERSION (see patch rebase)."""
    from potluck.cli.patch_cmd import parse_method_params
    from potluck.git.lineage import rebase_expert_in_repo

    rec, report = rebase_expert_in_repo(
        library, ref, onto, version, old_base=old_base, method=method,
        params=parse_method_params(params), seed=seed,
    )  # fmt: skip
    conflicts = [t.name for t in report.conflicts]
    _emit(
        {**rec.summary(), "conflicts": conflicts, "method": report.method},
        as_json,
        f"added {_line(rec)} ({len(conflicts)} conflict(s) resolved by {report.method})",
    )

"""``potluck peft apply|import|export``: PEFT adapters without peft installed."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import click

from potluck.cli.main import cli, handle_errors
from potluck.cli.render import echo, emit_json
from potluck.ops.peft import apply_adapter, export_patch, import_adapter


def _emit(data: dict[str, Any], as_json: bool, text: str) -> None:
    if as_json:
        emit_json(data)
    else:
        echo(text)


@cli.group()
def peft() -> None:
    """Merge, import and export PEFT (LoRA, DoRA, (IA)³) adapters; peft is not needed."""


@peft.command("apply")
@click.argument("base_dir", type=click.Path(exists=True))
@click.argument("adapter_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("out_dir", type=click.Path())
@click.option("--base-ref", help="Base model name for the model card (default: from the adapter).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@handle_errors
def apply_cmd(
    base_dir: str, adapter_dir: str, out_dir: str, base_ref: str | None, as_json: bool
) -> None:
    """Merge ADAPTER_DIR into BASE_DIR like peft's merge_and_unload(); write OUT_DIR."""
    report = apply_adapter(base_dir, adapter_dir, out_dir, base_ref=base_ref)
    text = (
        f"{report.peft_type}: {len(report.changed)} tensor(s) changed in "
        f"{len(report.files)} file(s), {len(report.copied)} file(s) copied → {report.out_dir}"
    )
    _emit(asdict(report), as_json, text)


@peft.command("import")
@click.argument("adapter_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--base", "base", required=True, type=click.Path(exists=True), help="Base model.")
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@handle_errors
def import_cmd(adapter_dir: str, base: str, out: str, as_json: bool) -> None:
    """Turn ADAPTER_DIR into a potluck patch of --base (LoRA stays low-rank)."""
    report = import_adapter(adapter_dir, base, out)
    counts: dict[str, int] = {}
    for codec in report.codecs.values():
        counts[codec] = counts.get(codec, 0) + 1
    used = ", ".join(f"{c}: {n}" for c, n in sorted(counts.items()))
    text = f"{report.peft_type} adapter → {report.path} ({report.size} bytes; {used})"
    _emit(asdict(report), as_json, text)


@peft.command("export")
@click.argument("patch_file", metavar="PATCH", type=click.Path(exists=True, dir_okay=False))
@click.argument("out_dir", type=click.Path())
@click.option("--base-model", help="base_model_name_or_path to record in adapter_config.json.")
@click.option(
    "--fan-in-fan-out", is_flag=True, help="The base stores weights [in, out] (GPT-2 Conv1D)."
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@handle_errors
def export_cmd(
    patch_file: str, out_dir: str, base_model: str | None, fan_in_fan_out: bool, as_json: bool
) -> None:
    """Write the low-rank PATCH as a PEFT LoRA adapter directory OUT_DIR."""
    report = export_patch(
        patch_file, out_dir, base_model=base_model, fan_in_fan_out=fan_in_fan_out or None
    )
    text = f"LoRA adapter, {len(report.modules)} module(s), r={report.r} → {report.out_dir}"
    _emit(asdict(report), as_json, text)

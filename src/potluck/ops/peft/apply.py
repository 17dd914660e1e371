"""Merge a PEFT adapter into its base without peft: ``apply_adapter(base_dir, adapter_dir,
out_dir)`` writes what ``PeftModel.from_pretrained(base, adapter).merge_and_unload()`` gives,
computed in numpy in peft's operation order (bit-identical for float32 bases; see
``potluck.ops.peft.arithmetic``), as a model directory with the base's layout (same safetensors
files, tensor order and ``__metadata__``, index, and the files ``sources.layout_files`` says
travel with a model: config, tokenizer, a sentence-transformers layout) and a model card.
Everything is written to a temporary directory renamed into place at the end.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from potluck.errors import UserError
from potluck.fileio import atomic_dir, file_sha256
from potluck.formats import scan_file
from potluck.formats.safetensors import build_header
from potluck.ops.lineage import (
    Edge,
    Parent,
    plan_edge,
    record_output,
    weights_digest_of,
    with_card_lineage,
)
from potluck.ops.models.sources import ModelSource, copy_layout, open_path
from potluck.ops.peft.adapter import (
    AdapterPlan,
    check_float,
    merged,
    plan_adapter,
)
from potluck.tensors.dtypes import from_numpy

__all__ = ["PeftApplyReport", "apply_adapter", "card"]


@dataclass
class PeftApplyReport:
    """What ``apply_adapter`` wrote."""

    out_dir: str
    peft_type: str
    files: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)


def _base_root(base: ModelSource) -> Path:
    p = Path(base.label)
    return p if p.is_dir() else p.parent


def _file_specs(base: ModelSource) -> dict[str, list[tuple[str, str, tuple[int, ...]]]]:
    files: dict[str, list[tuple[str, str, tuple[int, ...]]]] = {}
    for name in base.names():
        fname = base.files[name]
        if not fname.endswith(".safetensors"):
            raise UserError(
                f"{base.label}: weights file {fname!r} is not safetensors",
                hint="peft apply writes the base's safetensors layout; convert the base first",
            )
        info = base.infos[name]
        files.setdefault(fname, []).append((name, info.dtype, info.shape))
    return files


def _write_file(
    path: Path,
    specs: list[tuple[str, str, tuple[int, ...]]],
    metadata: dict[str, str] | None,
    arrays: Iterator[np.ndarray],
) -> None:
    with path.open("wb") as f:
        f.write(build_header(specs, metadata))
        for (name, dtype, shape), arr in zip(specs, arrays, strict=True):
            if from_numpy(arr.dtype) != dtype or tuple(arr.shape) != shape:
                raise UserError(f"tensor {name!r} changed dtype or shape while merging")
            f.write(np.ascontiguousarray(arr).tobytes())


def _index_files(base: ModelSource) -> list[Path]:
    """The base directory's safetensors shard index (the output keeps the base's shards)."""
    label = Path(base.label)
    index = label / "model.safetensors.index.json"
    return [index] if label.is_dir() and index.is_file() else []


def _yaml(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a JSON string is a valid YAML scalar


def card(base_ref: str, adapter_ref: str, plan: AdapterPlan, adapter_sha256: str) -> str:
    """The output's ``README.md``: Hugging Face front matter and what was merged."""
    cfg = plan.config
    kind = "ia3" if cfg.peft_type == "IA3" else ("dora" if cfg.use_dora else "lora")
    return "\n".join(
        [
            "---",
            f"base_model: {_yaml(base_ref)}",
            "base_model_relation: finetune",
            "tags:",
            "- potluck",
            "- peft-merged",
            f"- {kind}",
            "---",
            "",
            "# Merged PEFT adapter",
            "",
            f"`{base_ref}` with the {cfg.peft_type} adapter `{adapter_ref}` merged into its "
            "weights by `potluck peft apply` (what peft's `merge_and_unload()` gives).",
            "",
            f"- adapter file sha256: `{adapter_sha256}`",
            f"- adapter base_model_name_or_path: `{cfg.base_model or '-'}`",
            f"- tensors changed: {len(plan.changed())}",
            "",
        ]
    )


def _check_out(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(
            f"{out_dir} exists and is not an empty directory",
            hint="choose a new output directory",
            path=str(out_dir),
        )


def _lineage_edge(base: ModelSource, ref: str, plan: AdapterPlan, sha: str, adapter: str) -> Edge:
    """The output's lineage edge: the base and the adapter's weights, pinned by digest."""
    edge = plan_edge([base], "adapter", plan.config.peft_type, {"adapter_sha256": sha}, [ref])
    pinned = Parent(None, weights_digest_of(plan.adapter_file))
    return replace(edge, parents=(*edge.parents, pinned), refs=(*edge.refs, adapter))


def apply_adapter(
    base_dir: str | os.PathLike[str],
    adapter_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    base_ref: str | None = None,
) -> PeftApplyReport:
    """Merge the PEFT adapter at ``adapter_dir`` into ``base_dir``; write the model to ``out_dir``.

    ``base_ref`` names the base in the model card (default: the adapter's
    ``base_model_name_or_path``, else the base directory's name). Every adapter tensor is
    checked against the base before anything is written; ``out_dir`` must not exist or be empty
    and appears complete or not at all.
    """
    out = Path(out_dir)
    _check_out(out)
    with open_path(base_dir) as base:
        plan = plan_adapter(adapter_dir, base)
        check_float(base, plan)
        files = _file_specs(base)
        root = _base_root(base)
        index = _index_files(base)
        ref = base_ref or plan.config.base_model or Path(base_dir).resolve().name
        sha = file_sha256(plan.adapter_file)
        edge = _lineage_edge(base, ref, plan, sha, str(adapter_dir))
        text = with_card_lineage(card(ref, Path(adapter_dir).resolve().name, plan, sha), edge)
        with atomic_dir(out) as tmp:
            for fname, specs in files.items():
                meta = scan_file(root / fname).metadata or None
                arrays = (merged(plan, base, n) for n, _, _ in specs)
                _write_file(tmp / fname, specs, meta, arrays)
            for p in index:
                shutil.copyfile(p, tmp / p.name)
            copied = [p.name for p in index] + copy_layout(base.config_dir, tmp)
            (tmp / "README.md").write_text(text, encoding="utf-8")
        record_output(out, edge)
    return PeftApplyReport(str(out), plan.config.peft_type, list(files), plan.changed(), copied)

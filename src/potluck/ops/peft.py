"""PEFT interop without peft: merge an adapter into a base, import it as a patch, export a patch.

* ``apply_adapter(base_dir, adapter_dir, out_dir)`` writes what ``PeftModel.from_pretrained(base,
  adapter).merge_and_unload()`` gives, computed in numpy in peft's operation order (bit-identical
  for float32 bases; see ``potluck.ops.peft_merge``), as a model directory with the base's
  layout (same safetensors files and tensor order, index, config/tokenizer files) and a model
  card. Everything is written to a temporary directory renamed into place at the end.
* ``import_adapter(adapter_dir, base, out_patch)`` writes a potluck patch pinned to the base's
  tensor hashes: LoRA factors stay low-rank (``lowrank`` payloads with the scaling folded into
  one factor), (IA)³ vectors become ``ia3`` payloads, DoRA weights and ``modules_to_save``
  copies are stored exactly (``exact_xor`` of the merged tensor).
* ``export_patch`` lives in ``potluck.ops.peft_export``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from potluck.codecs import CODECS, Payload, get_codec
from potluck.codecs.base import PAYLOAD_VERSION, ErrorReport, error_report, shape_text
from potluck.errors import UserError
from potluck.fileio import atomic_dir, file_sha256
from potluck.formats import scan_file
from potluck.formats.safetensors import build_header
from potluck.ops.patchfile import PatchContents, tensor_sha256, write_patch
from potluck.ops.peft_adapter import ADAPTER_FILES, AdapterPlan, ModuleUpdate, plan_adapter
from potluck.ops.peft_config import CONFIG_NAME
from potluck.ops.peft_merge import dora_merge, ia3_merge, lora_delta, to_f32
from potluck.ops.sources import ModelSource, config_files, open_path
from potluck.tensors.dtypes import from_numpy

__all__ = ["PeftApplyReport", "PeftImportReport", "apply_adapter", "import_adapter", "merged"]

_FLOATS = ("F32", "BF16", "F16")
_WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".npz",
    ".gguf",
    ".h5",
    ".ckpt",
    ".msgpack",
)


@dataclass
class PeftApplyReport:
    """What ``apply_adapter`` wrote."""

    out_dir: str
    peft_type: str
    files: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)


@dataclass
class PeftImportReport:
    """What ``import_adapter`` wrote."""

    path: str
    size: int
    peft_type: str
    codecs: dict[str, str] = field(default_factory=dict)
    base_digest: str = ""


def _check_float(base: ModelSource, plan: AdapterPlan) -> None:
    for name in plan.changed():
        dtype = base.infos[name].dtype
        if dtype not in _FLOATS:
            raise UserError(
                f"base tensor {name!r} is {dtype}; merging supports {', '.join(_FLOATS)} weights",
                hint="peft merges in float32 on CPU; cast the base first",
                tensor=name,
            )


def _weight(upd: ModuleUpdate, w: np.ndarray) -> np.ndarray:
    t = upd.tensors
    if upd.kind == "ia3":
        return ia3_merge(w, t["ia3"], axis=upd.axis)
    delta = lora_delta(t["B"], t["A"], upd.scaling, transpose=upd.transpose)
    if upd.dora:
        return dora_merge(w, delta, t["magnitude"], transpose=upd.transpose)
    if upd.kind == "embedding":  # peft casts the embedding delta to the weight's dtype first
        delta = to_f32(delta.astype(w.dtype))
    out: np.ndarray = to_f32(w) + delta
    return out


def _bias(upd: ModuleUpdate, b: np.ndarray) -> np.ndarray:
    if upd.kind == "ia3":
        out: np.ndarray = to_f32(b) * to_f32(upd.tensors["ia3"])
        return out
    out = to_f32(b) + to_f32(upd.tensors["bias"]) * np.float32(upd.scaling)
    return out


def merged(plan: AdapterPlan, base: ModelSource, name: str) -> np.ndarray:
    """Base tensor ``name`` after ``merge_and_unload()`` (the base tensor when untouched)."""
    orig = plan.replaced[name] if name in plan.replaced else base.read(name)
    if name in plan.updates:
        return _weight(plan.updates[name], orig).astype(orig.dtype)
    if name in plan.biases:
        return _bias(plan.biases[name], orig).astype(orig.dtype)
    return orig


# --------------------------------------------------------------------------------------- apply


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


def _extra_files(base: ModelSource, weights: set[str]) -> list[Path]:
    """Files copied to the output: a directory's other top-level files (config, tokenizer,
    safetensors index; not weights, adapter files or its README), or for a single-file base
    the config/tokenizer files next to it."""
    label = Path(base.label)
    if not label.is_dir():
        return config_files(base.config_dir)
    skip = {"README.md", CONFIG_NAME, *ADAPTER_FILES, *weights, "pytorch_model.bin.index.json"}
    return [
        p
        for p in sorted(label.iterdir())
        if p.is_file()
        and not p.name.startswith(".")
        and p.name not in skip
        and not p.name.endswith(_WEIGHT_SUFFIXES)
    ]


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
        _check_float(base, plan)
        files = _file_specs(base)
        root = _base_root(base)
        extras = _extra_files(base, set(files))
        ref = base_ref or plan.config.base_model or Path(base_dir).resolve().name
        text = card(ref, Path(adapter_dir).resolve().name, plan, file_sha256(plan.adapter_file))
        with atomic_dir(out) as tmp:
            for fname, specs in files.items():
                meta = scan_file(root / fname).metadata or None
                arrays = (merged(plan, base, n) for n, _, _ in specs)
                _write_file(tmp / fname, specs, meta, arrays)
            for p in extras:
                shutil.copyfile(p, tmp / p.name)
            (tmp / "README.md").write_text(text, encoding="utf-8")
    return PeftApplyReport(
        str(out), plan.config.peft_type, list(files), plan.changed(), [p.name for p in extras]
    )


# -------------------------------------------------------------------------------------- import


def _lowrank_payload(b: np.ndarray, a: np.ndarray, base: np.ndarray, exact: np.ndarray) -> Payload:
    """A ``lowrank`` payload with factors ``b`` (m × r) and ``a`` (r × n), no SVD involved;
    its error is measured against ``exact``, the adapter's delta in float64."""
    codec = get_codec("lowrank")
    ct = np.float64 if base.dtype == np.float64 else np.float32
    meta: dict[str, str | int | float] = {
        "version": PAYLOAD_VERSION,
        "shape": shape_text(base.shape),
        "dtype": from_numpy(base.dtype),
        **codec.resolve_params({"rank": max(1, a.shape[0])}),
        "mode": "factors",
        "kept_rank": int(a.shape[0]),
        "randomized": 0,
        "source": "peft",
    }
    arrays = {
        "lora_B": np.ascontiguousarray(b.astype(ct)),
        "lora_A": np.ascontiguousarray(a.astype(ct)),
    }
    kept = a.shape[0] / max(1, min(base.shape))
    error = error_report(exact, arrays["lora_B"] @ arrays["lora_A"], kept)
    return Payload("lowrank", arrays, meta, error)


def _dense_payload(delta: np.ndarray, base: np.ndarray) -> Payload:
    codec = get_codec("lowrank")
    meta: dict[str, str | int | float] = {
        "version": PAYLOAD_VERSION,
        "shape": shape_text(base.shape),
        "dtype": from_numpy(base.dtype),
        **codec.resolve_params({}),
        "mode": "dense",
        "kept_rank": 0,
        "source": "peft",
    }
    arrays = {"delta": np.ascontiguousarray(to_f32(delta).reshape(-1))}
    return Payload("lowrank", arrays, meta, ErrorReport(0.0, 0.0, 1.0))


def _ia3_payload(scales: np.ndarray, axis: int, base: np.ndarray) -> Payload:
    meta: dict[str, str | int | float] = {
        "version": PAYLOAD_VERSION,
        "shape": shape_text(base.shape),
        "dtype": from_numpy(base.dtype),
        "axis": axis,
        "source": "peft",
    }
    l32 = np.ascontiguousarray(to_f32(scales))
    shape = [1] * base.ndim
    shape[axis] = l32.size
    w32, w64 = to_f32(base), base.astype(np.float64)
    approx = w32 * (l32.reshape(shape) - np.float32(1))
    error = error_report(w64 * (l32.astype(np.float64).reshape(shape) - 1), approx, 1.0)
    return Payload("ia3", {"scales": l32}, meta, error)


def _import_weight(upd: ModuleUpdate, w: np.ndarray) -> tuple[Payload, str]:
    t = upd.tensors
    if upd.kind == "ia3":
        return _ia3_payload(t["ia3"], upd.axis, w), "ia3"
    if upd.dora:
        new = _weight(upd, w).astype(w.dtype)
        return get_codec("exact_xor").encode(new, w, name=upd.weight, seed=0), "dora"
    s = np.float32(upd.scaling)
    a32, b32 = to_f32(t["A"]), to_f32(t["B"])
    exact = (b32.astype(np.float64) @ a32.astype(np.float64)) * float(s)
    if upd.transpose:  # Δ = (B A)ᵀ s = (Aᵀ s) Bᵀ
        return _lowrank_payload(a32.T * s, b32.T, w, exact.T), upd.kind + "_t"
    return _lowrank_payload(b32 * s, a32, w, exact), upd.kind


def _import_bias(upd: ModuleUpdate, b: np.ndarray) -> Payload:
    if upd.kind == "ia3":
        return _ia3_payload(upd.tensors["ia3"], 0, b)
    return _dense_payload(to_f32(upd.tensors["bias"]) * np.float32(upd.scaling), b)


def _import_one(plan: AdapterPlan, base: ModelSource, name: str) -> tuple[Payload, str]:
    orig = plan.replaced.get(name)
    w = base.read(name) if orig is None else orig
    if orig is not None and name not in plan.updates and name not in plan.biases:
        return get_codec("exact_xor").encode(orig, base.read(name), name=name, seed=0), "full"
    if orig is not None:  # a replaced weight that is also adapted: store the exact result
        new = merged(plan, base, name)
        return get_codec("exact_xor").encode(new, base.read(name), name=name, seed=0), "full"
    if name in plan.updates:
        return _import_weight(plan.updates[name], w)
    return _import_bias(plan.biases[name], w), "bias"


def import_adapter(
    adapter_dir: str | os.PathLike[str],
    base_path: str | os.PathLike[str],
    out_patch: str | os.PathLike[str],
) -> PeftImportReport:
    """Write a potluck patch equivalent to merging the adapter into ``base_path``.

    The patch pins the sha256 of every base tensor it changes. ``potluck patch apply`` of it
    gives ``apply_adapter``'s weights bit for bit for exactly-coded tensors (DoRA,
    ``modules_to_save``), and within float32 rounding for LoRA factors (the scaling is folded
    into one factor, so ``(s·B) @ A`` is rounded differently from peft's ``(B @ A)·s``) and
    (IA)³ vectors (decoded as ``W + W·(l − 1)``).
    """
    payloads: dict[str, Payload] = {}
    base_hashes: dict[str, str] = {}
    result: dict[str, str] = {}
    kinds: dict[str, str] = {}
    with open_path(base_path) as base:
        plan = plan_adapter(adapter_dir, base)
        _check_float(base, plan)
        for name in plan.changed():
            payload, kind = _import_one(plan, base, name)
            payloads[name], kinds[name] = payload, kind
            base_hashes[name] = tensor_sha256(base.read(name))
            if CODECS.get(payload.codec).exact:
                result[name] = tensor_sha256(merged(plan, base, name))
    desc = {
        "source": "peft",
        "peft_type": plan.config.peft_type,
        "adapter_sha256": file_sha256(plan.adapter_file),
        "base_model": plan.config.base_model,
        "peft_kinds": kinds,
    }
    contents = PatchContents(payloads, base_hashes, result, [], [], desc)
    size = write_patch(out_patch, contents)
    codecs = {n: p.codec for n, p in payloads.items()}
    return PeftImportReport(
        str(out_patch), size, plan.config.peft_type, codecs, contents.base_digest
    )

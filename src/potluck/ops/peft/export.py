"""Write a potluck low-rank patch as a PEFT LoRA adapter (``adapter_config.json`` +
``adapter_model.safetensors``) that ``PeftModel.from_pretrained`` loads.

Every changed tensor must be a ``lowrank`` payload: factors of a 2-D ``<module>.weight``
(Linear ``[out, in]``; ``[in, out]`` Conv1D with ``fan_in_fan_out``; embeddings when the patch
was imported from peft and says so), or a dense 1-D ``<module>.bias`` delta of a module that
also has factors (exported with ``lora_bias``, which needs every module to have one). The
scaling is 1 for every module: ``lora_alpha = r`` globally and per module through
``rank_pattern`` / ``alpha_pattern`` (keys are the escaped full module names). Anything else
(other codecs, added or removed tensors, 1-D deltas without factors) is a ``UserError`` naming
the tensor.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from potluck.codecs import Payload, payload_shape_dtype
from potluck.errors import UserError
from potluck.fileio import atomic_dir
from potluck.formats.safetensors import build_header, canonical_order
from potluck.ops.patch.fileformat import read_patch
from potluck.tensors.dtypes import from_numpy

__all__ = ["PeftExportReport", "export_patch"]

PREFIX = "base_model.model."
_HINT = "only low-rank patches (codec lowrank, e.g. from `potluck peft import`) export to LoRA"


@dataclass
class PeftExportReport:
    """What ``export_patch`` wrote."""

    out_dir: str
    r: int
    modules: list[str] = field(default_factory=list)
    ranks: dict[str, int] = field(default_factory=dict)
    skipped_zero: list[str] = field(default_factory=list)
    lora_bias: bool = False
    fan_in_fan_out: bool = False


@dataclass
class _Module:
    name: str
    kind: str  # "lora", "lora_t" (Conv1D) or "embedding_t"
    a: np.ndarray  # peft lora_A  [r, in]
    b: np.ndarray  # peft lora_B  [out, r]
    bias: np.ndarray | None = None


def _refuse(name: str, why: str) -> UserError:
    return UserError(f"cannot export {name!r} to a LoRA adapter: {why}", hint=_HINT, tensor=name)


def _factors(name: str, p: Payload) -> tuple[np.ndarray, np.ndarray] | None:
    """(lora_B, lora_A) of a 2-D low-rank payload; None when its rank is 0."""
    shape, _ = payload_shape_dtype(p)
    if p.codec != "lowrank" or p.meta.get("mode") != "factors":
        raise _refuse(name, f"codec {p.codec} ({p.meta.get('mode', '-')}) is not low-rank")
    if len(shape) != 2:
        raise _refuse(name, f"a {len(shape)}-D tensor has no LoRA layout")
    b, a = p.arrays.get("lora_B"), p.arrays.get("lora_A")
    if b is None or a is None or b.shape[0] != shape[0] or a.shape[1] != shape[1]:
        raise _refuse(name, "malformed lowrank payload")
    return None if a.shape[0] == 0 else (b, a)


def _module(name: str, p: Payload, kind: str) -> _Module | None:
    fac = _factors(name, p)
    if fac is None:
        return None
    b, a = fac  # Δ = b @ a in the weight's own layout
    module = name[: -len(".weight")]
    if kind == "lora":
        return _Module(module, kind, a, b)
    return _Module(module, kind, np.ascontiguousarray(b.T), np.ascontiguousarray(a.T))


def _collect(
    payloads: dict[str, Payload], kinds: dict[str, str], fifo: bool
) -> tuple[dict[str, _Module], list[str]]:
    modules: dict[str, _Module] = {}
    zero: list[str] = []
    for name in sorted(payloads):
        if not name.endswith(".weight"):
            continue
        kind = kinds.get(name, "lora_t" if fifo else "lora")
        if kind not in ("lora", "lora_t", "embedding_t"):
            raise _refuse(name, f"it was imported from a {kind} update, not a LoRA")
        mod = _module(name, payloads[name], kind)
        if mod is None:
            zero.append(name)
        else:
            modules[mod.name] = mod
    for name in sorted(payloads):
        if name.endswith(".weight"):
            continue
        p, module = payloads[name], name.rpartition(".")[0]
        if not name.endswith(".bias") or p.codec != "lowrank" or p.meta.get("mode") != "dense":
            raise _refuse(name, f"codec {p.codec} is not a low-rank weight or a bias delta")
        if module not in modules or modules[module].kind == "embedding_t":
            raise _refuse(name, "a bias delta exports only with LoRA factors of its module")
        modules[module].bias = np.ascontiguousarray(p.arrays["delta"])
    return modules, zero


def _config(modules: dict[str, _Module], base_model: str, fifo: bool, bias: bool) -> dict[str, Any]:
    ranks = {m: mod.a.shape[0] for m, mod in modules.items()}
    r = max(ranks.values())
    pattern = {re.escape(m): k for m, k in sorted(ranks.items()) if k != r}
    return {
        "alpha_pattern": {k: float(v) for k, v in pattern.items()},
        "base_model_name_or_path": base_model or None,
        "bias": "none",
        "fan_in_fan_out": fifo,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": float(r),
        "lora_bias": bias,
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": r,
        "rank_pattern": pattern,
        "revision": None,
        "target_modules": sorted(modules),
        "task_type": None,
        "use_dora": False,
        "use_rslora": False,
    }


def _tensors(modules: dict[str, _Module]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for m, mod in modules.items():
        key = f"{PREFIX}{m}"
        if mod.kind == "embedding_t":
            out[f"{key}.lora_embedding_A"], out[f"{key}.lora_embedding_B"] = mod.a, mod.b
            continue
        out[f"{key}.lora_A.weight"], out[f"{key}.lora_B.weight"] = mod.a, mod.b
        if mod.bias is not None:
            out[f"{key}.lora_B.bias"] = mod.bias
    return out


def _write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    specs = canonical_order(
        (n, from_numpy(a.dtype), tuple(int(d) for d in a.shape)) for n, a in tensors.items()
    )
    with path.open("wb") as f:
        f.write(build_header(specs, {"format": "pt"}))
        for name, _, _ in specs:
            arr = tensors[name]
            f.write(np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("<"))).tobytes())


def _card(base_model: str, patch: str) -> str:
    front = f"base_model: {json.dumps(base_model)}\n" if base_model else ""
    return (
        f"---\n{front}library_name: peft\ntags:\n- lora\n- potluck\n---\n\n"
        f"# LoRA adapter\n\nExported by `potluck peft export` from the patch `{patch}`.\n"
    )


def export_patch(
    patch_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    base_model: str | None = None,
    fan_in_fan_out: bool | None = None,
) -> PeftExportReport:
    """Write the patch at ``patch_path`` as a PEFT LoRA adapter directory ``out_dir``.

    ``fan_in_fan_out`` (default: from a peft-imported patch's description, else False) says
    the base's 2-D weights are stored ``[in, out]`` (GPT-2 ``Conv1D``). ``base_model`` goes to
    ``base_model_name_or_path`` (default: the one a peft-imported patch recorded).
    """
    patch = read_patch(patch_path)
    if patch.added or patch.removed:
        raise _refuse((patch.added or patch.removed)[0], "LoRA cannot add or remove tensors")
    desc = patch.description
    kinds = desc.get("peft_kinds") if isinstance(desc.get("peft_kinds"), dict) else {}
    modules, zero = _collect(patch.payloads, dict(kinds or {}), bool(fan_in_fan_out))
    if not modules:
        raise UserError(f"{patch_path}: no low-rank tensors to export", hint=_HINT)
    with_bias = [m.bias is not None for m in modules.values() if m.kind != "embedding_t"]
    if any(with_bias) and not all(with_bias):
        missing = next(m for m in modules.values() if m.bias is None and m.kind != "embedding_t")
        raise _refuse(
            f"{missing.name}.bias", "peft's lora_bias applies to every module; this one has none"
        )
    fifo = any(m.kind == "lora_t" for m in modules.values())
    ref = base_model if base_model is not None else str(desc.get("base_model") or "")
    config = _config(modules, ref, fifo, any(with_bias))
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not an empty directory", hint="choose a new one")
    with atomic_dir(out) as tmp:
        text = json.dumps(config, indent=2, sort_keys=True) + "\n"
        (tmp / "adapter_config.json").write_text(text, encoding="utf-8")
        _write_safetensors(tmp / "adapter_model.safetensors", _tensors(modules))
        (tmp / "README.md").write_text(_card(ref, Path(patch_path).name), encoding="utf-8")
    ranks = {m: int(mod.a.shape[0]) for m, mod in modules.items()}
    return PeftExportReport(
        str(out), int(config["r"]), sorted(modules), ranks, zero, any(with_bias), fifo
    )

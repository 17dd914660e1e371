"""Read a PEFT adapter directory and match it against a base model, tensor by tensor.

``plan_adapter(adapter_dir, base)`` reads ``adapter_config.json`` and
``adapter_model.safetensors`` (or ``adapter_model.bin``), groups the tensors by module
(``base_model.model.<module>.lora_A.weight`` …) and checks every one against the base: the
module must be one peft would adapt, its base weight must exist with the matching shape, the
rank must agree with ``r`` / ``rank_pattern``. Anything that would not be applied exactly as
peft applies it is a ``UserError`` naming the key; nothing is ignored silently. The result
says, for every base tensor it changes, how.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from potluck.errors import UserError
from potluck.ops.models.sources import ModelSource, open_path
from potluck.ops.peft.arithmetic import dora_merge, ia3_merge, lora_delta, to_f32
from potluck.ops.peft.config import AdapterConfig, is_feedforward, read_config, targets
from potluck.tensors.dtypes import from_numpy, to_numpy

__all__ = [
    "ADAPTER_FILES",
    "AdapterPlan",
    "ModuleUpdate",
    "check_float",
    "merged",
    "merged_bias",
    "merged_weight",
    "plan_adapter",
    "read_adapter",
]

PREFIX = "base_model.model."
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
#: Suffix of an adapter key → role of the tensor in its module.
_ROLES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_B.bias": "bias",
    ".lora_magnitude_vector": "magnitude",
    ".lora_embedding_A": "emb_A",
    ".lora_embedding_B": "emb_B",
    ".ia3_l": "ia3",
}
_HINT = "the adapter does not fit this base model (wrong base, or a newer peft layout)"


@dataclass
class ModuleUpdate:
    """One adapted module: its LoRA / (IA)³ tensors and how they apply to its base weight."""

    module: str
    kind: str  # "lora", "embedding" or "ia3"
    weight: str
    tensors: dict[str, np.ndarray]
    scaling: float = 1.0
    transpose: bool = False
    dora: bool = False
    axis: int = 0
    bias: str | None = None  # base bias this update also changes (lora_bias, (IA)³)


@dataclass
class AdapterPlan:
    """What an adapter does to a base: module updates and whole-tensor replacements."""

    config: AdapterConfig
    adapter_file: Path
    updates: dict[str, ModuleUpdate] = field(default_factory=dict)  # keyed by base weight
    replaced: dict[str, np.ndarray] = field(default_factory=dict)  # base tensor → new value
    biases: dict[str, ModuleUpdate] = field(default_factory=dict)  # base bias → its module

    def changed(self) -> list[str]:
        """Every base tensor the adapter changes, sorted."""
        return sorted({*self.updates, *self.replaced, *self.biases})


def read_adapter(adapter_dir: str | os.PathLike[str]) -> tuple[Path, dict[str, np.ndarray]]:
    """The adapter's weight file and all its tensors (small: adapters are read whole)."""
    for name in ADAPTER_FILES:
        path = Path(adapter_dir) / name
        if path.is_file():
            with open_path(path) as src:
                return path, {n: np.array(src.read(n)) for n in src.names()}
    raise UserError(
        f"{adapter_dir}: no {' or '.join(ADAPTER_FILES)}",
        hint="point at a directory written by PeftModel.save_pretrained",
    )


def _split(key: str) -> tuple[str, str]:
    """(module, role) of an adapter key; role ``full`` for a whole base tensor."""
    if not key.startswith(PREFIX):
        raise UserError(
            f"adapter tensor {key!r} does not start with {PREFIX!r}",
            hint="only adapters saved by PeftModel.save_pretrained are understood",
            key=key,
        )
    rest = key[len(PREFIX) :]
    for suffix, role in _ROLES.items():
        if rest.endswith(suffix):
            return rest[: -len(suffix)], role
    return rest, "full"


def _mismatch(key: str, what: str, **data: object) -> UserError:
    return UserError(f"adapter tensor {key!r}: {what}", hint=_HINT, key=key, **data)


def _base_info(base: ModelSource, name: str, key: str) -> tuple[int, ...]:
    if name not in base.infos:
        raise _mismatch(key, f"the base has no parameter {name!r}", tensor=name)
    return base.infos[name].shape


def _check_shape(key: str, got: tuple[int, ...], want: tuple[int, ...]) -> None:
    if tuple(got) != tuple(want):
        raise _mismatch(key, f"shape {list(got)} does not fit: expected {list(want)}")


def _lora(
    cfg: AdapterConfig, module: str, t: dict[str, np.ndarray], base: ModelSource
) -> ModuleUpdate:
    embedding = "emb_A" in t or "emb_B" in t
    a_role, b_role = ("emb_A", "emb_B") if embedding else ("A", "B")
    key = f"{PREFIX}{module}"
    for role in (a_role, b_role):
        if role not in t:
            suffix = next(s for s, r in _ROLES.items() if r == role)
            raise _mismatch(key + suffix, "is missing (LoRA needs both A and B)")
    a, b = t[a_role], t[b_role]
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
        raise _mismatch(key, f"A {list(a.shape)} and B {list(b.shape)} are not LoRA factors")
    r = a.shape[0]
    if r != cfg.rank(module):
        raise _mismatch(key, f"rank {r} but adapter_config.json gives {cfg.rank(module)}")
    weight = f"{module}.weight"
    shape = _base_info(base, weight, key)
    transpose = embedding or cfg.fan_in_fan_out
    want = (a.shape[1], b.shape[0]) if transpose else (b.shape[0], a.shape[1])
    if tuple(shape) != want:
        other = "on" if not transpose else "off"
        raise _mismatch(
            key,
            f"LoRA factors give a {list(want)} update but {weight!r} is {list(shape)}"
            + ("" if embedding else f" (does fan_in_fan_out need to be {other}?)"),
            tensor=weight,
        )
    upd = ModuleUpdate(module, "embedding" if embedding else "lora", weight, {"A": a, "B": b})
    upd.scaling, upd.transpose, upd.dora = cfg.scaling(module), transpose, cfg.use_dora
    _lora_extras(cfg, upd, t, base, key)
    return upd


def _lora_extras(
    cfg: AdapterConfig, upd: ModuleUpdate, t: dict[str, np.ndarray], base: ModelSource, key: str
) -> None:
    out_features = upd.tensors["B"].shape[0]
    extra = sorted(set(t) - {"A", "B", "emb_A", "emb_B", "magnitude", "bias"})
    if extra:
        raise _mismatch(key, f"mixes LoRA with {extra[0]} tensors")
    if cfg.use_dora != ("magnitude" in t):
        what = "has no lora_magnitude_vector" if cfg.use_dora else "has a DoRA magnitude"
        raise _mismatch(key, f"{what} but use_dora is {str(cfg.use_dora).lower()}")
    if cfg.use_dora:
        if upd.kind == "embedding":
            raise UserError(f"{key}: DoRA on embeddings is not supported", hint=_HINT, key=key)
        _check_shape(key + ".lora_magnitude_vector", t["magnitude"].shape, (out_features,))
        upd.tensors["magnitude"] = t["magnitude"]
    if cfg.lora_bias != ("bias" in t):
        raise _mismatch(key, f"lora_B.bias presence does not match lora_bias={cfg.lora_bias}")
    if "bias" in t:
        upd.bias = f"{upd.module}.bias"
        _check_shape(key + ".lora_B.bias", _base_info(base, upd.bias, key), (out_features,))
        _check_shape(key + ".lora_B.bias", t["bias"].shape, (out_features,))
        upd.tensors["bias"] = t["bias"]


def _ia3(
    cfg: AdapterConfig, module: str, t: dict[str, np.ndarray], base: ModelSource
) -> ModuleUpdate:
    key = f"{PREFIX}{module}.ia3_l"
    if set(t) != {"ia3"}:
        raise _mismatch(key, "an (IA)³ module has exactly one ia3_l tensor")
    vec = t["ia3"]
    weight = f"{module}.weight"
    shape = _base_info(base, weight, key)
    if len(shape) != 2:
        raise _mismatch(
            key, f"{weight!r} is {len(shape)}-D; only Linear/Conv1D weights are supported"
        )
    ff = is_feedforward(cfg, module)
    out_f, in_f = (shape[1], shape[0]) if cfg.fan_in_fan_out else shape
    _check_shape(key, vec.shape, (1, in_f) if ff else (out_f, 1))
    # rows of W are output channels; fan_in_fan_out (Conv1D, [in, out]) swaps the axes
    axis = int(ff) ^ int(cfg.fan_in_fan_out)
    upd = ModuleUpdate(module, "ia3", weight, {"ia3": vec.reshape(-1)}, axis=axis)
    if not ff and f"{module}.bias" in base.infos:
        upd.bias = f"{module}.bias"
        _check_shape(key, base.infos[upd.bias].shape, (out_f,))
    return upd


def _full_name(cfg: AdapterConfig, rest: str, key: str) -> str:
    if rest.endswith(".base_layer.weight"):
        return rest[: -len(".base_layer.weight")] + ".weight"
    module = rest.rpartition(".")[0]
    if any(re.match(rf"(^|.*\.){m}($|\..*)", module) for m in cfg.modules_to_save):
        return rest
    if cfg.bias != "none" and rest.endswith(".bias"):
        return rest
    raise _mismatch(
        key,
        "is neither a LoRA/(IA)³ tensor nor part of modules_to_save; peft would not load it",
    )


def _group(
    tensors: dict[str, np.ndarray],
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, str]]:
    modules: dict[str, dict[str, np.ndarray]] = {}
    full: dict[str, str] = {}
    for key in sorted(tensors):
        module, role = _split(key)
        if role == "full":
            full[key] = module
        else:
            modules.setdefault(module, {})[role] = tensors[key]
    return modules, full


def plan_adapter(adapter_dir: str | os.PathLike[str], base: ModelSource) -> AdapterPlan:
    """Read the adapter and check it against ``base`` (see the module docstring)."""
    cfg = read_config(adapter_dir)
    path, tensors = read_adapter(adapter_dir)
    plan = AdapterPlan(cfg, path)
    modules, full = _group(tensors)
    for key, rest in full.items():
        name = _full_name(cfg, rest, key)
        _check_shape(key, tensors[key].shape, _base_info(base, name, key))
        want = base.infos[name].dtype
        value = tensors[key]
        plan.replaced[name] = (
            value if from_numpy(value.dtype) == want else value.astype(to_numpy(want))
        )
    for module, t in modules.items():
        key = f"{PREFIX}{module}"
        if not targets(cfg, module):
            raise _mismatch(key, "its module is not selected by target_modules; peft ignores it")
        lora = bool(set(t) & {"A", "B", "emb_A", "emb_B"})
        if (cfg.peft_type == "LORA" and not lora) or (cfg.peft_type == "IA3" and lora):
            raise _mismatch(key, f"does not belong to a {cfg.peft_type} adapter")
        upd = _lora(cfg, module, t, base) if lora else _ia3(cfg, module, t, base)
        _claim(plan, upd)
    return plan


def _claim(plan: AdapterPlan, upd: ModuleUpdate) -> None:
    for name in (upd.weight, upd.bias):
        if name is not None and (name in plan.updates or name in plan.biases):
            raise _mismatch(f"{PREFIX}{upd.module}", f"{name!r} is adapted twice", tensor=name)
    plan.updates[upd.weight] = upd
    if upd.bias is not None:
        plan.biases[upd.bias] = upd


_FLOATS = ("F32", "BF16", "F16")


def check_float(base: ModelSource, plan: AdapterPlan) -> None:
    """A ``UserError`` when a tensor the adapter changes is not a float type peft merges."""
    for name in plan.changed():
        dtype = base.infos[name].dtype
        if dtype not in _FLOATS:
            raise UserError(
                f"base tensor {name!r} is {dtype}; merging supports {', '.join(_FLOATS)} weights",
                hint="peft merges in float32 on CPU; cast the base first",
                tensor=name,
            )


def merged_weight(upd: ModuleUpdate, w: np.ndarray) -> np.ndarray:
    """Base weight ``w`` with the update merged (float32, before casting back)."""
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


def merged_bias(upd: ModuleUpdate, b: np.ndarray) -> np.ndarray:
    """Base bias ``b`` with the update merged (float32, before casting back)."""
    if upd.kind == "ia3":
        out: np.ndarray = to_f32(b) * to_f32(upd.tensors["ia3"])
        return out
    out = to_f32(b) + to_f32(upd.tensors["bias"]) * np.float32(upd.scaling)
    return out


def merged(plan: AdapterPlan, base: ModelSource, name: str) -> np.ndarray:
    """Base tensor ``name`` after ``merge_and_unload()`` (the base tensor when untouched)."""
    orig = plan.replaced[name] if name in plan.replaced else base.read(name)
    if name in plan.updates:
        return merged_weight(plan.updates[name], orig).astype(orig.dtype)
    if name in plan.biases:
        return merged_bias(plan.biases[name], orig).astype(orig.dtype)
    return orig

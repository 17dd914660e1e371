"""``adapter_config.json`` of a PEFT adapter (peft 0.21.2): what changes the merged weights.

``read_config(adapter_dir)`` parses LoRA and (IA)³ configs. Options that change the math and
that potluck reproduces are kept; options that only matter for training are ignored; options
that would change the result in a way potluck does not reproduce (other adapter types, aLoRA,
QALoRA, layer replication, trainable tokens, PiSSA-style initialisations that rewrite the base,
unknown keys with a non-empty value) are a ``UserError`` naming the option.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from potluck.errors import UserError

__all__ = ["AdapterConfig", "pattern_value", "read_config", "targets"]

CONFIG_NAME = "adapter_config.json"

#: Keys that only matter for training, loading or bookkeeping (never for the merged weights).
_IGNORED = frozenset(
    {
        "auto_mapping", "base_model_name_or_path", "revision", "task_type", "inference_mode",
        "peft_version", "lora_dropout", "init_lora_weights", "init_ia3_weights", "eva_config",
        "corda_config", "loftq_config", "megatron_config", "megatron_core", "qalora_group_size",
        "ensure_weight_tying", "layers_pattern", "layers_to_transform", "exclude_modules",
        "target_modules", "feedforward_modules", "modules_to_save", "fan_in_fan_out", "r",
        "lora_alpha", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern", "lora_bias",
        "bias", "peft_type", "target_modules_to_tie", "alora_invocation_tokens",
        "trainable_token_indices", "layer_replication", "target_parameters", "use_qalora",
        "use_bdlora", "arrow_config", "kasa_config", "velora_config", "monteclora_config",
        "lora_ga_config", "enable_lora", "merge_weights",
    }
)  # fmt: skip

#: Options whose presence (a value other than null/false/empty) potluck cannot reproduce.
_UNSUPPORTED = (
    "alora_invocation_tokens", "trainable_token_indices", "layer_replication",
    "target_parameters", "use_qalora", "use_bdlora", "arrow_config", "kasa_config",
    "velora_config", "monteclora_config", "lora_ga_config", "enable_lora",
)  # fmt: skip

#: ``init_lora_weights`` values that rewrite the base weights at initialisation.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")

_HINT = "potluck reproduces LoRA (incl. rsLoRA, DoRA, lora_bias) and (IA)³ adapters"


@dataclass(frozen=True)
class AdapterConfig:
    """The parts of ``adapter_config.json`` that decide how an adapter changes the weights."""

    peft_type: str
    raw: dict[str, Any]
    r: int = 8
    lora_alpha: float = 8.0
    use_rslora: bool = False
    use_dora: bool = False
    lora_bias: bool = False
    fan_in_fan_out: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = None
    modules_to_save: list[str] = field(default_factory=list)
    layers_to_transform: list[int] | None = None
    layers_pattern: list[str] | None = None
    bias: str = "none"

    @property
    def base_model(self) -> str:
        """``base_model_name_or_path`` (empty when absent)."""
        return str(self.raw.get("base_model_name_or_path") or "")

    def rank(self, module: str) -> int:
        """The rank peft gives ``module`` (``rank_pattern``, else ``r``)."""
        return int(pattern_value(self.rank_pattern, module, self.r))

    def scaling(self, module: str) -> float:
        """``lora_alpha / r`` (or ``/ sqrt(r)`` with rsLoRA), per module as peft computes it."""
        r = self.rank(module)
        alpha = float(pattern_value(self.alpha_pattern, module, self.lora_alpha))
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """peft's ``get_pattern_key``: the first key ``k`` with ``(.*\\.)?(k)$`` matching wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _is_empty(value: Any) -> bool:
    return value is None or value is False or value == {} or value == [] or value == ""


def _bad(option: str, value: Any, why: str) -> UserError:
    return UserError(
        f"adapter_config.json: {option}={json.dumps(value)} is not supported ({why})",
        hint=_HINT,
        option=option,
    )


def _names(value: Any, option: str) -> list[str] | str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise _bad(option, value, "expected a string or a list of strings")


def _check_options(raw: dict[str, Any]) -> None:
    for key, value in raw.items():
        if key not in _IGNORED and not _is_empty(value):
            raise _bad(key, value, "unknown option; it may change the weights")
    for key in _UNSUPPORTED:
        if not _is_empty(raw.get(key)):
            raise _bad(key, raw[key], "this variant changes the forward pass")
    init = raw.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise _bad(
            "init_lora_weights",
            init,
            "this initialisation rewrites the base weights; save the adapter with peft's "
            "path_initial_model_for_weight_conversion to get a plain LoRA",
        )


def _number(raw: dict[str, Any], key: str, default: float) -> float:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(key, value, "expected a number")
    return float(value)


def _patterns(raw: dict[str, Any], key: str) -> dict[str, Any]:
    value = raw.get(key) or {}
    if not isinstance(value, dict) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in value.values()
    ):
        raise _bad(key, value, "expected an object of numbers")
    return dict(value)


def _layers(raw: dict[str, Any]) -> tuple[list[int] | None, list[str] | None]:
    layers = raw.get("layers_to_transform")
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if layers is not None and not (
        isinstance(layers, list) and all(isinstance(i, int) for i in layers)
    ):
        raise _bad("layers_to_transform", layers, "expected an int or a list of ints")
    pattern = _names(raw.get("layers_pattern"), "layers_pattern")
    return (layers or None), ([pattern] if isinstance(pattern, str) else pattern) or None


def parse_config(raw: dict[str, Any]) -> AdapterConfig:
    """An ``AdapterConfig`` from the decoded JSON (see the module docstring for what fails)."""
    peft_type = str(raw.get("peft_type", ""))
    if peft_type not in ("LORA", "IA3"):
        raise _bad("peft_type", raw.get("peft_type"), "only LORA and IA3 adapters can be merged")
    _check_options(raw)
    bias = str(raw.get("bias") or "none")
    if bias not in ("none", "all", "lora_only"):
        raise _bad("bias", bias, "expected none, all or lora_only")
    layers, layers_pattern = _layers(raw)
    saved = _names(raw.get("modules_to_save"), "modules_to_save")
    return AdapterConfig(
        peft_type=peft_type,
        raw=raw,
        r=int(_number(raw, "r", 8)),
        lora_alpha=_number(raw, "lora_alpha", 8),
        use_rslora=bool(raw.get("use_rslora", False)),
        use_dora=bool(raw.get("use_dora", False)),
        lora_bias=bool(raw.get("lora_bias", False)),
        fan_in_fan_out=bool(raw.get("fan_in_fan_out", False)),
        rank_pattern={k: int(v) for k, v in _patterns(raw, "rank_pattern").items()},
        alpha_pattern={k: float(v) for k, v in _patterns(raw, "alpha_pattern").items()},
        target_modules=_names(raw.get("target_modules"), "target_modules"),
        exclude_modules=_names(raw.get("exclude_modules"), "exclude_modules"),
        feedforward_modules=_names(raw.get("feedforward_modules"), "feedforward_modules"),
        modules_to_save=[saved] if isinstance(saved, str) else list(saved or []),
        layers_to_transform=layers,
        layers_pattern=layers_pattern,
        bias=bias,
    )


def read_config(adapter_dir: str | os.PathLike[str]) -> AdapterConfig:
    """Read and check ``ADAPTER_DIR/adapter_config.json``."""
    path = Path(adapter_dir) / CONFIG_NAME
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(
            f"{adapter_dir}: no {CONFIG_NAME}",
            hint="point at a directory written by PeftModel.save_pretrained",
        ) from None
    except ValueError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: not a JSON object")
    return parse_config(raw)


def _listed(names: list[str] | str | None, module: str) -> bool:
    """peft's module-list matching: a string is a full regex match, a list a suffix match."""
    if names is None:
        return False
    if isinstance(names, str):
        return re.fullmatch(names, module) is not None
    return module in names or any(module.endswith(f".{n}") for n in names)


def _layer_ok(cfg: AdapterConfig, module: str) -> bool:
    if cfg.layers_to_transform is None:
        return True
    match = None
    if cfg.layers_pattern is None:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    else:
        for pattern in cfg.layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module)
            if match is not None:
                break
    return match is not None and int(match.group("idx")) in cfg.layers_to_transform


def targets(cfg: AdapterConfig, module: str) -> bool:
    """Whether peft puts an adapter layer on ``module`` (``check_target_module_exists``)."""
    if _listed(cfg.exclude_modules, module):
        return False
    if any(re.match(rf"(^|.*\.){m}($|\..*)", module) for m in cfg.modules_to_save):
        return False
    if cfg.target_modules == "all-linear":
        return True  # saved configs list the expanded names; an unexpanded one cannot be checked
    if isinstance(cfg.target_modules, str):
        return _listed(cfg.target_modules, module)
    return _listed(cfg.target_modules, module) and _layer_ok(cfg, module)


def is_feedforward(cfg: AdapterConfig, module: str) -> bool:
    """(IA)³: whether ``module`` scales its input (feed-forward) rather than its output.

    peft's ``_check_target_module_feedforward``: a string is a full regex match, a list a plain
    ``endswith`` (no dot boundary, unlike ``target_modules``).
    """
    names = cfg.feedforward_modules
    if names is None:
        return False
    if isinstance(names, str):
        return re.fullmatch(names, module) is not None
    return any(module.endswith(n) for n in names)

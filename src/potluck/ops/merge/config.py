"""Merge configurations: mergekit's YAML, read as mergekit reads it, plus potluck's extensions.

Keys (https://github.com/arcee-ai/mergekit, ``config.py``): ``merge_method``, ``base_model``,
``models: [{model, parameters}]`` or ``slices: [{sources: [{model, layer_range, parameters}],
base_model?, parameters?}]``, top-level ``parameters``, ``dtype``, ``out_dtype``,
``tokenizer_source``. A parameter value is a scalar, a gradient (a list of numbers interpolated
over the layers: ``t`` = layer / (layers − 1); tensors before the layers use t = 0, after them
t = 1), or a list of ``{filter, value}`` conditions (the first whose ``filter`` is a substring of
the tensor name, or has none, applies). potluck adds ``seed`` (keys the random methods),
``models[].stats`` (a Fisher/Gram statistics file for data-aware methods), ``name`` and
``exclude_tensors`` (fnmatch globs of tensor names left out of the output; mergekit has no such
key).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from potluck.errors import UserError
from potluck.merging.lines import check_lines, lines_scale

__all__ = [
    "MergeConfig",
    "ModelInput",
    "Setting",
    "SliceInput",
    "SliceSpec",
    "add_exclusions",
    "evaluate_setting",
    "load_config",
    "parse_config",
]

Setting = Any  # scalar | list[number] | list[str] | list[{filter?, value}]

_TOP_KEYS = {
    "merge_method",
    "base_model",
    "models",
    "slices",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
    "seed",
    "name",
    "exclude_tensors",
}
#: mergekit keys potluck accepts but does not act on (they do not change the merged tensors).
IGNORED_KEYS = ("chat_template",)
#: ``tokenizer_source`` values that are not a model (see ``ops.merge.tokenizer``).
TOKENIZER_SOURCES = ("union", "base")


@dataclass(frozen=True)
class ModelInput:
    """One ``models:`` entry."""

    model: str
    parameters: dict[str, Setting] = field(default_factory=dict)
    stats: str | None = None


@dataclass(frozen=True)
class SliceInput:
    """One source of an output slice: ``layer_range`` is half-open, as in mergekit."""

    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, Setting] = field(default_factory=dict)


@dataclass(frozen=True)
class SliceSpec:
    """One output slice: its sources (same number of layers each) and optional overrides."""

    sources: tuple[SliceInput, ...]
    base_model: str | None = None
    parameters: dict[str, Setting] = field(default_factory=dict)


@dataclass(frozen=True)
class MergeConfig:
    """A parsed merge configuration (see the module docstring). Paths are as written."""

    merge_method: str
    base_model: str | None = None
    models: tuple[ModelInput, ...] = ()
    slices: tuple[SliceSpec, ...] = ()
    parameters: dict[str, Setting] = field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    pad_to_multiple_of: int | None = None
    seed: int = 0
    name: str | None = None
    ignored: tuple[str, ...] = ()
    exclude_tensors: tuple[str, ...] = ()

    def referenced_models(self) -> list[str]:
        """Every model reference, base first, each once."""
        refs = [self.base_model] if self.base_model else []
        refs += [m.model for m in self.models]
        for s in self.slices:
            refs += [s.base_model] if s.base_model else []
            refs += [src.model for src in s.sources]
        return list(dict.fromkeys(refs))


def load_config(path: str | Path) -> MergeConfig:
    """Read a YAML configuration.

    A relative model path is looked up in the working directory (as mergekit does), then next to
    the configuration file.
    """
    import yaml  # a core dependency, imported where it is used

    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as e:
        raise UserError(f"{p}: cannot read ({e.strerror})") from e
    except yaml.YAMLError as e:
        raise UserError(f"{p}: not valid YAML ({e})", hint="check the indentation") from e
    return parse_config(data, where=str(p), root=p.parent)


def parse_config(data: Any, *, where: str = "config", root: Path | None = None) -> MergeConfig:
    """Validate a configuration mapping (``root`` resolves relative model paths)."""
    if not isinstance(data, Mapping):
        raise UserError(f"{where}: expected a mapping at the top", hint="see docs/merging.md")
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise UserError(
            f"{where}: unknown key(s) {', '.join(unknown)}",
            hint="known keys: " + ", ".join(sorted(_TOP_KEYS)),
            unknown=unknown,
        )
    method = data.get("merge_method")
    if not isinstance(method, str) or not method:
        raise UserError(f"{where}: merge_method is missing", hint="e.g. merge_method: ties")
    has_models, has_slices = bool(data.get("models")), bool(data.get("slices"))
    if has_models == has_slices:
        raise UserError(
            f"{where}: give exactly one of `models` or `slices`",
            hint="`models` merges whole models; `slices` stacks layer ranges",
        )
    ref = _RefResolver(root)
    seed = data.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise UserError(f"{where}: seed must be a non-negative integer, not {seed!r}")
    return MergeConfig(
        merge_method=method,
        base_model=ref(data.get("base_model"), "base_model"),
        models=tuple(_model(m, i, ref, where) for i, m in enumerate(data.get("models") or [])),
        slices=tuple(_slice(s, i, ref, where) for i, s in enumerate(data.get("slices") or [])),
        parameters=_params(data.get("parameters"), f"{where}: parameters"),
        dtype=_opt_str(data.get("dtype"), "dtype", where),
        out_dtype=_opt_str(data.get("out_dtype"), "out_dtype", where),
        **_tokenizer(data, ref, where),
        seed=seed,
        name=_opt_str(data.get("name"), "name", where),
        ignored=tuple(k for k in IGNORED_KEYS if k in data),
        exclude_tensors=_globs(data.get("exclude_tensors"), where),
    )


def _tokenizer(data: Mapping[str, Any], ref: _RefResolver, where: str) -> dict[str, Any]:
    """``tokenizer_source: union | base | MODEL`` or ``tokenizer: {source, pad_to_multiple_of}``
    (mergekit: not both; ``tokens`` overrides are not supported)."""
    source, pad = data.get("tokenizer_source"), None
    if "tokenizer" in data:
        tok = data["tokenizer"]
        if source is not None:
            raise UserError(f"{where}: give tokenizer_source or tokenizer, not both")
        if not isinstance(tok, Mapping) or set(tok) - {"source", "pad_to_multiple_of"}:
            raise UserError(
                f"{where}: tokenizer must be a mapping of source and pad_to_multiple_of, "
                f"not {tok!r}",
                hint="per-token embedding overrides (tokenizer.tokens) are not supported",
            )
        source, pad = tok.get("source", "union"), tok.get("pad_to_multiple_of")
        if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or pad < 1):
            raise UserError(f"{where}: tokenizer.pad_to_multiple_of must be a positive integer")
    source = _opt_str(source, "tokenizer_source", where)
    if source is not None and source not in TOKENIZER_SOURCES:
        source = ref(source, "tokenizer_source")
    return {"tokenizer_source": source, "pad_to_multiple_of": pad}


def _globs(value: Any, where: str) -> tuple[str, ...]:
    """``exclude_tensors``: one glob or a list of them (fnmatch over tensor names)."""
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(g, str) and g for g in items):
        raise UserError(
            f"{where}: exclude_tensors must be a glob or a list of globs, not {value!r}",
            hint="e.g. exclude_tensors: ['*.position_ids']",
        )
    return tuple(dict.fromkeys(items))


def add_exclusions(config: MergeConfig, text: str, globs: Sequence[str]) -> tuple[MergeConfig, str]:
    """``config`` with ``globs`` added to its ``exclude_tensors`` (``--exclude-tensors``), and
    its recorded text with the resulting ``exclude_tensors`` line appended (the last key wins in
    YAML), so the recorded configuration reproduces the merge."""
    if not globs:
        return config, text
    for g in globs:
        if not g:
            raise UserError("--exclude-tensors needs a glob", hint="e.g. '*.position_ids'")
    merged = tuple(dict.fromkeys((*config.exclude_tensors, *globs)))
    line = json.dumps(list(merged))  # a JSON list is a YAML flow sequence
    text = text.rstrip("\n") + f"\n# potluck merge --exclude-tensors\nexclude_tensors: {line}\n"
    return replace(config, exclude_tensors=merged), text


class _RefResolver:
    def __init__(self, root: Path | None) -> None:
        self.root = root

    def __call__(self, value: Any, what: str) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise UserError(f"{what}: a model reference must be a path, not {value!r}")
        path = value.rsplit("@", 1)[0] if "@" in value else value
        if self.root is None or Path(path).is_absolute() or Path(path).exists():
            return value  # as mergekit: relative to the working directory first
        if (self.root / path).exists():
            return str(self.root / value)  # then relative to the configuration file
        return value


def _opt_str(value: Any, key: str, where: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise UserError(f"{where}: {key} must be text, not {value!r}")


def _params(value: Any, where: str) -> dict[str, Setting]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise UserError(f"{where}: expected a mapping of parameter names to values")
    for name, setting in value.items():
        if name == "lines" and isinstance(setting, Mapping):  # LiNeS: {alpha, beta}
            check_lines(setting, f"{where}.{name}")
        else:
            _check_setting(setting, f"{where}.{name}")
    return {str(k): v for k, v in value.items()}


def _check_setting(setting: Setting, where: str) -> None:
    if isinstance(setting, (int, float, str, bool)):
        return
    if isinstance(setting, list) and setting:
        if all(isinstance(e, (int, float, str, bool)) for e in setting):
            return
        for cond in setting:
            if not isinstance(cond, Mapping) or "value" not in cond:
                raise UserError(
                    f"{where}: a list of conditions needs {{filter, value}} entries, got {cond!r}"
                )
            bad = set(cond) - {"filter", "value"}
            if bad:
                raise UserError(f"{where}: unknown key(s) {sorted(bad)} in a condition")
            _check_setting(cond["value"], where)
        return
    raise UserError(
        f"{where}: {setting!r} is not a value, a gradient list or a list of conditions",
        hint="see mergekit's parameter syntax in docs/merging.md",
    )


def _model(entry: Any, i: int, ref: _RefResolver, where: str) -> ModelInput:
    here = f"{where}: models[{i}]"
    if isinstance(entry, str):
        entry = {"model": entry}
    if not isinstance(entry, Mapping) or "model" not in entry:
        raise UserError(f"{here}: needs a `model` key")
    bad = set(entry) - {"model", "parameters", "stats"}
    if bad:
        raise UserError(f"{here}: unknown key(s) {sorted(bad)}", hint="model, parameters, stats")
    model = ref(entry["model"], here)
    assert model is not None
    return ModelInput(
        model, _params(entry.get("parameters"), here), ref(entry.get("stats"), f"{here}.stats")
    )


def _slice(entry: Any, i: int, ref: _RefResolver, where: str) -> SliceSpec:
    here = f"{where}: slices[{i}]"
    if not isinstance(entry, Mapping) or not entry.get("sources"):
        raise UserError(f"{here}: needs `sources`")
    bad = set(entry) - {"sources", "base_model", "parameters", "residual_weight"}
    if bad:
        raise UserError(f"{here}: unknown key(s) {sorted(bad)}")
    sources = []
    for j, src in enumerate(entry["sources"]):
        sh = f"{here}.sources[{j}]"
        if not isinstance(src, Mapping) or "model" not in src or "layer_range" not in src:
            raise UserError(f"{sh}: needs `model` and `layer_range: [start, end]`")
        lr = src["layer_range"]
        if (
            not isinstance(lr, Sequence)
            or len(lr) != 2
            or not all(isinstance(x, int) for x in lr)
            or not 0 <= lr[0] < lr[1]
        ):
            raise UserError(f"{sh}: layer_range must be [start, end) with 0 ≤ start < end")
        model = ref(src["model"], sh)
        assert model is not None
        sources.append(SliceInput(model, (lr[0], lr[1]), _params(src.get("parameters"), sh)))
    lengths = {s.layer_range[1] - s.layer_range[0] for s in sources}
    if len(lengths) > 1:
        raise UserError(f"{here}: all sources of a slice must span the same number of layers")
    return SliceSpec(
        tuple(sources), ref(entry.get("base_model"), here), _params(entry.get("parameters"), here)
    )


def evaluate_setting(setting: Setting, tensor_name: str, t: float) -> Any:
    """The value of ``setting`` for ``tensor_name`` at depth ``t`` ∈ [0, 1] (None: no match).

    Numbers in a list are interpolated linearly at ``t·(n − 1)``; other lists are indexed at
    ``floor(t·(n − 1))``; condition lists pick the first matching ``filter`` (as mergekit); a
    LiNeS ``{alpha, beta}`` mapping gives α + β·t in a layer, α elsewhere (``merging.lines``).
    """
    if isinstance(setting, Mapping):
        return lines_scale(*check_lines(setting, tensor_name), tensor_name, t)
    if isinstance(setting, (int, float, str, bool)):
        return setting
    if all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
        scaled = t * (len(setting) - 1)
        i0 = math.floor(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    if all(isinstance(e, (int, float, str, bool)) for e in setting):
        return setting[int(t * (len(setting) - 1))]
    for cond in setting:
        flt = cond.get("filter")
        if flt is None or flt == "*" or (tensor_name and flt in tensor_name):
            return evaluate_setting(cond["value"], tensor_name, t)
    return None

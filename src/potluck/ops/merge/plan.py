"""Plan a merge: which input tensors make each output tensor, with which method and parameters.

``plan_merge(config, sources)`` resolves every parameter of every output tensor exactly as
mergekit would (per-model values, filters, gradients over the layers, slices) and checks that the
inputs agree (same tensor names, shapes, float dtypes) before anything is computed. Buffers are
carried over instead of merged and ``exclude_tensors`` globs leave tensors out (``buffers``). The
plan is what ``--explain`` prints and what the executor (``ops.merge.run``) runs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from potluck.errors import UserError
from potluck.merging import MERGE_METHODS, MergeMethod
from potluck.ops.merge.buffers import Unmerged, check_identical, excluded_by, is_buffer
from potluck.ops.merge.config import (
    MergeConfig,
    ModelInput,
    SliceInput,
    SliceSpec,
    evaluate_setting,
)
from potluck.ops.merge.tokenizer import VocabPlan, plan_vocabulary
from potluck.ops.models.sources import ModelSource, TensorInfo

__all__ = ["MergePlan", "TensorJob", "layer_index", "plan_merge"]

#: Per-model parameters in mergekit (``tensor_parameters``); everything else is per tensor.
PER_MODEL = ("weight", "density", "gamma", "epsilon", "mask_lambda")
#: mergekit spellings of potluck parameter names.
ALIASES = {"lambda": "lambda_"}
#: Accepted for compatibility; they do not change the result (``int8_mask`` only saves memory).
NO_EFFECT = ("int8_mask",)
#: mergekit methods whose base model is optional: the origin of their interpolation when given.
OPTIONAL_BASE = ("nuslerp", "multislerp")
#: mergekit methods that ignore the base's role: a given base is averaged like any model.
BASE_AS_MODEL = ("karcher",)
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")
_PRE = re.compile(r"embed|wte|wpe|word_embeddings|position_embeddings|token_type")


def layer_index(name: str) -> int | None:
    """The transformer block a tensor belongs to (``model.layers.3.mlp…`` → 3), or None."""
    m = _LAYER.search(name)
    return None if m is None else int(m.group(1))


def _rename_layer(name: str, new: int) -> str:
    m = _LAYER.search(name)
    assert m is not None
    return name[: m.start(1)] + str(new) + name[m.end(1) :]


@dataclass(frozen=True)
class TensorJob:
    """One output tensor: its inputs (model reference, tensor name), method and parameters."""

    out: TensorInfo
    method: str
    models: tuple[tuple[str, str], ...]
    base: tuple[str, str] | None
    params: dict[str, Any]
    weights: tuple[float, ...] | None
    t: float
    carried: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (what ``--explain --json`` prints)."""
        return {
            "tensor": self.out.name,
            "dtype": self.out.dtype,
            "shape": list(self.out.shape),
            "method": self.method,
            "models": [f"{m}:{n}" for m, n in self.models],
            "base": None if self.base is None else f"{self.base[0]}:{self.base[1]}",
            "params": self.params,
            "weights": None if self.weights is None else list(self.weights),
            "t": self.t,
            "carried": self.carried,
        }


@dataclass
class MergePlan:
    """The jobs in output order, the number of output layers, notes for the user, and the
    tensors not merged (``carried`` buffers → their model, ``left_out`` buffers, ``excluded``)."""

    jobs: list[TensorJob]
    method: MergeMethod
    num_layers: int | None = None
    notes: list[str] = field(default_factory=list)
    unmerged: Unmerged = field(default_factory=Unmerged)
    #: the output vocabulary when ``tokenizer_source`` is set (``ops.merge.tokenizer``)
    vocab: VocabPlan | None = None

    def unmerged_dict(self) -> dict[str, Any]:
        """JSON-ready: ``carried`` {tensor: model}, ``left_out`` and ``excluded`` (sorted)."""
        u = self.unmerged
        return {
            "carried": dict(sorted(u.carried.items())),
            "left_out": sorted(u.left_out),
            "excluded": sorted(u.excluded),
        }


def plan_merge(
    config: MergeConfig, sources: Mapping[str, ModelSource], out_dtype: str | None = None
) -> MergePlan:
    """The plan for ``config`` over opened ``sources`` (keyed by the config's references)."""
    method = MERGE_METHODS.get(config.merge_method)
    notes = [f"{k}: accepted from mergekit, has no effect in potluck" for k in config.ignored]
    slices = config.slices or (_whole_model_slice(config, method, sources),)
    vocab = plan_vocabulary(
        config.tokenizer_source,
        config.pad_to_multiple_of,
        config.base_model or config.referenced_models()[0],
        sources,
    )
    planner = _Planner(config, method, sources, out_dtype, vocab)
    jobs = planner.plan(slices)
    notes += sorted(planner.notes) + planner.unmerged.notes()
    if vocab is not None:
        notes.append(
            f"tokenizer_source {vocab.source}: {len(vocab.tokens)} tokens, {vocab.rows} rows "
            f"in {', '.join(sorted(vocab.tensors))}"
        )
    return MergePlan(jobs, method, planner.out_layers, notes, planner.unmerged, vocab)


def _whole_model_slice(
    config: MergeConfig, method: MergeMethod, sources: Mapping[str, ModelSource]
) -> SliceSpec:
    """``models:`` as one slice over all layers (mergekit's ``normalize_config``)."""
    base = config.base_model
    entries = list(config.models)
    if (method.needs_base or method.name == "slerp") and base is None:
        raise UserError(
            f"merge method {method.name!r} needs base_model",
            hint="add `base_model: PATH` (the model the fine-tunes started from)",
        )
    uses_base = _takes_base(method) or method.name in BASE_AS_MODEL
    if base is not None and uses_base and base not in [m.model for m in entries]:
        entries.append(ModelInput(base))  # mergekit adds the base as the last source
    n = _layer_count(sources[base or entries[0].model])
    srcs = tuple(SliceInput(m.model, (0, n), m.parameters) for m in entries)
    return SliceSpec(srcs, base)


def _takes_base(method: MergeMethod) -> bool:
    """Whether the method gets the base model apart from the models (when one is given)."""
    return method.needs_base or method.name == "slerp" or method.name in OPTIONAL_BASE


def _layer_count(src: ModelSource) -> int:
    found = [i for i in map(layer_index, src.names()) if i is not None]
    return max(found) + 1 if found else 0


class _Planner:
    def __init__(
        self,
        config: MergeConfig,
        method: MergeMethod,
        sources: Mapping[str, ModelSource],
        out_dtype: str | None,
        vocab: VocabPlan | None = None,
    ) -> None:
        self.config, self.method, self.sources = config, method, sources
        self.vocab = vocab
        self.out_dtype = out_dtype or config.out_dtype or config.dtype
        self.out_layers: int | None = None
        self.notes: set[str] = set()
        self.unmerged = Unmerged(excluded=self._excluded())
        #: the model whose tensor names and layout the output takes (its config is copied too)
        self.home = config.referenced_models()[0]

    def _excluded(self) -> set[str]:
        """Every input tensor name an ``exclude_tensors`` glob matches (a glob matching none is
        an error: a typo must not pass silently)."""
        globs = self.config.exclude_tensors
        names = {n for src in self.sources.values() for n in src.names()}
        for g in globs:
            if not any(excluded_by(n, [g]) for n in names):
                raise UserError(
                    f"exclude_tensors: {g!r} matches no tensor of the inputs",
                    hint="globs match whole tensor names, e.g. '*.position_ids'",
                    glob=g,
                )
        return {n for n in names if excluded_by(n, globs)}

    def _names_model(self, spec: SliceSpec) -> str:
        """Whose tensor names a slice's output has: the home model for a ``models:`` merge."""
        return spec.sources[0].model if self.config.slices else self.home

    def _names(self, model: str) -> list[str]:
        return [n for n in self.sources[model].names() if n not in self.unmerged.excluded]

    def plan(self, slices: Sequence[SliceSpec]) -> list[TensorJob]:
        first, last = slices[0], slices[-1]
        ref = self.sources[self._names_model(first)]
        outside = [n for n in self._names(self._names_model(first)) if layer_index(n) is None]
        pre = [n for n in outside if _PRE.search(n)]
        post = [n for n in outside if not _PRE.search(n)]
        jobs = [self._job(first, n, n, 0, 0.0) for n in pre]
        out_layer = 0
        for spec in slices:
            length = spec.sources[0].layer_range[1] - spec.sources[0].layer_range[0]
            for offset in range(length):
                t = offset / (length - 1) if length > 1 else 1.0
                jobs += self._layer_jobs(spec, offset, out_layer, t)
                out_layer += 1
        jobs += [self._job(last, n, n, 0, 1.0) for n in post]
        self.out_layers = out_layer if _layer_count(ref) else None
        self._check_complete(jobs)
        return jobs

    def _check_complete(self, jobs: list[TensorJob]) -> None:
        """With ``models:``, every model must have exactly the output's tensors, but for
        buffers (left out when the home model lacks them) and excluded tensors."""
        if self.config.slices:
            return
        read: dict[str, set[str]] = {}
        for job in jobs:
            for model, name in (*job.models, *([job.base] if job.base else [])):
                read.setdefault(model, set()).add(name)
        done = set(self.unmerged.carried) | self.unmerged.excluded
        for model, names in read.items():
            src = self.sources[model]
            extra = sorted(set(src.names()) - names - done)
            self.unmerged.left_out.update(n for n in extra if is_buffer(src.info(n)))
            extra = [n for n in extra if not is_buffer(src.info(n))]
            if extra:
                shown = ", ".join(extra[:5]) + (" …" if len(extra) > 5 else "")
                raise UserError(
                    f"{model} has {len(extra)} tensor(s) the other models lack: {shown}",
                    hint="merge only models of the same architecture (never a silent skip), or "
                    "leave them out: --exclude-tensors GLOB (exclude_tensors: in YAML)",
                    model=model,
                    tensors=extra,
                )

    def _layer_jobs(
        self, spec: SliceSpec, offset: int, out_layer: int, t: float
    ) -> list[TensorJob]:
        src0 = spec.sources[0]
        ref = self.sources[self._names_model(spec)]
        layer = src0.layer_range[0] + offset
        names = [n for n in self._names(self._names_model(spec)) if layer_index(n) == layer]
        if not names:
            raise UserError(
                f"{src0.model} has no layer {layer}",
                hint=f"it has {_layer_count(ref)} layers; check layer_range",
            )
        return [self._job(spec, n, _rename_layer(n, out_layer), offset, t) for n in names]

    def _inputs(self, spec: SliceSpec, name0: str, offset: int) -> list[tuple[str, str]]:
        inputs: list[tuple[str, str]] = []
        for src in spec.sources:
            name = name0
            if layer_index(name0) is not None:
                name = _rename_layer(name0, src.layer_range[0] + offset)
            inputs.append((src.model, name))
        return inputs

    def _job(self, spec: SliceSpec, name0: str, out_name: str, offset: int, t: float) -> TensorJob:
        inputs = self._inputs(spec, name0, offset)
        if is_buffer(self._info(self._names_model(spec), name0)):
            return self._carry(spec, inputs, name0, out_name, t)
        infos = [self._info(m, n) for m, n in inputs]
        shape = self.vocab.out_shape(name0, infos[0].shape) if self.vocab else None
        self._check_alike([i if shape is None else _rows_dropped(i) for i in infos], out_name)
        params, weights = self._params(spec, out_name, t)
        models, base, weights = self._split_base(spec, inputs, weights)
        out = TensorInfo(out_name, self.out_dtype_for(infos[0]), shape or infos[0].shape)
        return TensorJob(out, self.method.name, models, base, params, weights, t)

    def _carry(
        self, spec: SliceSpec, inputs: list[tuple[str, str]], name0: str, out_name: str, t: float
    ) -> TensorJob:
        """A buffer: checked identical wherever present, then taken from the home model."""
        home = (self._names_model(spec), name0)
        holders = [home, *(x for x in inputs if x != home and x[1] in self.sources[x[0]].infos)]
        check_identical(out_name, [(m, self.sources[m], n) for m, n in holders])
        self.unmerged.carried[out_name] = home[0]
        info = self._info(*home)
        out = TensorInfo(out_name, info.dtype, info.shape)  # a buffer keeps its dtype
        return TensorJob(out, "passthrough", (home,), None, {}, None, t, carried=True)

    def _base_index(self, spec: SliceSpec) -> int | None:
        """Which of the slice's sources is the base model (None when the method has none)."""
        base_ref = spec.base_model or self.config.base_model
        if not _takes_base(self.method) or base_ref is None:
            return None
        at = [i for i, src in enumerate(spec.sources) if src.model == base_ref]
        return at[0] if at else None

    def _split_base(
        self,
        spec: SliceSpec,
        inputs: list[tuple[str, str]],
        weights: tuple[float, ...] | None,
    ) -> tuple[tuple[tuple[str, str], ...], tuple[str, str] | None, tuple[float, ...] | None]:
        """mergekit lists the base among a slice's sources; potluck's methods take it apart."""
        base_ref = spec.base_model or self.config.base_model
        if not _takes_base(self.method) or base_ref is None:
            return tuple(inputs), None, weights
        at = [i for i, (m, _) in enumerate(inputs) if m == base_ref]
        if not at:
            raise UserError(
                f"base model {base_ref} is not among the slice's sources",
                hint="list the base model as one of the sources of every slice",
            )
        base = inputs[at[0]]
        rest = [x for i, x in enumerate(inputs) if i != at[0]]
        w = None if weights is None else tuple(x for i, x in enumerate(weights) if i != at[0])
        if self.method.name == "slerp":  # t = 0 is the base, t = 1 the other model
            return (base, *rest), None, None
        return tuple(rest), base, w

    def out_dtype_for(self, info: TensorInfo) -> str:
        if self.out_dtype is None:
            return info.dtype
        return canonical_dtype(self.out_dtype)

    def _info(self, model: str, name: str) -> TensorInfo:
        return self.sources[model].info(name)

    def _check_alike(self, infos: list[TensorInfo], out_name: str) -> None:
        shapes = {i.shape for i in infos}
        if len(shapes) > 1:
            raise UserError(
                f"tensor {out_name!r}: inputs have different shapes {sorted(shapes)}",
                hint="merge only models of the same architecture and size",
                tensor=out_name,
            )

    def _params(
        self, spec: SliceSpec, tensor: str, t: float
    ) -> tuple[dict[str, Any], tuple[float, ...] | None]:
        per_source = [src.parameters for src in spec.sources]
        layered = [spec.parameters, self.config.parameters]
        base_at = self._base_index(spec)
        known = set(self.method.params) | set(ALIASES) | set(NO_EFFECT) | set(PER_MODEL)
        for where in [*per_source, *layered]:
            unknown = sorted(set(where) - known)
            if unknown:
                valid = sorted(set(self.method.params) | {"weight"})
                raise UserError(
                    f"merge method {self.method.name!r} has no parameter "
                    + ", ".join(map(repr, unknown)),
                    hint="valid parameters: " + ", ".join(valid),
                    unknown=unknown,
                    valid=valid,
                )
        for where in per_source:
            misplaced = sorted(k for k in where if k not in PER_MODEL and k not in NO_EFFECT)
            if misplaced:
                raise UserError(
                    f"parameter {', '.join(map(repr, misplaced))} of {self.method.name!r} applies "
                    "to all models, but is set for one model",
                    hint="move it to the top-level (or slice) `parameters`; per-model: "
                    + ", ".join(PER_MODEL),
                    params=misplaced,
                )
        params: dict[str, Any] = {}
        for key in list(self.method.params) + list(ALIASES):
            target = ALIASES.get(key, key)
            per_model = [_lookup([w], key, tensor, t) for j, w in enumerate(per_source)
                         if j != base_at]  # fmt: skip
            value = _lookup(layered, key, tensor, t)
            if key in PER_MODEL and any(v is not None for v in per_model):
                value = self._per_model_value(key, per_model, value, tensor)
            if value is not None:
                params[target] = _convert(target, value)
        weights = None
        if self.method.uses_weights:
            ws = [_lookup([w, *layered], "weight", tensor, t) for w in per_source]
            if any(w is not None for w in ws):
                weights = tuple(1.0 if w is None else float(w) for w in ws)
        self.method.resolve_params(params)
        return params, weights

    def _per_model_value(self, key: str, values: list[Any], fallback: Any, tensor: str) -> Any:
        """One value when the models agree; a tuple (one per model) when the method takes that."""
        filled = [fallback if v is None else v for v in values]
        if len(set(filled)) == 1:
            return filled[0]
        if key in self.method.per_model:
            default = self.method.params[key].default
            return tuple(default if v is None else v for v in filled)
        return _one_value(key, values, tensor)


def _rows_dropped(info: TensorInfo) -> TensorInfo:
    """A vocabulary tensor's info without its row count (aligned by ``ops.merge.tokenizer``)."""
    return TensorInfo(info.name, info.dtype, info.shape[1:])


def _lookup(layers: Sequence[Mapping[str, Any]], key: str, tensor: str, t: float) -> Any:
    for layer in layers:
        if key in layer:
            value = evaluate_setting(layer[key], tensor, t)
            if value is not None:
                return value
    return None


def _one_value(key: str, values: list[Any], tensor: str) -> Any:
    given = {v for v in values if v is not None}
    if len(given) > 1:
        raise UserError(
            f"tensor {tensor!r}: models give different {key} values {sorted(given)}",
            hint=f"potluck applies one {key} per tensor to all models; give the same value",
            tensor=tensor,
            param=key,
        )
    return given.pop()


def _convert(name: str, value: Any) -> Any:
    if name == "rescale" and isinstance(value, bool):
        return "l1" if value else "none"  # mergekit's boolean: rescale to the L1 norm
    return value


_DTYPES = {
    "float32": "F32",
    "fp32": "F32",
    "float16": "F16",
    "fp16": "F16",
    "half": "F16",
    "bfloat16": "BF16",
    "bf16": "BF16",
    "float64": "F64",
}


def canonical_dtype(name: str) -> str:
    try:
        return _DTYPES[name.lower()]
    except KeyError:
        raise UserError(
            f"unknown dtype {name!r}", hint="one of " + ", ".join(sorted(_DTYPES))
        ) from None

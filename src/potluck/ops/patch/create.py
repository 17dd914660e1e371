"""Create a patch: encode every changed tensor of TARGET against BASE with a codec chosen by
name rules; ``patch_info`` summarises a patch file. Models are ``ModelSource``s
(``potluck.ops.models.sources``) or paths; the file format is in ``fileformat``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import os
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from potluck.codecs import (
    CODECS,
    Payload,
    choose_codec,
    decode_payload,
    full_nbytes,
    get_codec,
    payload_nbytes,
    payload_shape_dtype,
)
from potluck.codecs.base import Done
from potluck.codecs.rules import Rule
from potluck.errors import UserError
from potluck.fileio import check_output_dir, file_sha256
from potluck.ops.models import sources
from potluck.ops.models.sources import ModelInput, ModelSource, open_input
from potluck.ops.patch.budget import (
    Plan,
    allocate,
    check_fits,
    patch_size,
    plan_patch,
    refill,
)
from potluck.ops.patch.card import relation
from potluck.ops.patch.check import QualityReport, TensorQuality, measure, summarize
from potluck.ops.patch.fileformat import PatchContents, read_patch, write_patch
from potluck.ops.patch.tune_scales import (
    ScaleTuning,
    TuneSettings,
    tune_sign_scales,
    tuning_bytes,
)
from potluck.ops.patch.weights import StatsLookup

__all__ = ["PatchEntry", "PatchInfo", "create_patch", "encode_tensor", "patch_info"]


@dataclass(frozen=True)
class PatchEntry:
    """One changed tensor in a patch: its codec, payload bytes, full size and error."""

    name: str
    codec: str
    nbytes: int
    full_nbytes: int
    relative_error: float | None
    predicted_error: float | None = None


@dataclass(frozen=True)
class PatchInfo:
    """What ``create_patch`` wrote."""

    path: str
    size: int
    entries: list[PatchEntry]
    added: list[str]
    removed: list[str]
    unchanged: int
    base_digest: str
    quality: QualityReport | None = None
    scales: ScaleTuning | None = None


def _select(names: Sequence[str], glob: str | None) -> list[str]:
    return [n for n in names if glob is None or fnmatch.fnmatchcase(n, glob)]


def encode_tensor(
    name: str,
    old: np.ndarray,
    new: np.ndarray,
    rules: Sequence[Rule],
    default: tuple[str, Mapping[str, object]],
    seed: int,
    *,
    block: int | None = None,
    done: Done | None = None,
) -> Payload:
    """``new`` encoded against ``old``: ``full`` when shape or dtype changed, else by rule.

    With ``block`` (bytes), codecs that stream read the inputs block by block and call ``done``
    with each byte range they are finished with (the payload is the same)."""
    if old.shape != new.shape or old.dtype != new.dtype:
        return get_codec("full").encode(new, np.zeros_like(new), name=name, seed=seed)
    codec, params = choose_codec(name, rules, default=default)
    return codec.encode_blocked(new, old, name=name, seed=seed, block=block, done=done, **params)


def _entry(name: str, payload: Payload) -> PatchEntry:
    err = None if payload.error is None else payload.error.relative_error
    pred = payload.meta.get("predicted_error")
    pred = float(pred) if isinstance(pred, float | int) else None
    return PatchEntry(name, payload.codec, payload_nbytes(payload), full_nbytes(payload), err, pred)


def create_patch(
    base_path: ModelInput,
    target_path: ModelInput,
    out_path: str | os.PathLike[str],
    *,
    rules: Sequence[Rule] = (),
    default_codec: str = "exact_xor",
    params: Mapping[str, object] | None = None,
    seed: int = 0,
    description: Mapping[str, Any] | None = None,
    tensors_glob: str | None = None,
    check: bool = False,
    budget: str | int | None = None,
    max_error: float | None = None,
    stats: StatsLookup | None = None,
    tune: TuneSettings | None = None,
) -> PatchInfo:
    """Write a patch turning the model BASE into TARGET (paths or ``ModelSource``s).

    Tensors are read one at a time. Unchanged tensors (same sha256) are not stored; a tensor
    whose shape or dtype changed, or that only TARGET has, is stored with ``full``; one only BASE
    has is recorded as removed. Other tensors use the first matching rule (fnmatch pattern, codec,
    params), else ``default_codec`` with ``params``. ``tensors_glob`` limits the patch to the
    matching names. The file is written atomically and is byte-identical for identical inputs.
    ``check`` decodes every payload and measures it against TARGET (``PatchInfo.quality``).
    ``budget`` (bytes, ``5MB`` or ``x16``) and/or ``max_error`` (relative Frobenius error per
    tensor) replace the rules: ``ops.patch.budget`` picks each tensor's codec and records its
    predicted error in the payload's meta (``predicted_error``). ``stats`` (Gram statistics by
    tensor name, e.g. ``StatsFile.tensor_stats``) weights the allocation's errors by their
    effect on each layer's outputs (``ops.patch.weights``). ``tune`` (an ``--eval`` file) tunes
    the scales of sign-coded tensors (``bitdelta``, ``ternary``) on TARGET's outputs
    (``ops.patch.tune_scales``; recorded in the description as ``scales_tuned``).
    """
    default = (default_codec, dict(params or {}))
    CODECS.get(default_codec)
    check_output_dir(out_path)  # before any work: its result goes there
    enc = _Encoded()
    with ExitStack() as stack:
        base = open_input(base_path, stack)
        target = open_input(target_path, stack)
        base_names = _select(base.names(), tensors_glob)
        target_names = _select(target.names(), tensors_glob)
        common = sorted(set(base_names) & set(target_names))
        added = sorted(set(target_names) - set(base_names))
        removed = sorted(set(base_names) - set(target_names))
        plan: Plan | None = None
        if budget is not None or max_error is not None:
            plan = plan_patch(
                base,
                target,
                common,
                added,
                budget=budget,
                max_error=max_error,
                seed=seed,
                stats=stats,
            )
            if tune is not None:
                plan = _room_for_tuning(plan, max_error)
        for name in common:
            chosen = rules if plan is None or name not in plan.choices else plan.rule(name)
            enc.changed(name, base, target, chosen, default, seed, check)
        for name in added:
            enc.added(name, target, seed, check)
        contents = enc.contents(plan, added, removed, description)
        if plan is not None and plan.budget is not None:
            inputs = (base, target, default, seed, check)
            extra = _no_extra if tune is None else _tuning_extra
            contents = _spend_slack(plan, plan.budget, enc, contents, inputs, extra)
        scales = None
        if tune is not None:
            limit = None if plan is None else plan.budget
            contents, scales = _tune(enc, (base, target), tune, Path(out_path), contents, limit)
    payloads = enc.payloads
    if plan is not None:
        check_fits(plan, contents)
    size = write_patch(out_path, contents)
    return PatchInfo(
        path=str(out_path),
        size=size,
        entries=[_entry(n, p) for n, p in sorted(payloads.items())],
        added=added,
        removed=removed,
        unchanged=len(common) - (len(payloads) - len(added)),
        base_digest=contents.base_digest,
        quality=summarize(enc.quality) if check else None,
        scales=scales,
    )


def _no_extra(_contents: PatchContents) -> int:
    return 0


def _tuning_extra(contents: PatchContents) -> int:
    return tuning_bytes(p.codec for p in contents.payloads.values())


def _room_for_tuning(plan: Plan, max_error: float | None) -> Plan:
    """The plan again with header room for what tuning adds (``tuning_bytes``), when it
    chose sign-coded tensors (a few rounds: the room can change the choices). A budget too
    small for that room keeps the plan as it was (the tuned scales are then not kept)."""
    if plan.budget is None:
        return plan
    reserve = 0
    for _ in range(3):
        need = tuning_bytes(c.codec for c in plan.choices.values())
        if need <= reserve:
            break
        reserve = need
        try:
            plan = allocate(list(plan.curves.values()), plan.budget, max_error, reserve)
        except UserError:
            break
    return plan


def _tune(
    enc: _Encoded,
    models: tuple[ModelSource, ModelSource],
    tune: TuneSettings,
    out: Path,
    contents: PatchContents,
    budget: int | None,
) -> tuple[PatchContents, ScaleTuning | None]:
    """Tune the sign-coded payloads' scales; record it in the description; re-measure. With
    a budget the tuned patch must fit (``_room_for_tuning`` keeps room); else the untuned
    payloads are kept and the report says so (``kept=False``)."""
    base, target = models
    tuned, report = tune_sign_scales(base, target, enc.payloads, tune, out.resolve().parent)
    if report is None:
        return contents, None
    payloads = {**enc.payloads, **tuned}
    description = {**contents.description, "scales_tuned": report.record()}
    again = dataclasses.replace(contents, payloads=payloads, description=description)
    if budget is not None and patch_size(again) > budget:
        return contents, dataclasses.replace(report, kept=False)
    enc.payloads.update(tuned)
    if enc.quality:
        enc.quality = [
            _measure(q.name, tuned[q.name], base.read(q.name), target.read(q.name))
            if q.name in tuned
            else q
            for q in enc.quality
        ]
    return again, report


@dataclass
class _Encoded:
    """What ``create_patch`` has encoded so far: payloads, base and result hashes, quality."""

    payloads: dict[str, Payload] = field(default_factory=dict)
    base: dict[str, str] = field(default_factory=dict)
    result: dict[str, str] = field(default_factory=dict)
    quality: list[TensorQuality] = field(default_factory=list)

    def changed(
        self,
        name: str,
        base: ModelSource,
        target: ModelSource,
        rules: Sequence[Rule],
        default: tuple[str, Mapping[str, object]],
        seed: int,
        check: bool,
    ) -> None:
        """Encode a tensor both models have, unless its bytes, dtype and shape are the same.

        Hashing and the exact codecs go block by block (``sources.BLOCK_BYTES``), letting the
        inputs' pages go behind them; other codecs hold the tensor."""
        old, new = base.read(name), target.read(name)
        old_hash, new_hash = base.sha256(name, old), target.sha256(name, new)
        if old_hash == new_hash and old.dtype == new.dtype and old.shape == new.shape:
            return
        block = sources.BLOCK_BYTES if max(old.nbytes, new.nbytes) > sources.BLOCK_BYTES else None

        def done(start: int, stop: int) -> None:
            base.release(name, start, stop - start)
            target.release(name, start, stop - start)

        self.payloads[name] = encode_tensor(
            name, old, new, rules, default, seed, block=block, done=done
        )
        self.base[name] = old_hash
        if CODECS.get(self.payloads[name].codec).exact:
            self.result[name] = new_hash
        if check:
            self.quality.append(_measure(name, self.payloads[name], old, new))

    def contents(
        self,
        plan: Plan | None,
        added: list[str],
        removed: list[str],
        description: Mapping[str, Any] | None,
    ) -> PatchContents:
        """The patch as encoded so far (with the plan's predicted errors in the meta)."""
        if plan is not None:
            for name, choice in plan.choices.items():
                if name in self.payloads:
                    self.payloads[name].meta["predicted_error"] = choice.predicted_error
        return PatchContents(
            self.payloads, self.base, self.result, added, removed, dict(description or {})
        )

    def added(self, name: str, target: ModelSource, seed: int, check: bool) -> None:
        """Store a tensor only TARGET has, whole (``full``)."""
        new = target.read(name)
        self.payloads[name] = get_codec("full").encode(
            new, np.zeros_like(new), name=name, seed=seed
        )
        self.result[name] = target.sha256(name, new)
        if check:
            self.quality.append(_measure(name, self.payloads[name], None, new))


_Inputs = tuple[ModelSource, ModelSource, tuple[str, Mapping[str, object]], int, bool]


def _spend_slack(
    plan: Plan,
    budget: int,
    enc: _Encoded,
    contents: PatchContents,
    inputs: _Inputs,
    extra: Callable[[PatchContents], int],
) -> PatchContents:
    """Spend what the real header left of ``budget`` (``budget.refill``: the plan's header
    estimate is an upper bound), re-encoding only the tensors whose choice changes; the first
    encoding is kept when the result would not fit (the new choices' header entries can take
    more than their estimate). ``extra(contents)``: bytes a later step adds (scale tuning's
    record). Deterministic: the real header depends only on the inputs."""
    room = budget - patch_size(contents) - extra(contents)
    if room <= 0:
        return contents
    state = (dict(plan.at), dict(plan.choices), plan.payload_bytes)
    changed = refill(plan, room)
    if not changed:
        return contents
    base, target, default, seed, check = inputs
    kept = {n: (enc.payloads[n], enc.result.get(n)) for n in changed}
    quality = list(enc.quality)
    enc.quality = [q for q in enc.quality if q.name not in kept]
    for name in changed:
        enc.result.pop(name, None)
        enc.changed(name, base, target, plan.rule(name), default, seed, check)
    again = enc.contents(plan, contents.added, contents.removed, contents.description)
    if patch_size(again) + extra(again) <= budget:
        return again
    plan.at, plan.choices, plan.payload_bytes = state
    enc.quality = quality
    for name, (payload, result) in kept.items():
        enc.payloads[name] = payload
        enc.result.pop(name, None)
        if result is not None:
            enc.result[name] = result
    return enc.contents(plan, contents.added, contents.removed, contents.description)


def _measure(name: str, payload: Payload, old: np.ndarray | None, new: np.ndarray) -> TensorQuality:
    same_kind = old is not None and old.shape == new.shape and old.dtype == new.dtype
    decoded = decode_payload(payload, old)
    return measure(name, payload.codec, decoded, new, old if same_kind else None)


def patch_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A JSON-able summary of a patch: size, per-tensor codec/params/error/bytes, ratio.

    ``compression_ratio`` is the changed tensors' full size divided by the patch file's size;
    ``bits_per_parameter`` is the file's size in bits per element of the tensors it holds.
    """
    patch = read_patch(path)
    size = Path(path).stat().st_size
    tensors: dict[str, Any] = {}
    for name, p in patch.payloads.items():
        hidden = ("version", "shape", "dtype", "predicted_error")
        params = {k: v for k, v in p.meta.items() if k not in hidden}
        tensors[name] = {
            "codec": p.codec,
            "params": params,
            "error": None if p.error is None else vars(p.error),
            "predicted_error": p.meta.get("predicted_error"),
            "bytes": payload_nbytes(p),
            "full_bytes": full_nbytes(p),
        }
    full = sum(t["full_bytes"] for t in tensors.values())
    n_params = sum(math.prod(payload_shape_dtype(p)[0]) for p in patch.payloads.values())
    return {
        "path": str(path),
        "sha256": file_sha256(path),
        "size": size,
        "base_digest": patch.base_digest,
        "tensors": tensors,
        "added": patch.added,
        "removed": patch.removed,
        "payload_bytes": sum(t["bytes"] for t in tensors.values()),
        "full_bytes": full,
        "compression_ratio": full / size if size else 0.0,
        "parameters": n_params,
        "bits_per_parameter": 8 * size / n_params if n_params else 0.0,
        "exact": all(CODECS.get(p.codec).exact for p in patch.payloads.values()),
        "relation": relation(patch),
        "description": patch.description,
    }

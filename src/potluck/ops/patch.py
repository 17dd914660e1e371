"""Patches: ship a fine-tune as a small, verifiable update of a pinned base checkpoint.

``create_patch`` encodes every changed tensor of TARGET against BASE with a codec chosen by name
rules; ``apply_patch`` checks the base hashes before writing anything, rebuilds the tensors and
writes a safetensors file or model directory; ``patch_info`` summarises a patch. Models are
``ModelSource``s (``potluck.ops.sources``) or paths. The file format is in
``potluck.ops.patchfile``; stacking in ``patch_stack``, output layout in ``patch_output``, model
cards in ``patch_card``, the ``--check`` measure in ``patch_check``.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from potluck.codecs import CODECS, Payload, choose_codec, get_codec, payload_nbytes
from potluck.codecs.rules import Rule
from potluck.errors import IntegrityError, UserError
from potluck.fileio import file_sha256
from potluck.ops.patch_card import card_text, check_card_path, relation
from potluck.ops.patch_check import QualityReport, TensorQuality, measure, summarize
from potluck.ops.patch_output import Spec, check_output, had_index, plan_output, write_output
from potluck.ops.patchfile import (
    PatchContents,
    full_nbytes,
    payload_shape_dtype,
    read_patch,
    tensor_sha256,
    write_patch,
)
from potluck.ops.sources import ModelSource, open_path
from potluck.tensors.dtypes import to_numpy

__all__ = [
    "ApplyReport",
    "ModelInput",
    "PatchEntry",
    "PatchInfo",
    "apply_patch",
    "create_patch",
    "decode_payload",
    "encode_tensor",
    "is_directory",
    "open_input",
    "patch_info",
]

#: How many differing tensor names an error message lists.
_SHOW = 5


@dataclass(frozen=True)
class PatchEntry:
    """One changed tensor in a patch: its codec, payload bytes, full size and error."""

    name: str
    codec: str
    nbytes: int
    full_nbytes: int
    relative_error: float | None


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


@dataclass
class ApplyReport:
    """What ``apply_patch`` did; ``warnings`` is non-empty when something was forced."""

    out_path: str
    patch_sha256: str = ""
    files: list[str] = field(default_factory=list)
    card: bool = False
    relation: str = "finetune"
    changed: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    results_verified: bool = False
    warnings: list[str] = field(default_factory=list)


ModelInput = ModelSource | str | os.PathLike[str]


def open_input(model: ModelInput, stack: ExitStack) -> ModelSource:
    """``model`` itself when it is a ``ModelSource`` (the caller closes it), else ``open_path``."""
    if isinstance(model, ModelSource):
        return model
    src = open_path(model)
    stack.callback(src.close)
    return src


def _select(names: Sequence[str], glob: str | None) -> list[str]:
    return [n for n in names if glob is None or fnmatch.fnmatchcase(n, glob)]


def encode_tensor(
    name: str,
    old: np.ndarray,
    new: np.ndarray,
    rules: Sequence[Rule],
    default: tuple[str, Mapping[str, object]],
    seed: int,
) -> Payload:
    """``new`` encoded against ``old``: ``full`` when shape or dtype changed, else by rule."""
    if old.shape != new.shape or old.dtype != new.dtype:
        return get_codec("full").encode(new, np.zeros_like(new), name=name, seed=seed)
    codec, params = choose_codec(name, rules, default=default)
    return codec.encode(new, old, name=name, seed=seed, **params)


def _entry(name: str, payload: Payload) -> PatchEntry:
    err = None if payload.error is None else payload.error.relative_error
    return PatchEntry(name, payload.codec, payload_nbytes(payload), full_nbytes(payload), err)


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
) -> PatchInfo:
    """Write a patch turning the model BASE into TARGET (paths or ``ModelSource``s).

    Tensors are read one at a time. Unchanged tensors (same sha256) are not stored; a tensor
    whose shape or dtype changed, or that only TARGET has, is stored with ``full``; one only BASE
    has is recorded as removed. Other tensors use the first matching rule (fnmatch pattern, codec,
    params), else ``default_codec`` with ``params``. ``tensors_glob`` limits the patch to the
    matching names. The file is written atomically and is byte-identical for identical inputs.
    ``check`` decodes every payload and measures it against TARGET (``PatchInfo.quality``).
    """
    default = (default_codec, dict(params or {}))
    CODECS.get(default_codec)
    payloads: dict[str, Payload] = {}
    base_hashes: dict[str, str] = {}
    result: dict[str, str] = {}
    quality: list[TensorQuality] = []
    with ExitStack() as stack:
        base = open_input(base_path, stack)
        target = open_input(target_path, stack)
        base_names = _select(base.names(), tensors_glob)
        target_names = _select(target.names(), tensors_glob)
        common = sorted(set(base_names) & set(target_names))
        added = sorted(set(target_names) - set(base_names))
        removed = sorted(set(base_names) - set(target_names))
        for name in common:
            old, new = base.read(name), target.read(name)
            old_hash, new_hash = tensor_sha256(old), tensor_sha256(new)
            if old_hash == new_hash and old.dtype == new.dtype and old.shape == new.shape:
                continue
            payloads[name] = encode_tensor(name, old, new, rules, default, seed)
            base_hashes[name] = old_hash
            if CODECS.get(payloads[name].codec).exact:
                result[name] = new_hash
            if check:
                quality.append(_measure(name, payloads[name], old, new))
        for name in added:
            new = target.read(name)
            payloads[name] = get_codec("full").encode(new, np.zeros_like(new), name=name, seed=seed)
            result[name] = tensor_sha256(new)
            if check:
                quality.append(_measure(name, payloads[name], None, new))
    contents = PatchContents(payloads, base_hashes, result, added, removed, dict(description or {}))
    size = write_patch(out_path, contents)
    return PatchInfo(
        path=str(out_path),
        size=size,
        entries=[_entry(n, p) for n, p in sorted(payloads.items())],
        added=added,
        removed=removed,
        unchanged=len(common) - (len(payloads) - len(added)),
        base_digest=contents.base_digest,
        quality=summarize(quality) if check else None,
    )


def decode_payload(payload: Payload, base: np.ndarray | None) -> np.ndarray:
    """The tensor a payload rebuilds from ``base`` (``full`` payloads ignore it; None allowed)."""
    codec = CODECS.get(payload.codec)
    if payload.codec == "full" or base is None:
        shape, dtype = payload_shape_dtype(payload)
        return codec.decode(payload, np.zeros(shape, to_numpy(dtype)))
    return codec.decode(payload, base)


def _measure(name: str, payload: Payload, old: np.ndarray | None, new: np.ndarray) -> TensorQuality:
    same_kind = old is not None and old.shape == new.shape and old.dtype == new.dtype
    decoded = decode_payload(payload, old)
    return measure(name, payload.codec, decoded, new, old if same_kind else None)


def _verify_base(base: ModelSource, patch: PatchContents) -> list[str]:
    """Names of tensors whose base bytes differ from the patch's record (or are missing)."""
    present = set(base.names())
    bad = []
    for name, want in sorted(patch.base.items()):
        if name not in present or tensor_sha256(base.read(name)) != want:
            bad.append(name)
    return bad


def _base_mismatch(bad: list[str], base: ModelSource) -> IntegrityError:
    shown = ", ".join(repr(n) for n in bad[:_SHOW])
    more = f" and {len(bad) - _SHOW} more" if len(bad) > _SHOW else ""
    return IntegrityError(
        f"{base.label} is not the base this patch was made for: {len(bad)} tensor(s) differ "
        f"({shown}{more})",
        hint="apply it to the base it was made from, or pass --force to apply it anyway",
        tensors=bad,
    )


def _check_scale(patch: PatchContents, scale: float, force: bool, warnings: list[str]) -> None:
    exact = sorted(
        n
        for n, p in patch.payloads.items()
        if n in patch.base and p.codec != "full" and CODECS.get(p.codec).exact
    )
    if scale == 1.0 or not exact:
        return
    if not force:
        raise UserError(
            f"--scale {scale:g} applies to lossy codecs only; {exact[0]!r} uses exact codec "
            f"{patch.payloads[exact[0]].codec!r}",
            hint="leave --scale at 1, or pass --force to scale the exact deltas too",
            tensors=exact,
        )
    warnings.append(f"scaling the deltas of {len(exact)} exactly-coded tensor(s) by {scale:g}")


def _rebuild(name: str, payload: Payload, base: ModelSource, scale: float) -> np.ndarray:
    """The patched tensor: decode against the base (zeros for ``full``), then scale the delta."""
    if payload.codec == "full":
        return decode_payload(payload, None)
    old = base.read(name)
    new = decode_payload(payload, old)
    if scale == 1.0:
        return new
    ct = np.float64 if old.dtype == np.float64 else np.float32
    old_ct: np.ndarray[Any, Any] = old.astype(ct)
    delta: np.ndarray[Any, Any] = np.subtract(new.astype(ct), old_ct)
    out: np.ndarray = np.add(old_ct, np.multiply(delta, scale, dtype=ct)).astype(old.dtype)
    return out


def _output_order(base: ModelSource, patch: PatchContents) -> list[Spec]:
    removed = set(patch.removed)
    specs: list[Spec] = []
    for name in base.names():
        if name in removed:
            continue
        if name in patch.payloads:
            shape, dtype = payload_shape_dtype(patch.payloads[name])
        else:
            info = base.info(name)
            dtype, shape = info.dtype, info.shape
        specs.append((name, dtype, shape))
    present = {s[0] for s in specs}
    for name in sorted(patch.payloads):
        if name not in present and name not in removed:
            shape, dtype = payload_shape_dtype(patch.payloads[name])
            specs.append((name, dtype, shape))
    return specs


def _tensors(
    specs: list[Spec],
    base: ModelSource,
    patch: PatchContents,
    scale: float,
    check_results: bool,
) -> Iterator[np.ndarray]:
    for name, _dtype, _shape in specs:
        if name not in patch.payloads:
            yield base.read(name)
            continue
        arr = _rebuild(name, patch.payloads[name], base, scale)
        want = patch.result.get(name)
        if check_results and want is not None and tensor_sha256(arr) != want:
            raise IntegrityError(
                f"patched tensor {name!r} does not match the hash recorded in the patch",
                hint="the patch or the base is corrupt; nothing was written",
                tensor=name,
            )
        yield arr


def is_directory(model: ModelSource) -> bool:
    """Whether ``model`` is a model directory: a directory on disk, or several shard files."""
    return Path(model.label).is_dir() or len(set(model.files.values())) > 1


def apply_patch(
    base_path: ModelInput,
    patch_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    scale: float = 1.0,
    force: bool = False,
    directory: bool | None = None,
    card: bool | None = None,
    base_ref: str | None = None,
) -> ApplyReport:
    """Apply the patch at ``patch_path`` to the model BASE; write safetensors to ``out_path``.

    Every base hash is checked before anything is written: a wrong base is an
    ``IntegrityError`` unless ``force`` (then it is applied anyway and the report's ``warnings``
    say so). ``scale`` multiplies the decoded delta of lossy tensors (exact ones need ``force``).
    Output: the base's tensor order, new tensors appended; exact results are checked against
    their recorded hashes, and the output is only moved into place when everything succeeded.
    ``directory`` (default: ``is_directory(base)``) writes a model directory with the base's
    shard layout and config files (``potluck.ops.patch_output``); ``card`` (default: when
    writing a directory) writes a ``README.md`` model card naming ``base_ref`` (default: the
    base's label) — next to the output file when it is not a directory.
    """
    patch = read_patch(patch_path)
    report = ApplyReport(out_path=str(out_path), patch_sha256=file_sha256(patch_path))
    with ExitStack() as stack:
        base = open_input(base_path, stack)
        as_dir = is_directory(base) if directory is None else directory
        check_output(out_path, as_dir)
        card_text_ = None
        if card if card is not None else as_dir:
            if not as_dir:
                check_card_path(Path(out_path).parent / "README.md")
            ref = base.label if base_ref is None else base_ref
            card_text_ = card_text(ref, report.patch_sha256, patch, scale=scale)
        _check_base(base, patch, force, report)
        _check_scale(patch, scale, force, report.warnings)
        order = _output_order(base, patch)
        plan = plan_output(
            order, base.files, directory=as_dir, had_index=had_index(base.config_dir)
        )
        check = not report.warnings and scale == 1.0
        report.files = write_output(
            out_path,
            plan,
            lambda specs: _tensors(specs, base, patch, scale, check),
            config_dir=base.config_dir if as_dir else None,
            card=card_text_,
        )
        report.removed = sorted(set(patch.removed) & set(base.names()))
    report.card = card_text_ is not None
    report.results_verified = check and bool(patch.result)
    report.added = sorted(set(patch.payloads) - set(patch.base))
    report.changed = sorted(patch.base)
    report.relation = relation(patch)
    return report


def _check_base(base: ModelSource, patch: PatchContents, force: bool, report: ApplyReport) -> None:
    bad = _verify_base(base, patch)
    if bad and not force:
        raise _base_mismatch(bad, base)
    if bad:
        report.warnings.append(f"FORCED: {_base_mismatch(bad, base).message}")
    missing = sorted(set(patch.base) - set(base.names()))
    if missing:
        raise UserError(
            f"the base has no tensor {missing[0]!r}, which the patch changes",
            hint="apply the patch to the checkpoint it was made from",
            tensors=missing,
        )


def patch_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A JSON-able summary of a patch: size, per-tensor codec/params/error/bytes, ratio.

    ``compression_ratio`` is the changed tensors' full size divided by the patch file's size.
    """
    patch = read_patch(path)
    size = Path(path).stat().st_size
    tensors: dict[str, Any] = {}
    for name, p in patch.payloads.items():
        params = {k: v for k, v in p.meta.items() if k not in ("version", "shape", "dtype")}
        tensors[name] = {
            "codec": p.codec,
            "params": params,
            "error": None if p.error is None else vars(p.error),
            "bytes": payload_nbytes(p),
            "full_bytes": full_nbytes(p),
        }
    full = sum(t["full_bytes"] for t in tensors.values())
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
        "exact": all(CODECS.get(p.codec).exact for p in patch.payloads.values()),
        "relation": relation(patch),
        "description": patch.description,
    }

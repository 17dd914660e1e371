"""Apply a patch: check the base hashes before writing anything, rebuild the tensors and write
a safetensors file or a model directory (layout in ``output``, model card in ``card``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from potluck.codecs import CODECS, Payload, decode_payload, payload_shape_dtype
from potluck.codecs.mask import MASK_CODEC
from potluck.errors import IntegrityError, UserError
from potluck.fileio import file_sha256
from potluck.ops.lineage import Edge, plan_edge, record_output, with_card_lineage
from potluck.ops.models import sources
from potluck.ops.models.sources import ModelInput, ModelSource, open_input
from potluck.ops.patch.card import card_text, check_card_path, relation
from potluck.ops.patch.fileformat import PatchContents, read_patch
from potluck.ops.patch.masked import check_task_scale, open_origin, rebuild_masked
from potluck.ops.patch.output import (
    Blocks,
    Spec,
    check_output,
    had_index,
    plan_output,
    write_output,
)
from potluck.tensors.digests import tensor_sha256
from potluck.tensors.dtypes import to_numpy

__all__ = ["ApplyReport", "apply_patch", "is_directory"]

#: How many differing tensor names an error message lists.
_SHOW = 5


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


def _verify_base(base: ModelSource, patch: PatchContents) -> list[str]:
    """Names of tensors whose base bytes differ from the patch's record (or are missing)."""
    present = set(base.names())
    bad = []
    for name, want in sorted(patch.base.items()):
        if name not in present or base.sha256(name) != want:
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
    origin: ModelSource | None = None,
) -> Iterator[np.ndarray | Blocks]:
    for name, _dtype, _shape in specs:
        if name not in patch.payloads:
            yield Blocks(base.blocks(name))
            continue
        payload = patch.payloads[name]
        streamed = _streamed(name, payload, base, scale, origin is not None)
        if streamed is not None:
            yield Blocks(
                _checked(name, streamed, patch.result.get(name) if check_results else None)
            )
            continue
        if origin is not None and payload.codec == MASK_CODEC:
            arr = rebuild_masked(name, payload, base, origin)  # a tall_masks / emr task part
        else:
            arr = _rebuild(name, payload, base, scale)
        want = patch.result.get(name)
        if check_results and want is not None and tensor_sha256(arr) != want:
            raise _result_mismatch(name)
        yield arr


def _result_mismatch(name: str) -> IntegrityError:
    return IntegrityError(
        f"patched tensor {name!r} does not match the hash recorded in the patch",
        hint="the patch or the base is corrupt; nothing was written",
        tensor=name,
    )


def _streamed(
    name: str, payload: Payload, base: ModelSource, scale: float, masked: bool
) -> Iterator[np.ndarray] | None:
    """The patched tensor block by block, when its codec streams (exact codecs, scale 1) and it
    is larger than a block; None otherwise (the tensor is rebuilt whole)."""
    codec = CODECS.get(payload.codec)
    if scale != 1.0 or not codec.streams or (masked and payload.codec == MASK_CODEC):
        return None
    shape, dtype = payload_shape_dtype(payload)
    if payload.codec == "full":
        old = np.broadcast_to(np.zeros((), to_numpy(dtype)), shape)  # never read
    else:
        old = base.read(name)
    if old.nbytes <= sources.BLOCK_BYTES or old.dtype.byteorder == ">":
        return None

    def done(start: int, stop: int) -> None:
        base.release(name, start, stop - start)

    return codec.decode_blocks(payload, old, block=sources.BLOCK_BYTES, done=done)


def _checked(name: str, pieces: Iterator[np.ndarray], want: str | None) -> Iterator[np.ndarray]:
    """``pieces``, then an ``IntegrityError`` if their bytes do not hash to ``want``."""
    h = hashlib.sha256()
    for piece in pieces:
        h.update(np.ascontiguousarray(piece).view(np.uint8).data)
        yield piece
    if want is not None and h.hexdigest() != want:
        raise _result_mismatch(name)


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
    with_base: ModelInput | None = None,
) -> ApplyReport:
    """Apply the patch at ``patch_path`` to the model BASE; write safetensors to ``out_path``.

    Every base hash is checked before anything is written: a wrong base is an
    ``IntegrityError`` unless ``force`` (then it is applied anyway and the report's ``warnings``
    say so). ``scale`` multiplies the decoded delta of lossy tensors (exact ones need ``force``).
    Output: the base's tensor order, new tensors appended; exact results are checked against
    their recorded hashes, and the output is only moved into place when everything succeeded.
    ``directory`` (default: ``is_directory(base)``) writes a model directory with the base's
    shard layout and config files (``potluck.ops.patch.output``); ``card`` (default: when
    writing a directory) writes a ``README.md`` model card naming ``base_ref`` (default: the
    base's label) — next to the output file when it is not a directory. A task patch of a
    ``tall_masks``/``emr`` merge also needs the merge's original base: ``with_base``, or where
    the patch records it (``ops.patch.masked``).
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
        origin = open_origin(patch, with_base, base, stack)  # task patches: the original base
        check_task_scale(patch, scale)
        edge = _lineage_edge(base, patch, report.patch_sha256, scale, base_ref)
        if card_text_ is not None:
            card_text_ = with_card_lineage(card_text_, edge)
        _check_scale(patch, scale, force, report.warnings)
        order = _output_order(base, patch)
        plan = plan_output(
            order, base.files, directory=as_dir, had_index=had_index(base.config_dir),
            metadata=base.metadata,
        )  # fmt: skip
        check = not report.warnings and scale == 1.0
        report.files = write_output(
            out_path,
            plan,
            lambda specs: _tensors(specs, base, patch, scale, check, origin),
            config_dir=base.config_dir if as_dir else None,
            card=card_text_,
        )
        report.removed = sorted(set(patch.removed) & set(base.names()))
        record_output(out_path, edge)  # a single file: <out>.lineage.json beside it
    report.card = card_text_ is not None
    report.results_verified = check and bool(patch.result)
    report.added = sorted(set(patch.payloads) - set(patch.base))
    report.changed = sorted(patch.base)
    report.relation = relation(patch)
    return report


def _lineage_edge(
    base: ModelSource, patch: PatchContents, sha: str, scale: float, base_ref: str | None
) -> Edge:
    """The lineage edge of the output: the base pinned by digest, the patch by sha256."""
    params = {"patch_sha256": sha, "base_digest": patch.base_digest, "scale": scale}
    rel = "adapter" if relation(patch) == "adapter" else "patch"
    if "composition" in patch.description:  # a fixed mixture written by `compose export`
        rel = "compose"
        params["composition"] = patch.description["composition"]
    refs = [base.label if base_ref is None else base_ref]
    return plan_edge([base], rel, "patch", params, refs)


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

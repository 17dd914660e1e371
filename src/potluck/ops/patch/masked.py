"""Applying a task patch of a ``tall_masks`` / ``emr`` merge (``task_mask`` payloads).

Such a patch rebuilds θₜ = θ₀ + γ·mask ⊙ (θ_m − θ₀): its pinned base is the merged model θ_m
(checked like every patch's base) and it also needs the merge's original base θ₀. That one is
given with ``--with BASE`` or found where the patch's description says the merge read it: first
relative to the merged model's directory (the two moved together), then at its absolute path.
Either way its weights digest over the masked tensors must be the one recorded; a missing or
different base is refused with the expected digest before anything is written.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from potluck.codecs import Payload
from potluck.codecs.mask import MASK_CODEC, decode_masked
from potluck.errors import IntegrityError, UserError
from potluck.ops.models.sources import ModelInput, ModelSource, open_input
from potluck.ops.patch.fileformat import PatchContents
from potluck.tensors.digests import tensor_sha256, weights_digest
from potluck.tensors.dtypes import from_numpy

__all__ = ["is_task_patch", "open_origin", "rebuild_masked"]

_WITH = "pass the base the merge was made from with --with BASE"


def is_task_patch(patch: PatchContents) -> bool:
    """Whether the patch holds ``task_mask`` payloads (so it needs the original base too)."""
    return any(p.codec == MASK_CODEC for p in patch.payloads.values())


def _recorded(patch: PatchContents) -> dict[str, Any]:
    origin = patch.description.get("origin")
    if not isinstance(origin, dict) or not isinstance(origin.get("weights_digest"), str):
        raise IntegrityError(
            "the task patch does not record its original base (description 'origin')",
            hint="re-create it with `potluck merge --method tall_masks|emr`",
        )
    return origin


def _find(origin: dict[str, Any], merged: ModelSource) -> str:
    here = Path(merged.label)
    folder = here if here.is_dir() else here.parent
    candidates = []
    if isinstance(origin.get("relpath"), str):
        candidates.append(folder / origin["relpath"])
    if isinstance(origin.get("path"), str):
        candidates.append(Path(origin["path"]))
    for path in candidates:
        if path.exists():
            return str(path)
    where = ", ".join(str(p) for p in candidates) or "(no path recorded)"
    raise UserError(
        f"the original base of this task patch ({origin.get('ref')!r}, weights digest "
        f"{origin['weights_digest']}) is not at {where}",
        hint=_WITH,
        expected=origin["weights_digest"],
    )


def _digest(origin: ModelSource, patch: PatchContents) -> str:
    entries: dict[str, tuple[str, list[int], str]] = {}
    present = set(origin.names())
    for name, payload in patch.payloads.items():
        if payload.codec != MASK_CODEC:
            continue
        if name not in present:
            return f"(no tensor {name!r})"
        arr = origin.read(name)
        entries[name] = (from_numpy(arr.dtype), list(arr.shape), tensor_sha256(arr))
        origin.release(name)
    return weights_digest(entries)


def open_origin(
    patch: PatchContents,
    with_base: ModelInput | None,
    merged: ModelSource,
    stack: ExitStack,
) -> ModelSource | None:
    """The original base of a task patch, checked (None for other patches); see the module."""
    if not is_task_patch(patch):
        if with_base is not None:
            raise UserError(
                "--with gives the original base of a task patch (OUT/tasks/*.patch of a "
                "tall_masks or emr merge); this patch does not need one",
                hint="leave out --with",
            )
        return None
    origin = _recorded(patch)
    source = open_input(with_base if with_base is not None else _find(origin, merged), stack)
    got, want = _digest(source, patch), origin["weights_digest"]
    if got != want:
        raise IntegrityError(
            f"{source.label} is not the original base of this task patch: weights digest {got}, "
            f"expected {want}",
            hint=_WITH,
            expected=want,
            got=got,
        )
    return source


def check_task_scale(patch: PatchContents, scale: float) -> None:
    """``--scale`` does not apply to task patches (their rescaler is part of the patch)."""
    if scale != 1.0 and is_task_patch(patch):
        raise UserError(
            f"--scale {scale:g} does not apply to a task patch: its rescaler is recorded in it",
            hint="leave --scale at 1",
        )


def rebuild_masked(
    name: str, payload: Payload, merged: ModelSource, origin: ModelSource | None
) -> np.ndarray:
    """Tensor ``name`` of the task's model (``open_origin`` has checked ``origin``)."""
    if origin is None:
        raise UserError(f"tensor {name!r} needs the original base", hint=_WITH)
    return decode_masked(payload, merged.read(name), origin.read(name), name=name)

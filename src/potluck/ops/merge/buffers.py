"""Tensors a merge does not merge: buffers carried over unchanged, and tensors left out on request.

A checkpoint may hold *buffers* besides parameters: tensors a model computes from its config and
never trains, such as BERT's ``embeddings.position_ids`` (``arange(max_positions)``), which the
original all-MiniLM-L6-v2 checkpoint has and every fine-tune saved by a recent transformers lacks.
A tensor is a buffer when its name matches ``BUFFER_PATTERNS`` or its dtype is not a float (an
integer or boolean tensor cannot be averaged). A buffer is never merged: it must be bit-identical
in every input that has it (else the merge stops, naming the inputs) and is carried over from the
model whose layout the output takes (the base, else the first model); a buffer only some other
inputs have is left out. Tensors matching an ``exclude_tensors`` glob are left out of the output.
Every carried, left-out and excluded name is reported (plan notes, ``--json``, model card).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field

from potluck.errors import UserError
from potluck.ops.models.sources import ModelSource, TensorInfo
from potluck.tensors.digests import tensor_sha256

__all__ = ["BUFFER_PATTERNS", "Unmerged", "check_identical", "excluded_by", "is_buffer"]

#: Names of non-trained tensors transformers models register (fnmatch globs; position and token
#: type ids are integers, caught by their dtype too, but old checkpoints store some as floats).
BUFFER_PATTERNS = (
    "position_ids",
    "*.position_ids",
    "*.token_type_ids",
    "*.inv_freq",
)
#: How many names a note lists before "…".
_SHOW = 5


def is_buffer(info: TensorInfo) -> bool:
    """Whether ``info`` is a buffer: a known buffer name, or a non-float dtype."""
    if any(fnmatch.fnmatchcase(info.name, p) for p in BUFFER_PATTERNS):
        return True
    return info.dtype.startswith(("I", "U", "BOOL"))


def excluded_by(name: str, globs: Sequence[str]) -> bool:
    """Whether ``name`` matches one of the ``exclude_tensors`` globs."""
    return any(fnmatch.fnmatchcase(name, g) for g in globs)


def check_identical(name: str, holders: Sequence[tuple[str, ModelSource, str]]) -> None:
    """Refuse a buffer whose dtype, shape or bytes differ between the inputs that have it
    (``holders``: model reference, source, the tensor's name there)."""
    seen: dict[tuple[str, tuple[int, ...], str], str] = {}
    for ref, src, tensor in holders:
        info = src.info(tensor)
        seen.setdefault((info.dtype, info.shape, tensor_sha256(src.read(tensor))), ref)
        src.release(tensor)
    if len(seen) > 1:
        refs = sorted(seen.values())
        raise UserError(
            f"tensor {name!r} is a buffer (not trained), but {refs[0]} and {refs[1]} hold "
            "different values for it, so neither can be carried over",
            hint=f"leave it out with --exclude-tensors '{name}' (exclude_tensors: in YAML), or "
            "merge models that agree on it",
            tensor=name,
            models=refs,
        )


@dataclass
class Unmerged:
    """What a merge plan does not merge: ``carried`` buffers (output name → the model they come
    from), ``left_out`` buffers the output's layout lacks, ``excluded`` names."""

    carried: dict[str, str] = field(default_factory=dict)
    left_out: set[str] = field(default_factory=set)
    excluded: set[str] = field(default_factory=set)

    def notes(self) -> list[str]:
        """One line per kind, for people (``--explain``, ``potluck merge``)."""
        out = []
        by_model: dict[str, list[str]] = {}
        for name, model in sorted(self.carried.items()):
            by_model.setdefault(model, []).append(name)
        for model, names in by_model.items():
            out.append(
                f"carried over unmerged from {model} ({len(names)} buffer(s), identical in "
                f"every input that has them): {_names(names)}"
            )
        if self.left_out:
            out.append(
                f"left out: {len(self.left_out)} buffer(s) the output's layout (the base, else "
                f"the first model) lacks: {_names(sorted(self.left_out))}"
            )
        if self.excluded:
            out.append(
                f"excluded by exclude_tensors: {len(self.excluded)} tensor(s): "
                f"{_names(sorted(self.excluded))}"
            )
        return out


def _names(names: list[str]) -> str:
    return ", ".join(names[:_SHOW]) + (
        f" and {len(names) - _SHOW} more" if len(names) > _SHOW else ""
    )

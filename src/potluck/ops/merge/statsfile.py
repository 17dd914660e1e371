"""Statistics files for data-aware merging (format version "1"; see ``docs/merging-stats.md``).

One safetensors file per model: one float32 tensor per parameter name (a diagonal Fisher of the
parameter's shape, or the [in, in] Gram matrix XᵀX of a linear weight's inputs — for an
embedding, whose Gram matrix is diagonal, the 1-D diagonal [num_embeddings]: lookup counts) and
``__metadata__`` (string → string, keys sorted):

* ``potluck_stats`` — the format version, ``"1"``; ``kind`` — ``"fisher"`` or ``"gram"``;
* ``samples`` / ``tokens`` — examples and non-padding tokens the statistics were computed on;
* ``model_sha256`` — JSON {tensor name: sha256 of the model tensor's bytes as stored in the
  checkpoint} (``tensor_sha256``: exact little-endian C-order bytes in the checkpoint's dtype),
  for the tensors the file covers that the checkpoint holds; ``model_digest`` — sha256 of its
  canonical JSON;
* ``data_sha256`` — sha256 of the data file's bytes ("" when unknown);
* ``tensor_sha256`` — JSON {name: sha256 of the stored statistics tensor}, checked on every read;
* ``input_axes`` (gram) — JSON {name: axis of the weight that indexes the layer input: 1 for
  ``nn.Linear`` [out, in], 0 for GPT-2 ``Conv1D`` [in, out]};
* ``fisher_norm`` (fisher) — ‖F‖₂ over every stored tensor (float64 sum of the float32 values),
  the constant of Fisher merging's ``normalize``;
* ``description`` — free-form JSON (tool, model path, loss, batch size, …).

This module does no deep learning: ``ops.merge.stats_torch`` computes the statistics.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from potluck.errors import FormatError, IntegrityError, UserError
from potluck.fileio import atomic_writer
from potluck.formats.base import TensorSegment
from potluck.formats.safetensors import build_header, metadata_json, scan_own_file
from potluck.merging import STATS_KINDS, TensorStats
from potluck.tensors.digests import canonical_json, tensor_sha256
from potluck.tensors.dtypes import array_from_bytes

#: Version written to ``potluck_stats``; readers refuse other versions.
STATS_VERSION = "1"
#: Statistics are stored in float32 (a float64 Gram of a 11008-wide layer would be ~1 GB).
STORE_DTYPE = np.dtype(np.float32)

_HINT = "the file is not a potluck statistics file, is corrupt, or was written by another version"
_REQUIRED = ("kind", "samples", "tokens", "model_sha256", "data_sha256", "tensor_sha256")


@dataclass
class StatsFile:
    """An opened statistics file: metadata now, tensors read (and hash-checked) on ``get``."""

    path: Path
    kind: str
    samples: int
    tokens: int
    model_sha256: dict[str, str]
    data_sha256: str
    input_axes: dict[str, int] = field(default_factory=dict)
    fisher_norm: float | None = None
    description: dict[str, Any] = field(default_factory=dict)
    tensor_sha256: dict[str, str] = field(default_factory=dict)
    segments: dict[str, TensorSegment] = field(default_factory=dict, repr=False)

    def names(self) -> list[str]:
        """The parameter names the file has statistics for, sorted."""
        return sorted(self.segments)

    def get(self, name: str) -> np.ndarray | None:
        """The statistics of parameter ``name`` (float32), or None; a bad hash is an error."""
        seg = self.segments.get(name)
        if seg is None:
            return None
        with self.path.open("rb") as f:
            f.seek(seg.offset)
            data = f.read(seg.length)
        if len(data) != seg.length:
            raise FormatError(f"{self.path}: file ends inside {name!r}", hint="it is truncated")
        arr = array_from_bytes(data, seg.dtype, seg.shape).copy()
        if tensor_sha256(arr) != self.tensor_sha256.get(name):
            raise IntegrityError(
                f"{self.path}: statistics of {name!r} do not match their recorded sha256",
                hint="the file is corrupt; compute the statistics again",
                path=str(self.path),
                tensor=name,
            )
        return arr

    def tensor_stats(self, name: str) -> TensorStats | None:
        """``get(name)`` with what a merge method needs (kind, input axis, Fisher norm)."""
        arr = self.get(name)
        if arr is None:
            return None
        return TensorStats(arr, self.kind, self.input_axes.get(name), self.fisher_norm)

    def check_model_tensor(self, name: str, tensor: np.ndarray) -> None:
        """Refuse ``tensor`` if the file recorded a different sha256 for model tensor ``name``."""
        want = self.model_sha256.get(name)
        if want is not None and tensor_sha256(tensor) != want:
            raise UserError(
                f"{self.path}: statistics were computed for another version of tensor {name!r}",
                hint="compute the statistics on the checkpoint being merged (or list the "
                "models in the same order as their statistics files)",
                path=str(self.path),
                tensor=name,
            )


def write_stats(
    path: str | os.PathLike[str],
    kind: str,
    tensors: Mapping[str, np.ndarray],
    *,
    samples: int,
    tokens: int,
    model_sha256: Mapping[str, str] | None = None,
    data_sha256: str = "",
    input_axes: Mapping[str, int] | None = None,
    description: Mapping[str, Any] | None = None,
) -> int:
    """Write a statistics file atomically (tensors as float32, sorted); return its size."""
    if kind not in STATS_KINDS:
        raise UserError(f"unknown statistics kind {kind!r}", hint="fisher or gram")
    arrays = [(n, np.ascontiguousarray(tensors[n], dtype=STORE_DTYPE)) for n in sorted(tensors)]
    axes = dict(input_axes or {})
    _check_arrays(kind, arrays, axes)
    meta = {
        "data_sha256": data_sha256,
        "description": canonical_json(dict(description or {})),
        "kind": kind,
        "model_digest": _digest(dict(model_sha256 or {})),
        "model_sha256": canonical_json(dict(model_sha256 or {})),
        "potluck_stats": STATS_VERSION,
        "samples": str(int(samples)),
        "tensor_sha256": canonical_json({n: tensor_sha256(a) for n, a in arrays}),
        "tokens": str(int(tokens)),
    }
    if kind == "gram":
        meta["input_axes"] = canonical_json({n: int(axes.get(n, 1)) for n, _ in arrays})
    else:
        meta["fisher_norm"] = repr(_norm(a for _, a in arrays))
    specs = [(n, "F32", tuple(int(d) for d in a.shape)) for n, a in arrays]
    header = build_header(specs, dict(sorted(meta.items())))
    size = len(header)
    with atomic_writer(path) as f:
        f.write(header)
        for _, arr in arrays:
            data = arr.astype("<f4", copy=False).tobytes()
            f.write(data)
            size += len(data)
    return size


def _check_arrays(kind: str, arrays: list[tuple[str, np.ndarray]], axes: dict[str, int]) -> None:
    for name, arr in arrays:
        if not np.all(np.isfinite(arr)):
            raise UserError(f"statistics of {name!r} contain NaN or infinity", tensor=name)
        if kind == "gram" and not _gram_shape(tuple(arr.shape)):
            raise UserError(
                f"Gram matrix of {name!r} is neither square nor a 1-D diagonal: {list(arr.shape)}"
            )
        if kind == "gram" and arr.ndim == 1 and np.any(arr < 0):
            raise UserError(f"diagonal Gram of {name!r} has negative values", tensor=name)
        if kind == "gram" and axes.get(name, 1) not in (0, 1):
            raise UserError(f"input axis of {name!r} must be 0 or 1, got {axes[name]!r}")
        if kind == "fisher" and np.any(arr < 0):
            raise UserError(f"Fisher of {name!r} has negative values", tensor=name)


def _gram_shape(shape: tuple[int, ...]) -> bool:
    """[d, d] (a full Gram matrix) or [d] (the diagonal of an embedding's)."""
    return len(shape) == 1 or (len(shape) == 2 and shape[0] == shape[1])


def _norm(arrays: Any) -> float:
    return math.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in arrays))


def _digest(hashes: Mapping[str, str]) -> str:
    return hashlib.sha256(canonical_json(dict(hashes)).encode("utf-8")).hexdigest()


def _json(path: Path, meta: Mapping[str, str], key: str, kind: type) -> Any:
    return metadata_json(meta, key, kind, what=f"{path}: metadata", hint=_HINT)


def _int(path: Path, meta: Mapping[str, str], key: str) -> int:
    try:
        return int(meta[key])
    except (KeyError, ValueError):
        raise FormatError(f"{path}: metadata {key!r} is not an integer", hint=_HINT) from None


def _open_layout(path: Path) -> tuple[dict[str, str], dict[str, TensorSegment]]:
    layout = scan_own_file(path, "statistics file", _HINT)
    if "potluck_stats" not in layout.metadata:
        raise FormatError(f"{path}: not a potluck statistics file", hint=_HINT)
    meta = layout.metadata
    if meta["potluck_stats"] != STATS_VERSION:
        raise FormatError(
            f"{path}: statistics format version {meta['potluck_stats']!r} is not supported",
            hint=f"this potluck reads version {STATS_VERSION}; upgrade potluck",
        )
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise FormatError(f"{path}: metadata {missing} missing", hint=_HINT)
    return meta, {s.name: s for s in layout.tensor_segments()}


def load_stats(path: str | os.PathLike[str]) -> StatsFile:
    """Open and check a statistics file (header and metadata; tensors are read on ``get``)."""
    p = Path(path)
    meta, segments = _open_layout(p)
    kind = meta["kind"]
    if kind not in STATS_KINDS:
        raise FormatError(f"{p}: unknown statistics kind {kind!r}", hint=_HINT)
    hashes = _json(p, meta, "tensor_sha256", dict)
    if set(hashes) != set(segments) or any(s.dtype != "F32" for s in segments.values()):
        raise FormatError(f"{p}: tensors do not match the recorded tensor_sha256", hint=_HINT)
    axes = _json(p, meta, "input_axes", dict) if kind == "gram" else {}
    norm = None
    if kind == "fisher":
        try:
            norm = float(meta["fisher_norm"])
        except (KeyError, ValueError):
            raise FormatError(f"{p}: metadata 'fisher_norm' missing", hint=_HINT) from None
    for name, seg in segments.items():
        if kind == "gram" and (not _gram_shape(tuple(seg.shape)) or axes.get(name) not in (0, 1)):
            raise FormatError(f"{p}: Gram entry {name!r} is malformed", hint=_HINT)
    if any(type(v) is not int or v not in (0, 1) for v in axes.values()):
        raise FormatError(f"{p}: metadata 'input_axes' holds an axis other than 0 or 1", hint=_HINT)
    return StatsFile(
        path=p,
        kind=kind,
        samples=_int(p, meta, "samples"),
        tokens=_int(p, meta, "tokens"),
        model_sha256=_json(p, meta, "model_sha256", dict),
        data_sha256=meta["data_sha256"],
        input_axes={k: int(v) for k, v in axes.items()},
        fisher_norm=norm,
        description=_json(p, meta, "description", dict) if "description" in meta else {},
        tensor_sha256=hashes,
        segments=segments,
    )


def check_stats_files(files: Sequence[StatsFile | None], kind: str | None, method: str) -> None:
    """Before merging: a method that needs ``kind`` gets at least one file, all of that kind;
    a method that needs none gets none."""
    given = [(i, f) for i, f in enumerate(files) if f is not None]
    if kind is None and given:
        raise UserError(
            f"merge method {method!r} takes no statistics, but model {given[0][0]} has a file",
            hint="remove the stats entries, or pick fisher / regmean",
            method=method,
        )
    if kind is not None and not given:
        raise UserError(
            f"merge method {method!r} needs {kind} statistics, but no model has a stats file",
            hint=f"compute them with 'potluck stats {kind} MODEL --data FILE -o STATS'",
            method=method,
        )
    for i, f in given:
        if f.kind != kind:
            raise UserError(
                f"model {i}: {f.path} holds {f.kind} statistics, but {method!r} needs {kind}",
                hint=f"compute them with 'potluck stats {kind}'",
                method=method,
                model=i,
                path=str(f.path),
            )


def stats_for(
    files: Sequence[StatsFile | None],
    name: str,
    tensors: Sequence[np.ndarray] | None = None,
) -> list[TensorStats | None] | None:
    """What to pass as ``stats=`` when merging tensor ``name``: one entry per model's file.

    None when no model has a statistics file at all. With ``tensors`` (the models' tensors as
    read from their checkpoints — original dtype, not float64 — in the same order), each is
    checked against the sha256 its file recorded (``UserError`` on a mismatch).
    """
    if all(f is None for f in files):
        return None
    out: list[TensorStats | None] = []
    for i, f in enumerate(files):
        entry = None if f is None else f.tensor_stats(name)
        if f is not None and entry is not None and tensors is not None:
            f.check_model_tensor(name, tensors[i])
        out.append(entry)
    return out

"""Where ``patch apply`` writes: one safetensors file, or a Hugging Face directory.

A directory output keeps the base's shard layout: the same shard file names (PyTorch ``.bin``
shards become ``.safetensors`` shards named ``model…``), each shard's tensors in the base's
order, removed tensors dropped, added tensors appended to the last shard in name order, a
``model.safetensors.index.json`` when the base had an index or several shards, and the files
that travel with a model (``sources.layout_files``: config, tokenizer, a sentence-transformers
layout) copied. Each safetensors file keeps its base file's ``__metadata__`` (``{"format":
"pt"}``), so a patch made from A to B and applied to A gives B byte for byte. Everything is
written into a temporary directory next to the output and renamed into place only when every
file succeeded.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from potluck.errors import FormatError, UserError
from potluck.fileio import atomic_dir, atomic_writer
from potluck.formats.safetensors import build_header
from potluck.ops.models import sources
from potluck.ops.models.sources import copy_layout
from potluck.tensors.dtypes import from_numpy, to_numpy

__all__ = ["INDEX_NAME", "Blocks", "OutputPlan", "check_output", "plan_output", "write_output"]

#: The shard index a directory output gets.
INDEX_NAME = "model.safetensors.index.json"
_INDEXES = (INDEX_NAME, "pytorch_model.bin.index.json")

Spec = tuple[str, str, tuple[int, ...]]


@dataclass
class Blocks:
    """A tensor given as flat C-order pieces of its dtype, written one after the other (a tensor
    rebuilt block by block never exists whole in memory)."""

    pieces: Iterable[np.ndarray]


TensorStream = Callable[[list[Spec]], Iterator[np.ndarray | Blocks]]


@dataclass
class OutputPlan:
    """The output files: shard file name → tensor specs in order (one unnamed entry for a file),
    and the safetensors ``__metadata__`` of each (absent: none)."""

    shards: dict[str, list[Spec]]
    directory: bool
    index: bool
    metadata: dict[str, dict[str, str]] = field(default_factory=dict)


def shard_name(name: str) -> str:
    """The output name of a base shard: ``.safetensors`` kept, others renamed."""
    if name.endswith(".safetensors"):
        return name
    stem = name.rsplit(".", 1)[0]
    if stem.startswith("pytorch_model"):
        stem = "model" + stem[len("pytorch_model") :]
    return stem + ".safetensors"


def plan_output(
    order: Sequence[Spec],
    files: Mapping[str, str],
    *,
    directory: bool,
    had_index: bool,
    metadata: Mapping[str, Mapping[str, str]] | None = None,
) -> OutputPlan:
    """Group ``order`` (base order, added tensors last) by the base shard each tensor lives in;
    ``metadata`` (base file → ``__metadata__``) goes to the output file made from each."""
    metas = {f: dict(m) for f, m in (metadata or {}).items() if m}
    if not directory:
        common = {tuple(sorted(m.items())) for m in metas.values()}
        one = dict(common.pop()) if len(common) == 1 else None
        return OutputPlan({"": list(order)}, False, False, {"": one} if one else {})
    shards: dict[str, list[Spec]] = {}
    for f in dict.fromkeys(files.values()):
        shards.setdefault(shard_name(f), [])
    if not shards:
        shards["model.safetensors"] = []
    last = list(shards)[-1]
    for spec in order:
        owner = files.get(spec[0])
        shards[shard_name(owner) if owner is not None else last].append(spec)
    out_meta = {shard_name(f): m for f, m in metas.items() if shard_name(f) in shards}
    return OutputPlan(shards, True, had_index or len(shards) > 1, out_meta)


def had_index(config_dir: Path | None) -> bool:
    """Whether the base directory has a shard index."""
    return config_dir is not None and any((config_dir / n).is_file() for n in _INDEXES)


def check_output(out: str | os.PathLike[str], directory: bool) -> None:
    """Refuse an output that cannot be written (before anything is read or written)."""
    p = Path(out)
    if directory and p.name.endswith((".safetensors", ".bin", ".pt", ".pth", ".npz")):
        raise UserError(
            f"{p}: the base is a model directory, so the output is a directory too",
            hint="give -o a directory name (without a checkpoint suffix)",
            path=str(p),
        )
    if directory and p.exists() and (not p.is_dir() or any(p.iterdir())):
        raise UserError(
            f"{p} exists and is not an empty directory",
            hint="the base is a model directory, so the output is one; pick a new -o path",
            path=str(p),
        )
    if not directory and p.is_dir():
        raise UserError(f"{p} is a directory", hint="the base is one file; -o names a file")


def _index_json(plan: OutputPlan) -> bytes:
    total = 0
    weight_map: dict[str, str] = {}
    for fname, specs in plan.shards.items():
        for name, dtype, shape in specs:
            total += math.prod(shape) * int(to_numpy(dtype).itemsize)
            weight_map[name] = fname
    doc = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def write_output(
    out: str | os.PathLike[str],
    plan: OutputPlan,
    stream: TensorStream,
    *,
    config_dir: Path | None,
    card: str | None,
) -> list[str]:
    """Write the planned files (see the module docstring); return the files written."""
    target = Path(out)
    if not plan.directory:
        specs = plan.shards[""]
        _write_safetensors(target, specs, stream(specs), plan.metadata.get(""))
        if card is not None:
            _write_bytes(target.parent / "README.md", card.encode("utf-8"))
        return [str(target)]
    with atomic_dir(target) as tmp:
        for fname, specs in plan.shards.items():
            _write_safetensors(tmp / fname, specs, stream(specs), plan.metadata.get(fname))
        if plan.index:
            _write_bytes(tmp / INDEX_NAME, _index_json(plan))
        copy_layout(config_dir, tmp)
        if card is not None:
            _write_bytes(tmp / "README.md", card.encode("utf-8"))
        written = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
    return [str(target / n) for n in written]


def _write_safetensors(
    path: Path,
    specs: list[Spec],
    tensors: Iterable[np.ndarray | Blocks],
    metadata: Mapping[str, str] | None,
) -> None:
    """A safetensors file written atomically, each tensor piece by piece (``BLOCK_BYTES``)."""
    with atomic_writer(path) as f:
        f.write(build_header(specs, metadata))
        for (name, dtype, shape), t in zip(specs, tensors, strict=True):
            if isinstance(t, Blocks):
                pieces: Iterable[np.ndarray] = t.pieces
            elif from_numpy(t.dtype) != dtype or tuple(t.shape) != shape:
                raise FormatError(f"tensor {name!r} changed dtype or shape while writing")
            else:
                pieces = _pieces(t)
            written = 0
            for piece in pieces:
                if from_numpy(piece.dtype) != dtype:
                    raise FormatError(f"tensor {name!r} changed dtype or shape while writing")
                f.write(np.ascontiguousarray(piece).reshape(-1).view(np.uint8).data)
                written += piece.nbytes
            if written != math.prod(shape) * to_numpy(dtype).itemsize:
                raise FormatError(f"tensor {name!r} changed dtype or shape while writing")


def _pieces(arr: np.ndarray) -> Iterator[np.ndarray]:
    flat = np.ascontiguousarray(arr).reshape(-1)
    step = max(1, sources.BLOCK_BYTES // max(1, flat.dtype.itemsize))
    for lo in range(0, flat.size, step):
        yield flat[lo : lo + step]


def _write_bytes(path: Path, data: bytes) -> None:
    with atomic_writer(path) as f:
        f.write(data)

"""Weights digests: the format- and sharding-independent identity of a model's tensors.

``weights_digest_of`` hashes what a model holds (``potluck.tensors.digests.weights_digest``
over every tensor of every shard); ``manifests_digest`` gets the same digest from potluck
manifests without decoding: a manifest's tensor ``oid`` is the sha256 of the tensor segment's
exact bytes, which are the tensor's little-endian C-order bytes, i.e. ``tensor_sha256``. Only
views (PyTorch tensors sharing a storage) are decoded and hashed.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack

import numpy as np

from potluck.errors import UserError
from potluck.objects.manifest import Manifest
from potluck.ops.models.sources import ModelSource, open_input
from potluck.tensors.digests import weights_digest

__all__ = ["array_sha256", "manifests_digest", "tensor_hashes", "weights_digest_of"]

#: Bytes hashed per step (keeps a copy of a big-endian or strided tensor small).
_CHUNK = 16 << 20

TensorHashes = dict[str, tuple[str, tuple[int, ...], str]]


def array_sha256(arr: np.ndarray) -> str:
    """``tensor_sha256(arr)`` computed in chunks (no copy of a contiguous little-endian array)."""
    flat = arr.reshape(-1) if arr.flags.c_contiguous else np.ascontiguousarray(arr).reshape(-1)
    h = hashlib.sha256()
    step = max(1, _CHUNK // max(1, flat.dtype.itemsize))
    for i in range(0, flat.size, step):
        part = flat[i : i + step]
        if part.dtype.byteorder == ">":
            part = part.astype(part.dtype.newbyteorder("<"))
        h.update(np.ascontiguousarray(part).view(np.uint8).data)
    return h.hexdigest()


def tensor_hashes(source: ModelSource) -> TensorHashes:
    """{name: (dtype, shape, sha256)} of every tensor of ``source``, one tensor at a time."""
    out: TensorHashes = {}
    for name in source.names():
        info = source.info(name)
        out[name] = (info.dtype, tuple(info.shape), source.sha256(name))  # pages let go
        source.release(name)
    return out


def _digest(hashes: Mapping[str, tuple[str, tuple[int, ...], str]]) -> str:
    return weights_digest(hashes)


def weights_digest_of(source: ModelSource | str | os.PathLike[str]) -> str:
    """The weights digest of a model: a ``ModelSource``, a checkpoint file or a model directory
    (all shards). Reads each tensor once (memory-mapped for safetensors)."""
    with ExitStack() as stack:
        return _digest(tensor_hashes(open_input(source, stack)))


ViewReader = Callable[[Manifest, str], np.ndarray]


def manifest_hashes(
    manifests: Iterable[Manifest], read_view: ViewReader, labels: Sequence[str] | None = None
) -> TensorHashes:
    """{name: (dtype, shape, sha256)} of the tensors the manifests describe (all shards): the
    tensor entries' oids, and ``read_view(manifest, name)`` hashed for each view.

    Shards of one model never share a name, so their digest is the model's whatever the
    sharding. Separate checkpoints can (task heads that all hold ``weight``): when a name comes
    from two manifests, every tensor is keyed ``"<label>:<name>"`` (``labels``: one per
    manifest, e.g. its path) so that no file's change goes unseen; without labels such a
    collision is refused."""
    parts = [_hashes_of(m, read_view) for m in manifests]
    seen: set[str] = set()
    collides = False
    for part in parts:
        collides = collides or not seen.isdisjoint(part)
        seen.update(part)
    if not collides:
        return {name: h for part in parts for name, h in part.items()}
    if labels is None or len(labels) != len(parts) or len(set(labels)) != len(parts):
        name = next(n for i, p in enumerate(parts) for n in p if any(n in q for q in parts[:i]))
        raise UserError(
            f"tensor {name!r} is in two of the checkpoints whose digest was asked for",
            hint="give one model's files (its path) at a time",
            tensor=name,
        )
    return {
        f"{label}:{n}": h
        for label, part in zip(labels, parts, strict=True)
        for n, h in part.items()
    }


def _hashes_of(m: Manifest, read_view: ViewReader) -> TensorHashes:
    out: TensorHashes = {}
    backing = {v.storage for v in m.views}
    for name, e in m.tensors().items():
        if name not in backing:
            out[name] = (e.dtype, tuple(e.shape), e.oid)
    for v in m.views:
        out[v.name] = (v.dtype, tuple(v.shape), array_sha256(read_view(m, v.name)))
    return out


def manifests_digest(
    manifests: Iterable[Manifest], read_view: ViewReader, labels: Sequence[str] | None = None
) -> str:
    """The weights digest of the model the manifests describe (see ``manifest_hashes``)."""
    return _digest(manifest_hashes(manifests, read_view, labels))

"""PyTorch checkpoints written by ``torch.save`` (the zip format, PyTorch ≥ 1.6).

The archive holds ``<prefix>/data.pkl`` (the object tree, with tensors referring to storages by
key), one ``<prefix>/data/<key>`` member per storage (raw little-endian bytes), and small records
(``byteorder``, ``version``, ``.data/serialization_id``, …). ``data.pkl`` is read with an
allowlisting unpickler (see ``pickle_safe``); torch is never imported.

Each storage member's data is one tensor segment. When exactly one tensor uses a storage and it
is the whole storage in C order, the segment carries that tensor's name, dtype and shape.
Otherwise (tied weights, views, slices) the segment is named ``storage:<key>`` with shape
``(numel,)`` and every tensor using it becomes a ``View``.

Legacy (pre-1.6, non-zip) ``torch.save`` files are not supported: ``sniff`` says no.
"""

from __future__ import annotations

import math
import zipfile
from collections import defaultdict
from typing import BinaryIO

from potluck.errors import FormatError
from potluck.formats.base import Layout, TensorSegment, View, brief, check_shape
from potluck.formats.npz import ZipMember, fill_raw, first_member_name, read_exact_at
from potluck.formats.npz import read_zip_members as _read_zip_members
from potluck.formats.pickle_safe import StorageRef, TensorRef, load_weights_pickle, walk_tensors
from potluck.tensors.dtypes import itemsize

_FMT = "pytorch"
_MAX_PICKLE = 1 << 30


def _is_c_contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    expected = 1
    for dim, st in zip(reversed(shape), reversed(stride), strict=True):
        if dim > 1 and st != expected:
            return False
        expected *= dim
    return True


def _read_small(f: BinaryIO, m: ZipMember) -> bytes:
    if m.compress_type != zipfile.ZIP_STORED:
        raise FormatError(
            f"{_FMT}: member {m.name!r} is compressed; torch.save stores members uncompressed",
            hint="re-save the checkpoint with torch.save",
        )
    if m.data_length > _MAX_PICKLE:
        raise FormatError(f"{_FMT}: member {m.name!r} is implausibly large ({m.data_length} B)")
    return read_exact_at(f, m.data_offset, m.data_length, _FMT, f"member {m.name!r}")


def _archive(members: list[ZipMember]) -> tuple[str, dict[str, ZipMember]]:
    """The archive prefix (first member's top folder, as PyTorch reads it) and members by name."""
    if not members:
        raise FormatError(f"{_FMT}: the zip archive is empty")
    prefix = members[0].name.split("/", 1)[0] + "/"
    by_name = {m.name: m for m in members}
    if prefix + "data.pkl" not in by_name:
        raise FormatError(
            f"{_FMT}: no {prefix}data.pkl in the archive",
            hint="this zip was not written by torch.save",
        )
    return prefix, by_name


def _check_byteorder(f: BinaryIO, member: ZipMember | None) -> None:
    if member is None:
        return  # older files have no record; they are little-endian
    order = _read_small(f, member).strip()
    if order == b"big":
        raise FormatError(
            f"{_FMT}: the checkpoint was saved on a big-endian machine",
            hint="load and re-save it with torch on a little-endian machine",
        )
    if order != b"little":
        raise FormatError(f"{_FMT}: unknown byteorder record {order[:40]!r}")


def _storage_dtype(storage: StorageRef, users: list[tuple[str, TensorRef]]) -> tuple[str, int]:
    """``(dtype, numel)`` of a storage; untyped storages take their tensors' common dtype."""
    if storage.dtype is not None:
        return storage.dtype, storage.numel
    dtypes = {t.dtype for _, t in users}
    if len(dtypes) == 1:
        (dtype,) = dtypes
        size = itemsize(dtype)
        if storage.numel % size == 0:
            return dtype, storage.numel // size
    return "U8", storage.numel


def _check_bounds(name: str, t: TensorRef, storage_bytes: int) -> None:
    if math.prod(t.shape) == 0:
        return
    last = t.offset + sum((d - 1) * s for d, s in zip(t.shape, t.stride, strict=True))
    if (last + 1) * itemsize(t.dtype) > storage_bytes:
        raise FormatError(
            f"{_FMT}: tensor {name!r} reaches past the end of its storage {brief(t.storage.key)}",
            hint="the checkpoint is corrupt",
        )


def _storage_segment(
    storage: StorageRef, member: ZipMember, users: list[tuple[str, TensorRef]]
) -> tuple[TensorSegment, list[View]]:
    """The tensor segment for one storage member and the views into it (if any)."""
    dtype, numel = _storage_dtype(storage, users)
    nbytes = numel * itemsize(dtype)
    if member.compress_type != zipfile.ZIP_STORED or member.data_length != nbytes:
        raise FormatError(
            f"{_FMT}: storage member {member.name!r} holds {member.data_length} bytes but the "
            f"pickle says {numel} elements of {dtype} ({nbytes} bytes)",
            hint="the checkpoint is truncated or corrupt",
        )
    for name, t in users:
        _check_bounds(name, t, nbytes)
        if nbytes % itemsize(t.dtype):
            raise FormatError(
                f"{_FMT}: tensor {name!r} ({t.dtype}) views storage {brief(storage.key)} of "
                f"{nbytes} bytes, which is not a whole number of {t.dtype} items",
                hint="the checkpoint is corrupt (torch.save does not write this)",
            )
    if len(users) == 1:
        name, t = users[0]
        if (
            t.offset == 0
            and t.dtype == dtype
            and math.prod(t.shape) == numel
            and _is_c_contiguous(t.shape, t.stride)
        ):
            return TensorSegment(member.data_offset, nbytes, name, dtype, t.shape), []
    seg_name = f"storage:{storage.key}"
    seg = TensorSegment(member.data_offset, nbytes, seg_name, dtype, (numel,))
    views = [View(name, seg_name, t.dtype, t.shape, t.stride, t.offset) for name, t in users]
    return seg, views


class TorchZipFormat:
    """Checkpoints written by ``torch.save`` (zip serialization)."""

    name: str = "pytorch"
    needs_random_access: bool = True

    def sniff(self, head: bytes, size: int) -> bool:
        """A zip whose first member is ``<prefix>/data.pkl``."""
        name = first_member_name(head)
        return name is not None and name.endswith(b"/data.pkl")

    def scan(self, f: BinaryIO, size: int) -> Layout:
        """Describe the archive; parse ``data.pkl`` without executing code."""
        members = _read_zip_members(f, size, _FMT)
        prefix, by_name = _archive(members)
        _check_byteorder(f, by_name.get(prefix + "byteorder"))
        pkl = _read_small(f, by_name[prefix + "data.pkl"])
        obj, storages = load_weights_pickle(pkl)
        named = walk_tensors(obj, name_budget=16 * len(pkl) + (1 << 20))
        users: dict[str, list[tuple[str, TensorRef]]] = defaultdict(list)
        seen: set[str] = set()
        for name, t in named:
            if name in seen:
                raise FormatError(
                    f"{_FMT}: two tensors would both be named {name!r}",
                    hint="rename keys so that joining nested keys with '.' stays unique",
                )
            seen.add(name)
            check_shape(_FMT, name, t.shape)
            users[t.storage.key].append((name, t))
        segments: list[TensorSegment] = []
        views: list[View] = []
        for key, storage in storages.items():
            member = by_name.get(f"{prefix}data/{key}")
            if member is None:
                raise FormatError(f"{_FMT}: storage {brief(key)} has no member in {prefix}data/")
            seg, seg_views = _storage_segment(storage, member, users[key])
            segments.append(seg)
            views.extend(seg_views)
        return Layout(_FMT, size, fill_raw(_FMT, size, segments), tuple(views))

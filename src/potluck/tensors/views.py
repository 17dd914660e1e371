"""Tensor views: a tensor that is a strided window into another tensor's storage, and loading
tensors (plain or views) by name from any reader. Pure numpy."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from potluck.errors import FormatError, UserError

if TYPE_CHECKING:  # numpy loads on first use: the manifest parser (git's filter) needs View only
    import numpy as np

#: A view may copy out at most this many times its storage's bytes (or ``VIEW_FLOOR`` bytes):
#: ``torch.ones(1).expand(10**11)`` is 4 bytes on disk and 373 GiB as an array.
VIEW_GROWTH = 16
VIEW_FLOOR = 1 << 28


@dataclass(frozen=True)
class View:
    """A tensor that is a strided view into the storage held by the tensor named ``storage``.

    ``offset`` and ``stride`` are in elements of ``dtype``, as in PyTorch. The same record
    describes a view found in a scanned file (``formats``) and one listed in a manifest.
    """

    name: str
    storage: str
    dtype: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int


def view_array(
    storage: np.ndarray,
    name: str,
    storage_name: str,
    shape: tuple[int, ...],
    stride: tuple[int, ...],
    offset: int,
) -> np.ndarray:
    """Copy of the strided view (PyTorch semantics, strides in elements) into ``storage``."""
    import numpy as np

    if any(d == 0 for d in shape):
        return np.zeros(shape, dtype=storage.dtype)
    need = offset + sum((d - 1) * s for d, s in zip(shape, stride, strict=True)) + 1
    if offset < 0 or any(s < 0 for s in stride) or need > storage.size:
        raise UserError(f"view {name!r} reaches past its storage {storage_name!r}")
    item = storage.dtype.itemsize
    nbytes = math.prod(shape) * item
    if nbytes > max(VIEW_GROWTH * storage.nbytes, VIEW_FLOOR):
        raise FormatError(
            f"tensor {name!r} is a view of {storage.nbytes} bytes (storage {storage_name!r}) "
            f"that would expand to {nbytes} bytes (shape {list(shape)}, stride {list(stride)})",
            hint="re-save it materialised (`t.contiguous()`/`t.clone()`); potluck copies views "
            f"out, up to {VIEW_GROWTH}x their storage",
            tensor=name,
        )
    arr = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=shape, strides=tuple(s * item for s in stride), writeable=False
    )
    return np.array(arr, copy=True)


def collect_tensors(
    names: Iterable[str] | None,
    tensor_names: Iterable[str],
    views: Mapping[str, View],
    read: Callable[[str], np.ndarray],
) -> dict[str, np.ndarray]:
    """The requested tensors (all when ``names`` is None): plain tensors through ``read(name)``,
    views as copies out of their storage (each storage read once)."""
    from potluck.tensors.dtypes import to_numpy

    known = list(tensor_names)
    wanted = known + list(views) if names is None else list(names)
    unknown = [n for n in wanted if n not in views and n not in known]
    if unknown:
        raise UserError(
            f"no tensor named {unknown[0]!r} in this checkpoint",
            hint="`potluck ls FILE` lists the names",
            unknown=unknown,
        )
    out: dict[str, np.ndarray] = {}
    storages: dict[str, np.ndarray] = {}
    for name in wanted:
        if name not in views:
            out[name] = read(name)
            continue
        v = views[name]
        if v.storage not in storages:
            storages[v.storage] = read(v.storage).reshape(-1)
        storage = storages[v.storage].view(to_numpy(v.dtype))
        out[name] = view_array(storage, v.name, v.storage, v.shape, v.stride, v.offset)
    return out

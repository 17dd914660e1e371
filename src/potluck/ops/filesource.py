"""Read tensors straight from a checkpoint file (work tree) using its scanned layout."""

from __future__ import annotations

from collections.abc import Iterable
from typing import BinaryIO

import numpy as np

from potluck.errors import UserError
from potluck.formats.base import Layout, TensorSegment
from potluck.ops.materialize import view_array
from potluck.tensors.dtypes import array_from_bytes, to_numpy


def read_tensors(
    f: BinaryIO, layout: Layout, names: Iterable[str] | None = None
) -> dict[str, np.ndarray]:
    """Load the requested tensors (all when None) from the open file ``f``."""
    segs = {s.name: s for s in layout.segments if isinstance(s, TensorSegment)}
    views = {v.name: v for v in layout.views}
    wanted = list(segs) + list(views) if names is None else list(names)
    unknown = [n for n in wanted if n not in segs and n not in views]
    if unknown:
        raise UserError(
            f"no tensor named {unknown[0]!r} in this checkpoint",
            hint="`potluck ls FILE` lists the names",
            unknown=unknown,
        )
    out: dict[str, np.ndarray] = {}
    for name in wanted:
        if name in segs:
            out[name] = _segment_array(f, segs[name])
        else:
            v = views[name]
            storage = _segment_array(f, segs[v.storage]).reshape(-1).view(to_numpy(v.dtype))
            out[name] = view_array(storage, v.name, v.storage, v.shape, v.stride, v.offset)
    return out


def _segment_array(f: BinaryIO, seg: TensorSegment) -> np.ndarray:
    f.seek(seg.offset)
    data = bytearray(seg.length)
    view = memoryview(data)
    got = 0
    while got < seg.length:
        n = f.readinto(view[got:])  # type: ignore[attr-defined]
        if not n:
            raise UserError(f"file ended inside tensor {seg.name!r}", hint="the file is truncated")
        got += n
    return array_from_bytes(data, seg.dtype, seg.shape)

"""Read tensors straight from a checkpoint file (work tree) using its scanned layout."""

from __future__ import annotations

from collections.abc import Iterable
from typing import BinaryIO

import numpy as np

from potluck.errors import PotluckError, UserError
from potluck.formats.base import Layout, TensorSegment, naming
from potluck.tensors.dtypes import array_from_bytes
from potluck.tensors.views import collect_tensors


def read_tensors(
    f: BinaryIO, layout: Layout, names: Iterable[str] | None = None, *, source: str | None = None
) -> dict[str, np.ndarray]:
    """Load the requested tensors (all when None) from the open file ``f``.

    Errors name the file as ``source`` (by default ``f.name``, when it has one).
    """
    segs = {s.name: s for s in layout.segments if isinstance(s, TensorSegment)}
    views = {v.name: v for v in layout.views}
    try:
        return collect_tensors(names, segs, views, lambda n: _segment_array(f, segs[n]))
    except PotluckError as e:
        where = source if source is not None else getattr(f, "name", None)
        renamed = naming(e, where) if isinstance(where, str) else e
        if renamed is e:
            raise
        raise renamed from e


def _segment_array(f: BinaryIO, seg: TensorSegment) -> np.ndarray:
    f.seek(seg.offset)
    data = bytearray(seg.length)
    view = memoryview(data)
    got = 0
    while got < seg.length:
        n = f.readinto(view[got:])  # type: ignore[attr-defined]
        if not n:
            raise UserError(
                f"file ended inside tensor {seg.name!r}",
                hint="the file is truncated (or changed since it was scanned)",
                tensor=seg.name,
            )
        got += n
    return array_from_bytes(data, seg.dtype, seg.shape)

"""Canonical dtype names (safetensors spelling) ↔ numpy / ml_dtypes dtypes.

``ml_dtypes`` (about a second to import) loads only when a dtype numpy lacks (BF16, FP8 …) is
met: every command that never sees one, and every git filter or driver start, skips it.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from potluck.errors import UserError

if TYPE_CHECKING:
    import numpy as np

# name -> (numpy dtype string, bytes per element), for the dtypes numpy has itself; little-endian
# throughout. Kept as text so that a git filter's start (which needs only sizes) skips numpy.
_NUMPY_CODES: dict[str, str] = {
    "BOOL": "?",
    "U8": "<u1",
    "I8": "<i1",
    "U16": "<u2",
    "I16": "<i2",
    "U32": "<u4",
    "I32": "<i4",
    "U64": "<u8",
    "I64": "<i8",
    "F16": "<f2",
    "F32": "<f4",
    "F64": "<f8",
    "C64": "<c8",
    "C128": "<c16",
}

# name -> type name in ml_dtypes, resolved on first use (``_ml_dtypes``).
_ML_DTYPES: dict[str, str] = {
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu",
}

# Bytes per element of every known name (checked against numpy and ml_dtypes by the tests).
_ITEMSIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "U16": 2,
    "I16": 2,
    "U32": 4,
    "I32": 4,
    "U64": 8,
    "I64": 8,
    "F16": 2,
    "F32": 4,
    "F64": 8,
    "C64": 8,
    "C128": 16,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E4M3FNUZ": 1,
    "F8_E5M2FNUZ": 1,
    "F8_E8M0": 1,
}
_resolved: dict[str, np.dtype] | None = None


@functools.cache
def _numpy_dtypes() -> dict[str, np.dtype]:
    """The dtypes numpy has itself, by name (imports numpy the first time)."""
    import numpy as np

    return {name: np.dtype(code) for name, code in _NUMPY_CODES.items()}


def _ml_dtypes() -> dict[str, np.dtype]:
    """The ml_dtypes entries as numpy dtypes (imports ``ml_dtypes`` the first time)."""
    global _resolved
    if _resolved is None:
        import ml_dtypes
        import numpy as np

        _resolved = {name: np.dtype(getattr(ml_dtypes, t)) for name, t in _ML_DTYPES.items()}
    return _resolved


def dtype_names() -> list[str]:
    """All canonical dtype names potluck knows."""
    return sorted([*_NUMPY_CODES, *_ML_DTYPES])


def to_numpy(name: str) -> np.dtype:
    """numpy dtype for a canonical name such as ``"BF16"``."""
    known = _numpy_dtypes().get(name)
    if known is not None:
        return known
    if name in _ML_DTYPES:
        return _ml_dtypes()[name]
    raise UserError(f"unknown dtype {name!r}", hint=f"known: {', '.join(dtype_names())}")


def itemsize(name: str) -> int:
    """Bytes per element of a canonical dtype (without importing numpy)."""
    size = _ITEMSIZES.get(name)
    if size is None:
        raise UserError(f"unknown dtype {name!r}", hint=f"known: {', '.join(dtype_names())}")
    return size


@functools.cache
def grouping_size(name: str) -> int:
    """Element width the object encoding groups bytes by: the itemsize when it is 1, 2, 4 or 8,
    else 1 (also for a name that is not a known dtype)."""
    try:
        size = itemsize(name)
    except UserError:
        return 1
    return size if size in (1, 2, 4, 8) else 1


def from_numpy(dtype: np.dtype) -> str:
    """Canonical name of a numpy dtype (byte order normalised to little-endian)."""
    import numpy as np

    dt = np.dtype(dtype)
    if dt.byteorder == ">":
        dt = dt.newbyteorder("<")
    for name, known in _numpy_dtypes().items():
        if known == dt:
            return name
    for name, known in _ml_dtypes().items():
        if known == dt:
            return name
    raise UserError(f"dtype {dt} is not supported", hint=f"supported: {', '.join(dtype_names())}")


def array_from_bytes(
    data: bytes | bytearray | memoryview, dtype: str, shape: tuple[int, ...]
) -> np.ndarray:
    """View little-endian bytes as an array of ``dtype`` and ``shape`` (no copy when possible)."""
    import numpy as np

    dt = to_numpy(dtype)
    count = 1
    for d in shape:
        count *= d
    if len(data) != count * dt.itemsize:
        raise UserError(
            f"{len(data)} bytes cannot hold a {dtype} tensor of shape {list(shape)}",
            hint="the file or object is inconsistent; run `potluck fsck`",
        )
    return np.frombuffer(data, dtype=dt, count=count).reshape(shape)

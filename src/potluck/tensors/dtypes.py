"""Canonical dtype names (safetensors spelling) ↔ numpy / ml_dtypes dtypes.

``ml_dtypes`` (about a second to import) loads only when a dtype numpy lacks (BF16, FP8 …) is
met: every command that never sees one, and every git filter or driver start, skips it.
"""

from __future__ import annotations

import numpy as np

from potluck.errors import UserError

# name -> numpy dtype, for the dtypes numpy has itself. Little-endian throughout.
_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype("<u1"),
    "I8": np.dtype("<i1"),
    "U16": np.dtype("<u2"),
    "I16": np.dtype("<i2"),
    "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"),
    "U64": np.dtype("<u8"),
    "I64": np.dtype("<i8"),
    "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "C64": np.dtype("<c8"),
    "C128": np.dtype("<c16"),
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
_resolved: dict[str, np.dtype] | None = None


def _ml_dtypes() -> dict[str, np.dtype]:
    """The ml_dtypes entries as numpy dtypes (imports ``ml_dtypes`` the first time)."""
    global _resolved
    if _resolved is None:
        import ml_dtypes

        _resolved = {name: np.dtype(getattr(ml_dtypes, t)) for name, t in _ML_DTYPES.items()}
    return _resolved


def dtype_names() -> list[str]:
    """All canonical dtype names potluck knows."""
    return sorted([*_DTYPES, *_ML_DTYPES])


def to_numpy(name: str) -> np.dtype:
    """numpy dtype for a canonical name such as ``"BF16"``."""
    known = _DTYPES.get(name)
    if known is not None:
        return known
    if name in _ML_DTYPES:
        return _ml_dtypes()[name]
    raise UserError(f"unknown dtype {name!r}", hint=f"known: {', '.join(dtype_names())}")


def itemsize(name: str) -> int:
    """Bytes per element of a canonical dtype."""
    return int(to_numpy(name).itemsize)


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
    dt = np.dtype(dtype)
    if dt.byteorder == ">":
        dt = dt.newbyteorder("<")
    for name, known in _DTYPES.items():
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

"""The safetensors format: ``u64 N`` + ``N`` bytes of JSON header + tensor data.

Layout: one raw segment for the length prefix and header, then one tensor segment per tensor in
data-offset order. Only the header is read; tensor data is never touched.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import struct
from collections.abc import Iterable, Mapping
from operator import itemgetter
from typing import TYPE_CHECKING, Any, BinaryIO

from potluck.errors import FormatError
from potluck.fileio import atomic_writer
from potluck.formats.base import (
    MAX_ELEMENTS,
    Layout,
    RawSegment,
    Segment,
    TensorSegment,
    brief,
    check_shape,
    check_tiling,
)
from potluck.tensors.dtypes import dtype_names, from_numpy, itemsize

if TYPE_CHECKING:
    import numpy as np

#: The safetensors library refuses headers larger than this (100 MB).
MAX_HEADER_SIZE = 100_000_000

#: Rank of each dtype in the safetensors library's ``Dtype`` enum (increasing alignment). The
#: library writes tensors sorted by descending rank, then by name. ``C128`` is not a safetensors
#: dtype; potluck places it last (largest alignment).
_DTYPE_RANK: dict[str, int] = {
    name: rank
    for rank, name in enumerate(
        [
            "BOOL",
            "U8",
            "I8",
            "F8_E5M2",
            "F8_E4M3",
            "F8_E8M0",
            "F8_E4M3FNUZ",
            "F8_E5M2FNUZ",
            "I16",
            "U16",
            "F16",
            "BF16",
            "I32",
            "U32",
            "F32",
            "C64",
            "F64",
            "I64",
            "U64",
            "C128",
        ]
    )
}

_FMT = "safetensors"


def _read_exact(f: BinaryIO, n: int, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise FormatError(
            f"{_FMT}: file ends after {len(data)} of the {n} bytes of the {what}",
            hint="the file is truncated; re-download or re-save it",
        )
    return data


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@functools.cache
def _itemsize(dtype: str) -> int:
    return itemsize(dtype)


def _parse_entry(name: str, entry: object) -> tuple[str, tuple[int, ...], int, int]:
    """Validate one header entry; return ``(dtype, shape, begin, end)``. A well-formed entry
    takes the quick way (the same checks, with no messages to prepare); anything else is
    looked at by ``_checked_entry``, which says what is wrong."""
    if type(entry) is dict:
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if (
            type(dtype) is str
            and dtype in _DTYPE_RANK
            and type(shape) is list
            and type(offsets) is list
            and len(offsets) == 2
        ):
            begin, end = offsets
            if type(begin) is int and type(end) is int and 0 <= begin <= end:
                nbytes, elements = _itemsize(dtype), 1
                for d in shape:
                    if type(d) is not int or d < 0:
                        break
                    nbytes *= d
                    elements *= max(d, 1)
                    if elements > MAX_ELEMENTS:
                        break
                else:
                    if end - begin == nbytes:
                        return dtype, tuple(shape), begin, end
    return _checked_entry(name, entry)


def _checked_entry(name: str, entry: object) -> tuple[str, tuple[int, ...], int, int]:
    """``_parse_entry`` that names what is wrong with the entry (``FormatError``)."""
    what = f"{_FMT}: tensor {brief(name)}"
    if not isinstance(entry, dict):
        raise FormatError(f"{_FMT}: header entry for tensor {brief(name)} is not an object")
    dtype = entry.get("dtype")
    shape = entry.get("shape")
    offsets = entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _DTYPE_RANK:
        raise FormatError(
            f"{what} has unknown dtype {brief(dtype)}",
            hint=f"known dtypes: {', '.join(dtype_names())}",
        )
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise FormatError(f"{what} has an invalid shape {brief(shape)}")
    check_shape(_FMT, name, tuple(shape))
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise FormatError(f"{what} has invalid data_offsets {brief(offsets)}")
    begin, end = offsets
    expected = math.prod(shape) * itemsize(dtype)
    if end - begin != expected:
        raise FormatError(
            f"{what} ({dtype}, shape {brief(shape)}) needs {expected} bytes "
            f"but its data_offsets [{begin}, {end}] span {end - begin}",
            hint="the header is inconsistent; the file is corrupt",
        )
    return dtype, tuple(shape), begin, end


def _parse_metadata(value: object) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise FormatError(f"{_FMT}: __metadata__ must map strings to strings")
    return dict(value)


def _decode_header(raw: bytes) -> dict[str, Any]:
    """The header's JSON object. Nesting is bounded by the JSON parser's recursion limit (a
    valid header is 3 levels deep: entries, their fields, shape lists): deeper is an error."""
    try:
        header = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise FormatError(
            f"{_FMT}: header is nested too deeply to be a safetensors header (a flat map of "
            "tensor entries)",
            hint="the file is corrupt or was crafted",
        ) from None
    except ValueError as exc:  # UnicodeDecodeError, JSONDecodeError, an over-long integer
        raise FormatError(
            f"{_FMT}: header is not valid UTF-8 JSON ({str(exc)[:200]})",
            hint="the file is corrupt or not a safetensors file",
        ) from None
    if not isinstance(header, dict):
        raise FormatError(f"{_FMT}: header is not a JSON object")
    return header


def _tensor_segments(
    header: dict[str, Any], data_start: int, size: int | None
) -> tuple[list[TensorSegment], int]:
    """Tensor segments in offset order, checking they cover the data region exactly, and the
    file size (``size``, or when None the one the entries imply: where the last one ends)."""
    entries = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, begin, end = _parse_entry(name, entry)
        entries.append((begin, end, name, dtype, shape))
    entries.sort(key=_BY_OFFSETS)
    if size is None:
        size = data_start + max((end for _, end, _, _, _ in entries), default=0)
    return _tiled(entries, data_start, size), size


_BY_OFFSETS = itemgetter(0, 1)


def _tiled(
    entries: list[tuple[int, int, str, str, tuple[int, ...]]], data_start: int, size: int
) -> list[TensorSegment]:
    """The segments of the sorted ``entries``, which must tile the data region exactly."""
    pos = 0
    out: list[TensorSegment] = []
    for begin, end, name, dtype, shape in entries:
        if begin < pos:
            raise FormatError(
                f"{_FMT}: tensor {brief(name)} at data offset {begin} is overlapping the "
                f"previous tensor, which ends at {pos}",
                hint="the header is corrupt (overlapping data_offsets)",
            )
        if begin > pos:
            raise FormatError(
                f"{_FMT}: {begin - pos} bytes before tensor {brief(name)} belong to no tensor",
                hint="the header is corrupt (a gap between data_offsets)",
            )
        out.append(TensorSegment(data_start + begin, end - begin, name, dtype, shape))
        pos = end
    if data_start + pos > size:
        raise FormatError(
            f"{_FMT}: tensor data ends at byte {data_start + pos} but the file has only "
            f"{size} bytes (truncated data)",
            hint="the file is truncated; re-download or re-save it",
        )
    if data_start + pos < size:
        raise FormatError(
            f"{_FMT}: {size - data_start - pos} trailing bytes after the last tensor",
            hint="the file has data its header does not describe",
        )
    return out


def _layout(header: dict[str, Any], n: int, size: int | None) -> Layout:
    """The layout of a file of ``size`` bytes (None: the size the header implies) whose
    ``n``-byte header decodes to ``header``."""
    metadata = _parse_metadata(header["__metadata__"]) if "__metadata__" in header else {}
    tensors, size = _tensor_segments(header, 8 + n, size)
    segments: list[Segment] = [RawSegment(0, 8 + n), *tensors]
    return Layout(_FMT, size, check_tiling(_FMT, size, segments), metadata=metadata)


class SafetensorsFormat:
    """Hugging Face safetensors files."""

    name: str = "safetensors"
    needs_random_access: bool = False

    def sniff(self, head: bytes, size: int) -> bool:
        """8-byte header length ``N`` with ``8 + N <= size``, followed by ``{``."""
        if len(head) < 9:
            return False
        (n,) = struct.unpack_from("<Q", head)
        return 2 <= n < MAX_HEADER_SIZE and 8 + n <= size and head[8:9] == b"{"

    def scan(self, f: BinaryIO, size: int) -> Layout:
        """Read the header (only) and describe the file."""
        (n,) = struct.unpack("<Q", _read_exact(f, 8, "header length"))
        if n > MAX_HEADER_SIZE:
            raise FormatError(
                f"{_FMT}: header length {n} is larger than the {MAX_HEADER_SIZE}-byte limit",
                hint="the file is corrupt or not a safetensors file",
            )
        if 8 + n > size:
            raise FormatError(
                f"{_FMT}: header length {n} runs past the end of the {size}-byte file",
                hint="the file is truncated or not a safetensors file",
            )
        return _layout(_decode_header(_read_exact(f, n, "header")), n, size)

    def prefix_length(self, head: bytes) -> int:
        """Bytes at the start of the file that ``scan_prefix`` needs (8 + header length)."""
        (n,) = struct.unpack_from("<Q", head)
        return 8 + int(n)

    def scan_prefix(self, prefix: bytes) -> Layout:
        """Scan from the prefix alone; the file size is the one the header implies (the end of
        the last tensor). The caller checks that the stream really has that many bytes."""
        (n,) = struct.unpack_from("<Q", prefix)
        if n > MAX_HEADER_SIZE or len(prefix) != 8 + n:
            return self.scan(io.BytesIO(prefix), len(prefix))  # says what is wrong
        return _layout(_decode_header(prefix[8:]), n, None)


def scan_own_file(path: str | os.PathLike[str], what: str, hint: str) -> Layout:
    """Scan ``path``, a safetensors file potluck writes (a patch, a statistics file).

    Errors name the file and tell a file cut short ("``what`` is truncated (N bytes, its header
    needs M)") from one that is not safetensors at all ("not a ``what``", with ``hint``).
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(9)
        fmt = SafetensorsFormat()
        if (
            len(head) < 9
            or head[8:9] != b"{"
            or not 2 <= fmt.prefix_length(head) - 8 < (MAX_HEADER_SIZE)
        ):
            raise FormatError(f"{path}: not a {what}", hint=hint, path=str(path))
        need = fmt.prefix_length(head)
        if need <= size:
            f.seek(0)
            try:
                need = fmt.scan_prefix(f.read(need)).size
            except FormatError as e:
                raise FormatError(f"{path}: not a {what} ({e.message})", hint=hint) from e
        if need > size:
            raise FormatError(
                f"{path}: {what} is truncated ({size} bytes, its header needs {need})",
                hint="the download or copy was cut short; get the file again",
                path=str(path),
            )
        f.seek(0)
        try:
            return fmt.scan(f, size)
        except FormatError as e:
            raise FormatError(f"{path}: not a {what} ({e.message})", hint=hint) from e


def canonical_order(
    tensors: Iterable[tuple[str, str, tuple[int, ...]]],
) -> list[tuple[str, str, tuple[int, ...]]]:
    """Order ``(name, dtype, shape)`` triples the way the safetensors library writes them.

    The library (``safetensors.serialize``, used by ``safetensors.numpy.save``/``torch.save_file``)
    sorts tensors by *descending* dtype rank in its ``Dtype`` enum (which lists dtypes in
    increasing alignment: BOOL, U8, I8, F8_*, I16, U16, F16, BF16, I32, U32, F32, C64, F64, I64,
    U64), then by name (byte-wise, which equals code-point order). Writing data in this order
    keeps every tensor aligned to its item size.
    """
    items = list(tensors)
    for name, dtype, _ in items:
        if dtype not in _DTYPE_RANK:
            raise FormatError(f"{_FMT}: tensor {name!r} has unknown dtype {dtype!r}")
    return sorted(items, key=lambda t: (-_DTYPE_RANK[t[1]], t[0]))


def build_header(
    tensors: list[tuple[str, str, tuple[int, ...]]], metadata: Mapping[str, str] | None
) -> bytes:
    """The complete safetensors prefix (8-byte length + padded JSON) for ``tensors`` in order.

    ``tensors`` are ``(name, dtype, shape)``; their data is laid out back to back in the given
    order. The JSON is compact, non-ASCII characters are written as UTF-8, and it is padded with
    spaces to a multiple of 8 bytes — byte for byte what the safetensors library writes when the
    tensors are given in ``canonical_order``. ``__metadata__`` comes first, keys in the mapping's
    order (the library writes them in hash order, so files with several metadata keys match
    only up to that order).
    """
    header: dict[str, object] = {}
    if metadata is not None:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, dtype, shape in tensors:
        if name in header:
            raise FormatError(f"{_FMT}: tensor name {name!r} is used twice or is reserved")
        if dtype not in _DTYPE_RANK:
            raise FormatError(f"{_FMT}: tensor {name!r} has unknown dtype {dtype!r}")
        length = math.prod(shape) * itemsize(dtype)
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + length],
        }
        offset += length
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def metadata_json(meta: Mapping[str, str], key: str, kind: type, *, what: str, hint: str) -> Any:
    """``__metadata__`` entry ``key`` parsed as JSON of type ``kind``.

    A missing key, text that is not JSON (or nested past the recursion limit) or another type is
    a ``FormatError`` saying ``what`` (e.g. ``"patch metadata"``) ``key`` is wrong.
    """
    try:
        value = json.loads(meta[key])
    except (KeyError, ValueError, RecursionError):
        raise FormatError(f"{what} {key!r} is missing or not JSON", hint=hint) from None
    if not isinstance(value, kind):
        raise FormatError(f"{what} {key!r} is not a {kind.__name__}", hint=hint)
    return value


def write_safetensors(
    path: str | os.PathLike[str],
    specs: list[tuple[str, str, tuple[int, ...]]],
    arrays: Iterable[np.ndarray],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write a safetensors file atomically: ``specs`` in order, data from ``arrays`` (lazily),
    ``metadata`` as its ``__metadata__`` (none when None)."""
    import numpy as np

    with atomic_writer(path) as f:
        f.write(build_header(specs, metadata))
        for (name, dtype, shape), arr in zip(specs, arrays, strict=True):
            if from_numpy(arr.dtype) != dtype or tuple(arr.shape) != shape:
                raise FormatError(f"tensor {name!r} changed dtype or shape while writing")
            f.write(np.ascontiguousarray(arr).tobytes())

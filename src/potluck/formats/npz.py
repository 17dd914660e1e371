"""NumPy ``.npz`` archives (``np.savez`` / ``np.savez_compressed``), plus the zip helpers that the
PyTorch format shares.

A zip is described without extracting anything: the central directory (via ``zipfile``) lists the
members, each member's *local* header gives where its data starts, and everything that is not
tensor data (local headers, ``.npy`` headers, data descriptors, the central directory) is raw.
"""

from __future__ import annotations

import ast
import itertools
import json
import math
import struct
import zipfile
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

from potluck.errors import FormatError, UserError
from potluck.formats.base import (
    Layout,
    RawSegment,
    Segment,
    TensorSegment,
    brief,
    check_shape,
    check_tiling,
)
from potluck.tensors.dtypes import from_numpy

if TYPE_CHECKING:
    import numpy as np

ZIP_MAGIC = b"PK\x03\x04"
_LOCAL_HEADER = struct.Struct("<4s5H3I2H")  # 30 bytes
_NPY_MAGIC = b"\x93NUMPY"
_MAX_NPY_HEADER = 1 << 20
_FMT = "npz"


@dataclass(frozen=True)
class ZipMember:
    """One zip member: where its local header starts and where its (stored) data lies."""

    name: str
    header_offset: int
    data_offset: int
    data_length: int  # compressed size: bytes at data_offset
    file_size: int  # uncompressed size
    compress_type: int


def first_member_name(head: bytes) -> bytes | None:
    """Name of the first member of a zip from its first bytes, or None if it is not a zip."""
    if len(head) < _LOCAL_HEADER.size or head[:4] != ZIP_MAGIC:
        return None
    name_len = int.from_bytes(head[26:28], "little")
    if len(head) < 30 + name_len:
        return None
    return head[30 : 30 + name_len]


def read_exact_at(f: BinaryIO, offset: int, n: int, fmt: str, what: str) -> bytes:
    """Read exactly ``n`` bytes at ``offset`` or raise ``FormatError`` naming ``what``."""
    f.seek(offset)
    data = f.read(n)
    if len(data) != n:
        raise FormatError(
            f"{fmt}: file ends inside {what} (byte {offset + len(data)})",
            hint="the file is truncated; re-download or re-save it",
        )
    return data


def _open_zip(f: BinaryIO, fmt: str) -> list[zipfile.ZipInfo]:
    try:
        with zipfile.ZipFile(f) as zf:
            return zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as exc:
        raise FormatError(
            f"{fmt}: not a readable zip archive ({exc})",
            hint="the file is truncated or corrupt",
        ) from None
    except (struct.error, OverflowError, NotImplementedError, UnicodeDecodeError) as exc:
        raise FormatError(f"{fmt}: malformed zip archive ({exc})") from None


def _member(f: BinaryIO, info: zipfile.ZipInfo, size: int, fmt: str) -> ZipMember:
    what = f"the local header of {info.filename!r}"
    if info.header_offset < 0 or info.header_offset + _LOCAL_HEADER.size > size:
        raise FormatError(f"{fmt}: {what} lies past the end of the file")
    fields = _LOCAL_HEADER.unpack(read_exact_at(f, info.header_offset, 30, fmt, what))
    if fields[0] != ZIP_MAGIC:
        raise FormatError(f"{fmt}: {what} at byte {info.header_offset} has a bad signature")
    name_len, extra_len = fields[9], fields[10]
    raw_name = read_exact_at(f, info.header_offset + 30, name_len, fmt, what)
    encoding = "utf-8" if info.flag_bits & 0x800 else "cp437"
    if raw_name.decode(encoding, errors="replace") != info.orig_filename:
        raise FormatError(f"{fmt}: {what} names {raw_name!r}; the central directory disagrees")
    if info.flag_bits & 0x1:
        raise FormatError(f"{fmt}: member {info.filename!r} is encrypted")
    data_offset = info.header_offset + 30 + name_len + extra_len
    if data_offset + info.compress_size > size:
        raise FormatError(
            f"{fmt}: data of member {info.filename!r} runs past the end of the file",
            hint="the file is truncated; re-download or re-save it",
        )
    return ZipMember(
        info.filename,
        info.header_offset,
        data_offset,
        info.compress_size,
        info.file_size,
        info.compress_type,
    )


def read_zip_members(f: BinaryIO, size: int, fmt: str) -> list[ZipMember]:
    """All members of the zip open as ``f``, in file order, with checked local headers.

    Sizes and offsets come from the central directory (zip64 included); the data start comes
    from each local header's own name and extra lengths. Overlapping members are an error.
    """
    members = sorted(
        (_member(f, info, size, fmt) for info in _open_zip(f, fmt)),
        key=lambda m: m.header_offset,
    )
    for prev, cur in itertools.pairwise(members):
        if prev.data_offset + prev.data_length > cur.header_offset:
            raise FormatError(
                f"{fmt}: members {prev.name!r} and {cur.name!r} are overlapping",
                hint="the zip archive is corrupt",
            )
    return members


def fill_raw(fmt: str, size: int, tensors: list[TensorSegment]) -> tuple[Segment, ...]:
    """Tile ``[0, size)`` with ``tensors`` (sorted by offset) and raw segments in between."""
    segments: list[Segment] = []
    pos = 0
    for seg in sorted(tensors, key=lambda s: (s.offset, s.length)):
        if seg.offset > pos:
            segments.append(RawSegment(pos, seg.offset - pos))
        segments.append(seg)
        pos = max(pos, seg.offset + seg.length)
    if pos < size:
        segments.append(RawSegment(pos, size - pos))
    return check_tiling(fmt, size, segments)


@dataclass(frozen=True)
class NpyHeader:
    """A parsed ``.npy`` header."""

    descr: object
    fortran_order: bool
    shape: tuple[int, ...]
    length: int  # bytes from the magic to the start of the data


def npy_header_length(prefix: bytes, what: str) -> int:
    """Total ``.npy`` header length from its first 12 bytes (magic, version, header length)."""
    if len(prefix) < 10 or prefix[:6] != _NPY_MAGIC:
        raise FormatError(f"{_FMT}: {what} is not a .npy array (bad magic)")
    major = prefix[6]
    if major == 1:
        return 10 + int.from_bytes(prefix[8:10], "little")
    if major in (2, 3) and len(prefix) >= 12:
        return 12 + int.from_bytes(prefix[8:12], "little")
    raise FormatError(f"{_FMT}: {what} has unsupported .npy version {major}.{prefix[7]}")


def parse_npy_header(raw: bytes, what: str) -> NpyHeader:
    """Parse a complete ``.npy`` header (magic through the newline) without running code."""
    start = 10 if raw[6] == 1 else 12
    text = raw[start:].decode("utf-8" if raw[6] == 3 else "latin1", errors="replace")
    try:
        d = ast.literal_eval(text.strip())
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise FormatError(f"{_FMT}: {what} has an unreadable .npy header") from None
    if not isinstance(d, dict) or set(d) != {"descr", "fortran_order", "shape"}:
        raise FormatError(f"{_FMT}: {what} has an invalid .npy header {text.strip()[:200]!r}")
    shape = d["shape"]
    if not isinstance(shape, tuple) or not all(
        isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in shape
    ):
        raise FormatError(f"{_FMT}: {what} has an invalid shape {brief(shape)}")
    check_shape(_FMT, what, shape)
    if not isinstance(d["fortran_order"], bool):
        raise FormatError(f"{_FMT}: {what} has an invalid fortran_order")
    return NpyHeader(d["descr"], d["fortran_order"], shape, len(raw))


def _descr_text(descr: object) -> str:
    """``repr`` of a parsed ``descr`` (a literal: a tree, so linear), clipped to 1000 chars."""
    try:
        text = repr(descr)
    except RecursionError:
        return "<nested too deeply>"
    return text if len(text) <= 1000 else text[:1000] + "…"


def _classify(h: NpyHeader, what: str) -> tuple[np.dtype | None, str]:
    """``(numpy dtype, canonical name or reason it cannot be tracked)``; dtype None if untracked.

    Object arrays are refused: reading them needs pickle, i.e. code execution.
    """
    if not isinstance(h.descr, str):
        return None, f"structured dtype {_descr_text(h.descr)}"
    try:
        import numpy as np

        dt = np.dtype(h.descr)
    except (TypeError, ValueError):
        raise FormatError(f"{_FMT}: {what} has an unknown dtype {brief(h.descr)}") from None
    if dt.hasobject:
        raise FormatError(
            f"{_FMT}: {what} is an object array; reading it needs pickle code execution",
            hint="save numeric arrays only (np.load would need allow_pickle=True)",
        )
    if dt.str.startswith(">"):
        return None, f"big-endian dtype {dt.str}"
    if h.fortran_order and sum(d > 1 for d in h.shape) > 1:
        return None, "fortran order"
    try:
        return dt, from_numpy(dt)
    except UserError:
        return None, f"dtype {dt.str} has no potluck equivalent"


def _stored_npy(f: BinaryIO, m: ZipMember, meta: dict[str, str]) -> TensorSegment | None:
    what = f"member {m.name!r}"
    prefix = read_exact_at(f, m.data_offset, min(12, m.data_length), _FMT, what)
    hlen = npy_header_length(prefix, what)
    if hlen > min(m.data_length, _MAX_NPY_HEADER):
        raise FormatError(f"{_FMT}: {what} has a .npy header longer than the member")
    h = parse_npy_header(read_exact_at(f, m.data_offset, hlen, _FMT, what), what)
    dt, canon = _classify(h, what)
    nbytes = m.data_length - hlen
    expected = math.prod(h.shape) * (dt.itemsize if dt is not None else 0)
    if dt is not None and nbytes != expected:
        raise FormatError(
            f"{_FMT}: {what} holds {nbytes} data bytes but shape {list(h.shape)} of {canon} "
            f"needs {expected}",
            hint="the archive is truncated or corrupt",
        )
    name = m.name[: -len(".npy")]
    if dt is None:
        meta[f"untracked:{name}"] = canon
        return None
    return TensorSegment(m.data_offset + hlen, nbytes, name, canon, h.shape)


def _inflate_prefix(f: BinaryIO, m: ZipMember, what: str) -> bytes:
    """Decompress just enough of a deflated member to hold its ``.npy`` header."""
    d = zlib.decompressobj(-15)
    out = b""
    need = 12
    pos = 0
    try:
        while len(out) < need:
            if d.unconsumed_tail:
                data = d.unconsumed_tail
            elif pos < m.data_length:
                n = min(4096, m.data_length - pos)
                data = read_exact_at(f, m.data_offset + pos, n, _FMT, what)
                pos += n
            else:
                break
            out += d.decompress(data, 65536)
            if need == 12 and len(out) >= 12:
                need = npy_header_length(out[:12], what)
                if need > _MAX_NPY_HEADER:
                    raise FormatError(f"{_FMT}: {what} has an oversized .npy header")
    except zlib.error as exc:
        raise FormatError(f"{_FMT}: {what} is not valid deflate data ({exc})") from None
    if len(out) < need:
        raise FormatError(f"{_FMT}: {what} ends inside its .npy header")
    return out[:need]


def _deflated_npy(f: BinaryIO, m: ZipMember, meta: dict[str, str]) -> None:
    what = f"member {m.name!r}"
    h = parse_npy_header(_inflate_prefix(f, m, what), what)
    dt, canon = _classify(h, what)
    name = m.name[: -len(".npy")]
    dtype = canon if dt is not None else _descr_text(h.descr)
    meta[f"deflated:{name}"] = json.dumps({"dtype": dtype, "shape": list(h.shape)})


class NpzFormat:
    """NumPy ``.npz`` archives.

    Stored ``.npy`` members with a little-endian numeric dtype become tensors named after the
    member (without ``.npy``). Deflated members (``np.savez_compressed``) stay raw, their dtype and
    shape recorded in ``metadata["deflated:<name>"]``. Fortran-order, big-endian and structured
    arrays stay raw with the reason in ``metadata["untracked:<name>"]``. Object arrays are refused.
    """

    name: str = "npz"
    needs_random_access: bool = True

    def sniff(self, head: bytes, size: int) -> bool:
        """A zip whose first member is a ``.npy`` file."""
        name = first_member_name(head)
        return name is not None and name.endswith(b".npy")

    def scan(self, f: BinaryIO, size: int) -> Layout:
        """Describe the archive from its central directory and local/.npy headers."""
        meta: dict[str, str] = {}
        tensors: list[TensorSegment] = []
        for m in read_zip_members(f, size, _FMT):
            if not m.name.endswith(".npy"):
                meta[f"untracked:{m.name}"] = "not a .npy member"
            elif m.compress_type == zipfile.ZIP_STORED:
                seg = _stored_npy(f, m, meta)
                if seg is not None:
                    tensors.append(seg)
            elif m.compress_type == zipfile.ZIP_DEFLATED:
                _deflated_npy(f, m, meta)
            else:
                meta[f"untracked:{m.name[:-4]}"] = f"zip compression method {m.compress_type}"
        names = [t.name for t in tensors]
        if len(set(names)) != len(names):
            raise FormatError(f"{_FMT}: two members have the same name")
        return Layout(_FMT, size, fill_raw(_FMT, size, tensors), metadata=meta)

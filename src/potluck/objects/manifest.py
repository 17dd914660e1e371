"""The manifest: the canonical text git stores in place of a checkpoint.

Format v1 (UTF-8, one record per line, ``\\n`` line ends)::

    potluck manifest v1
    {"format":"safetensors","size":1234,"metadata":{...}}
    {"raw":"<sha256>","size":88}
    {"tensor":"h.0.attn.weight","dtype":"F32","shape":[768,2304],"oid":"<sha256>","size":7077888}
    {"view":"lm_head.weight","storage":"storage:0","dtype":"F32","shape":[..],"stride":[..],"offset":0}

Line 2 describes the file; then one line per segment in file order (``raw`` structure or a
``tensor``), whose bytes concatenated give the file back exactly; then ``view`` lines sorted by
name (tensors living inside a shared storage). Keys appear in the fixed order shown, JSON is
compact with ASCII escapes, so the text depends only on the file's content. ``parse`` refuses any
text that is not in this canonical form.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from potluck.errors import FormatError
from potluck.tensors.views import View

MAGIC = b"potluck manifest v1\n"
_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class RawEntry:
    """Structural bytes of the file (header, zip records, pickle), stored verbatim."""

    oid: str
    size: int


@dataclass(frozen=True)
class TensorEntry:
    """One tensor's (or storage's) little-endian bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    oid: str
    size: int


Entry = RawEntry | TensorEntry


@dataclass(frozen=True)
class Manifest:
    """A checkpoint file described as ordered segments plus views."""

    format: str
    size: int
    entries: tuple[Entry, ...]
    views: tuple[View, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)

    def tensors(self) -> dict[str, TensorEntry]:
        """Tensor entries by name (views are not included)."""
        return {e.name: e for e in self.entries if isinstance(e, TensorEntry)}

    def oids(self) -> Iterator[str]:
        """Every object id this manifest needs, in file order."""
        for e in self.entries:
            yield e.oid

    def with_entries(self, entries: tuple[Entry, ...]) -> Manifest:
        """A copy with other entries (size recomputed)."""
        return replace(self, entries=entries, size=sum(e.size for e in entries))


def is_manifest(data: bytes) -> bool:
    """True when ``data`` starts like a manifest."""
    return data.startswith(MAGIC)


def _dumps(obj: dict[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True, sort_keys=False)


def _entry_record(e: Entry) -> dict[str, Any]:
    if isinstance(e, RawEntry):
        return {"raw": e.oid, "size": e.size}
    return {
        "tensor": e.name,
        "dtype": e.dtype,
        "shape": list(e.shape),
        "oid": e.oid,
        "size": e.size,
    }


def _view_record(v: View) -> dict[str, Any]:
    return {
        "view": v.name,
        "storage": v.storage,
        "dtype": v.dtype,
        "shape": list(v.shape),
        "stride": list(v.stride),
        "offset": v.offset,
    }


def dumps(m: Manifest) -> bytes:
    """Canonical bytes of a manifest."""
    head = {"format": m.format, "size": m.size, "metadata": dict(sorted(m.metadata.items()))}
    lines = [MAGIC.decode().rstrip("\n"), _dumps(head)]
    lines += [_dumps(_entry_record(e)) for e in m.entries]
    lines += [_dumps(_view_record(v)) for v in sorted(m.views, key=lambda v: v.name)]
    return ("\n".join(lines) + "\n").encode("ascii")


def _check_oid(oid: Any) -> str:
    if not isinstance(oid, str) or len(oid) != 64 or not set(oid) <= _HEX:
        raise FormatError(f"manifest: bad object id {oid!r}")
    return oid


def _shape(v: Any) -> tuple[int, ...]:
    if not isinstance(v, list) or not all(isinstance(d, int) and d >= 0 for d in v):
        raise FormatError(f"manifest: bad shape {v!r}")
    return tuple(v)


def _parse_record(rec: dict[str, Any]) -> Entry | View:
    if "raw" in rec:
        return RawEntry(_check_oid(rec["raw"]), int(rec["size"]))
    if "tensor" in rec:
        return TensorEntry(
            str(rec["tensor"]),
            str(rec["dtype"]),
            _shape(rec["shape"]),
            _check_oid(rec["oid"]),
            int(rec["size"]),
        )
    if "view" in rec:
        return View(
            str(rec["view"]),
            str(rec["storage"]),
            str(rec["dtype"]),
            _shape(rec["shape"]),
            tuple(int(s) for s in rec["stride"]),
            int(rec["offset"]),
        )
    raise FormatError(f"manifest: unknown record {rec!r}")


def parse(data: bytes) -> Manifest:
    """Parse canonical manifest bytes; anything non-canonical raises ``FormatError``."""
    if not is_manifest(data):
        raise FormatError(
            "not a potluck manifest", hint="the blob does not start with the magic line"
        )
    try:
        lines = data.decode("ascii").split("\n")
        if lines[-1] != "":
            raise ValueError("missing final newline")
        head = json.loads(lines[1])
        records = [_parse_record(json.loads(line)) for line in lines[2:-1]]
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, IndexError) as e:
        raise FormatError(f"manifest is malformed: {e}", hint="run `potluck fsck`") from e
    entries = tuple(r for r in records if not isinstance(r, View))
    views = tuple(r for r in records if isinstance(r, View))
    m = Manifest(str(head["format"]), int(head["size"]), entries, views, dict(head["metadata"]))
    if dumps(m) != data:
        raise FormatError("manifest is not in canonical form", hint="run `potluck fsck`")
    if sum(e.size for e in entries) != m.size:
        raise FormatError(
            "manifest sizes do not add up to the file size", hint="run `potluck fsck`"
        )
    return m

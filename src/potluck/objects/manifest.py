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
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from json.encoder import encode_basestring_ascii as _quote
from typing import Any

from potluck.errors import FormatError
from potluck.tensors.views import View

MAGIC = b"potluck manifest v1\n"
_HEX = frozenset("0123456789abcdef")
_OID_TEXT = re.compile(rb"[0-9a-f]{64}")


@dataclass(frozen=True)
class RawEntry:
    """Structural bytes of the file (header, zip records, pickle), stored verbatim."""

    oid: str
    size: int


@dataclass(frozen=True, init=False)
class TensorEntry:
    """One tensor's (or storage's) little-endian bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    oid: str
    size: int

    def __init__(self, name: str, dtype: str, shape: tuple[int, ...], oid: str, size: int):
        # Fields set through ``__dict__`` (as ``TensorSegment``: one entry per tensor).
        d = self.__dict__
        d["name"], d["dtype"], d["shape"], d["oid"], d["size"] = name, dtype, shape, oid, size


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


def _entry_line(e: Entry) -> str:
    """One entry's line: its record through ``_dumps`` (the tensor entries of a manifest take
    ``_entry_lines``' bulk way, which prints the same text)."""
    return _dumps(_entry_record(e))


def _entry_lines(entries: tuple[Entry, ...]) -> list[str]:
    """``_entry_line`` of each entry; the tensor entries' lines in one comprehension, each
    distinct shape printed once, when every size and dimension is an int (else entry by entry:
    ``_entry_line`` then prints what JSON would)."""
    tensors = [e for e in entries if type(e) is TensorEntry]
    shapes = {e.shape for e in tensors}
    printed = {shape: _shape_text(shape) for shape in shapes}
    if not tensors or None in printed.values() or {type(e.size) for e in tensors} != {int}:
        return list(map(_entry_line, entries))
    q = _quote
    lines = [
        f'{{"tensor":{q(e.name)},"dtype":{q(e.dtype)},"shape":[{printed[e.shape]}],'
        f'"oid":{q(e.oid)},"size":{e.size}}}'
        for e in tensors
    ]
    if len(tensors) == len(entries):
        return lines
    made = iter(lines)
    return [next(made) if type(e) is TensorEntry else _entry_line(e) for e in entries]


def _shape_text(shape: tuple[int, ...]) -> str | None:
    """The dimensions joined by commas, None unless each is an int (not a bool)."""
    return ",".join(map(str, shape)) if set(map(type, shape)) <= _INT_ONLY else None


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
    lines += _entry_lines(m.entries)
    lines += [_dumps(_view_record(v)) for v in sorted(m.views, key=lambda v: v.name)]
    return ("\n".join(lines) + "\n").encode("ascii")


_OID_STR = re.compile(r"[0-9a-f]{64}")


def _check_oid(oid: Any) -> str:
    if not isinstance(oid, str) or _OID_STR.fullmatch(oid) is None:
        raise FormatError(f"manifest: bad object id {oid!r}")
    return oid


_INT_ONLY = {int}


def _shape(v: Any) -> tuple[int, ...]:
    """A list of non-negative integers (not booleans) as a tuple."""
    if type(v) is not list or (v and (set(map(type, v)) != _INT_ONLY or min(v) < 0)):
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


#: What every manifest error suggests (``potluck fsck`` names each damaged manifest).
MANIFEST_HINT = (
    "`potluck fsck` lists every damaged manifest with the commits that hold it; "
    "`potluck fsck --repair` rewrites the work-tree copy in canonical form"
)


def _error(source: str | None, message: str) -> FormatError:
    where = f"{source}: " if source else ""
    return FormatError(f"{where}{message}", hint=MANIFEST_HINT, source=source, problem=message)


def _records(
    data: bytes, source: str | None, whole: bool = False
) -> tuple[dict[str, Any], list[Entry | View]]:
    """The head record and the segment/view records, one JSON object per non-empty line.

    With ``whole`` the lines are first decoded as one JSON array (one call instead of one per
    tensor); the caller must then check that the text is canonical (``parse`` does), since
    that is what guarantees one record per line. Any error takes the line-by-line way, which
    names the line."""
    if not is_manifest(data):
        raise FormatError(
            f"{source}: not a potluck manifest" if source else "not a potluck manifest",
            hint="the blob does not start with the magic line",
            source=source,
        )
    if whole:
        try:
            lines = data.decode("ascii").split("\n")
            head, *rest = json.loads("[" + ",".join(lines[1:-1]) + "]")
            if isinstance(head, dict) and len(rest) == len(lines) - 3 and not lines[-1]:
                return head, [_parse_record(rec) for rec in rest]
        except (ValueError, KeyError, TypeError, IndexError, ArithmeticError, RecursionError):
            pass
        except FormatError:
            pass
    lineno = 2
    try:
        lines = data.decode("ascii").split("\n")
        head = json.loads(lines[1])
        records = []
        for i, line in enumerate(lines[2:], start=3):
            lineno = i
            if line.strip():
                records.append(_parse_record(json.loads(line)))
    except FormatError as e:
        raise _error(source, f"{e.message} on line {lineno}") from e
    except (ValueError, KeyError, TypeError, IndexError, ArithmeticError, RecursionError) as e:
        raise _error(source, f"manifest is malformed on line {lineno}: {e}") from e
    if not isinstance(head, dict):
        raise _error(source, "manifest is malformed on line 2: not a JSON object")
    return head, records


def parse_lenient(data: bytes, source: str | None = None) -> Manifest:
    """Parse a manifest that may not be in canonical form (other spacing, key order, escapes or
    line ends), checking everything else ``parse`` checks; ``source`` (a path, blob or commit)
    is named in every error. Used to read damaged manifests, never to write one."""
    return _manifest(*_records(data, source), source)


def _manifest(head: dict[str, Any], records: list[Entry | View], source: str | None) -> Manifest:
    entries = tuple(r for r in records if not isinstance(r, View))
    views = tuple(r for r in records if isinstance(r, View))
    try:
        if not isinstance(head["metadata"], dict):
            raise TypeError("metadata is not a JSON object")
        m = Manifest(str(head["format"]), int(head["size"]), entries, views, dict(head["metadata"]))
    except (KeyError, TypeError, ValueError, ArithmeticError) as e:
        raise _error(source, f"manifest is malformed on line 2: {e}") from e
    if sum(e.size for e in entries) != m.size:
        raise _error(source, "manifest sizes do not add up to the file size")
    return m


def _first_difference(data: bytes, canonical: bytes) -> str:
    """Where ``data`` first departs from the canonical text (line number and both versions)."""
    got, want = data.split(b"\n"), canonical.split(b"\n")
    for i, (a, b) in enumerate(zip(got, want, strict=False), start=1):
        if a != b:
            return f"line {i} is {a[:80]!r}, canonical {b[:80]!r}"
    return f"{len(got) - 1} lines, canonical {len(want) - 1}"


def parse(data: bytes, source: str | None = None) -> Manifest:
    """Parse canonical manifest bytes; anything non-canonical raises ``FormatError`` (naming
    ``source``, e.g. ``path (blob 1a2b3c)``, and the first line that differs)."""
    m = _manifest(*_records(data, source, whole=True), source)
    canonical = dumps(m)
    if canonical != data:
        parse_lenient(data, source)  # names the line when one is malformed on its own
        raise _error(
            source, f"manifest is not in canonical form ({_first_difference(data, canonical)})"
        )
    return m


def salvage_oids(data: bytes) -> set[str]:
    """Every object id a manifest's text mentions, whether or not it parses (gc keeps them all
    for a damaged manifest, since it cannot tell which ones the file needs)."""
    return {m.decode() for m in _OID_TEXT.findall(data)}

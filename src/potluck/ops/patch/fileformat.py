"""The patch file format (version "1"): one safetensors file, written byte for byte by potluck.

Tensors are named ``<tensor name>/<payload array name>`` and hold each codec payload's arrays,
in sorted name order. ``__metadata__`` (string → string, keys sorted) holds:

* ``potluck_patch`` — the format version, ``"1"``;
* ``base`` — JSON {tensor name: sha256 of the base tensor's bytes} for every tensor the patch
  reads, and ``base_digest`` — sha256 of that dict's canonical JSON;
* ``result`` — JSON {tensor name: sha256 of the resulting tensor} for exactly-coded tensors;
* ``tensors`` — JSON {tensor name: {"codec", "meta", "error"}} (``error`` null when exact);
* ``added`` / ``removed`` — JSON lists of tensor names;
* ``description`` — free-form JSON (author, task, license);
* ``digest`` — sha256 over the canonical JSON of every other metadata key and each payload
  array's name, dtype, shape and bytes (checked on read when present: tampering or corruption is
  an ``IntegrityError``). It is a checksum, not a signature.

All JSON is compact with sorted keys, so the same inputs always give byte-identical files.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from potluck.codecs import CODECS, ErrorReport, Payload
from potluck.errors import FormatError, IntegrityError, UserError
from potluck.fileio import atomic_writer
from potluck.formats.base import TensorSegment, naming
from potluck.formats.safetensors import build_header, metadata_json, scan_own_file
from potluck.tensors.digests import base_digest, canonical_json
from potluck.tensors.dtypes import array_from_bytes, from_numpy

#: Version written to ``potluck_patch``; readers refuse other versions.
PATCH_VERSION = "1"

_HINT = "the file is not a potluck patch, is corrupt, or was written by another potluck version"


@dataclass
class PatchContents:
    """Everything a patch file holds, decoded."""

    payloads: dict[str, Payload]
    base: dict[str, str]
    result: dict[str, str]
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    description: dict[str, Any] = field(default_factory=dict)

    @property
    def base_digest(self) -> str:
        """Digest of the base hashes this patch was made against."""
        return base_digest(self.base)


def _error_json(error: ErrorReport | None) -> dict[str, float] | None:
    if error is None:
        return None
    return {
        "relative_error": error.relative_error,
        "max_abs_error": error.max_abs_error,
        "kept_fraction": error.kept_fraction,
    }


def _metadata(c: PatchContents) -> dict[str, str]:
    tensors = {
        name: {"codec": p.codec, "meta": dict(p.meta), "error": _error_json(p.error)}
        for name, p in c.payloads.items()
    }
    meta = {
        "added": canonical_json(sorted(c.added)),
        "base": canonical_json(c.base),
        "base_digest": c.base_digest,
        "description": canonical_json(c.description),
        "potluck_patch": PATCH_VERSION,
        "removed": canonical_json(sorted(c.removed)),
        "result": canonical_json(c.result),
        "tensors": canonical_json(tensors),
    }
    return dict(sorted(meta.items()))


def _arrays(c: PatchContents) -> list[tuple[str, np.ndarray]]:
    out = []
    for name, payload in c.payloads.items():
        for key, arr in payload.arrays.items():
            out.append((f"{name}/{key}", np.ascontiguousarray(arr)))
    return sorted(out, key=lambda t: t[0])


def content_digest(meta: Mapping[str, str], arrays: Iterable[tuple[str, np.ndarray]]) -> str:
    """The ``digest`` of a patch: its metadata (without ``digest``) and its arrays, in order."""
    h = hashlib.sha256(canonical_json({k: v for k, v in meta.items() if k != "digest"}).encode())
    for name, arr in arrays:
        spec = canonical_json([name, from_numpy(arr.dtype), [int(d) for d in arr.shape]])
        h.update(b"\0" + spec.encode() + b"\0")
        h.update(np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False).data)
    return h.hexdigest()


def patch_bytes(c: PatchContents) -> Iterator[bytes]:
    """The patch file's bytes in order: header, then each payload array."""
    arrays = _arrays(c)
    specs = [(n, from_numpy(a.dtype), tuple(int(d) for d in a.shape)) for n, a in arrays]
    meta = _metadata(c)
    meta["digest"] = content_digest(meta, arrays)
    yield build_header(specs, dict(sorted(meta.items())))
    for _name, arr in arrays:
        yield arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()


def write_patch(path: str | os.PathLike[str], contents: PatchContents) -> int:
    """Write ``contents`` to ``path`` atomically; return the file's size in bytes."""
    size = 0
    with atomic_writer(path) as f:
        for chunk in patch_bytes(contents):
            f.write(chunk)
            size += len(chunk)
    return size


def _loads(meta: Mapping[str, str], key: str, kind: type, items: type | None = None) -> Any:
    """Metadata ``key`` as JSON of type ``kind`` (a dict's values or a list's items of type
    ``items`` when given)."""
    value = metadata_json(meta, key, kind, what="patch metadata", hint=_HINT)
    found: Any = value
    members = list(found.values() if isinstance(found, dict) else found)
    if items is not None and not all(isinstance(v, items) for v in members):
        what = "values" if isinstance(value, dict) else "items"
        raise FormatError(f"patch metadata {key!r} has {what} that are not strings", hint=_HINT)
    return value


_ERROR_FIELDS = ("relative_error", "max_abs_error", "kept_fraction")


def _payload(name: str, entry: Any, arrays: dict[str, np.ndarray]) -> Payload:
    if (
        not isinstance(entry, dict)
        or not isinstance(entry.get("meta"), dict)
        or not isinstance(entry.get("codec"), str)
    ):
        raise FormatError(f"patch entry for {name!r} is malformed", hint=_HINT)
    err = entry.get("error")
    error = None
    if err is not None:
        if not (
            isinstance(err, dict)
            and set(err) == set(_ERROR_FIELDS)
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in err.values())
        ):
            raise FormatError(f"patch entry for {name!r} has a malformed error report", hint=_HINT)
        error = ErrorReport(**{k: float(err[k]) for k in _ERROR_FIELDS})
    return Payload(entry["codec"], arrays, dict(entry["meta"]), error)


def _read_arrays(path: str | os.PathLike[str]) -> tuple[dict[str, str], dict[str, Any]]:
    layout = scan_own_file(path, "potluck patch", _HINT)
    if layout.metadata.get("potluck_patch") is None:
        raise FormatError(f"{path}: not a potluck patch", hint=_HINT)
    if layout.metadata["potluck_patch"] != PATCH_VERSION:
        raise FormatError(
            f"{path}: patch format version {layout.metadata['potluck_patch']!r} is not supported",
            hint=f"this potluck reads version {PATCH_VERSION}; upgrade potluck",
        )
    grouped: dict[str, dict[str, np.ndarray]] = {}
    flat: list[tuple[str, np.ndarray]] = []
    with Path(path).open("rb") as f:
        for seg in layout.tensor_segments():
            tensor, _, key = seg.name.rpartition("/")
            flat.append((seg.name, _read_segment(f, seg)))
            grouped.setdefault(tensor, {})[key] = flat[-1][1]
    _check_digest(path, layout.metadata, sorted(flat, key=lambda t: t[0]))
    return layout.metadata, grouped


def _check_digest(
    path: str | os.PathLike[str], meta: Mapping[str, str], arrays: list[tuple[str, np.ndarray]]
) -> None:
    want = meta.get("digest")
    if want is not None and content_digest(meta, arrays) != want:
        raise IntegrityError(
            f"{path}: patch content does not match its digest (metadata or payload was altered)",
            hint="the patch is corrupt or was edited by hand; get an intact copy",
            path=str(path),
        )


def _read_segment(f: BinaryIO, seg: TensorSegment) -> np.ndarray:
    f.seek(seg.offset)
    data = f.read(seg.length)
    if len(data) != seg.length:
        raise FormatError(f"patch ended inside {seg.name!r}", hint="the patch is truncated")
    return array_from_bytes(data, seg.dtype, seg.shape).copy()


def _contents(meta: Mapping[str, str], grouped: dict[str, dict[str, Any]]) -> PatchContents:
    tensors = _loads(meta, "tensors", dict)
    stray = sorted(set(grouped) - set(tensors))
    if stray:
        raise FormatError(f"patch arrays for unknown tensor {stray[0]!r}", hint=_HINT)
    return PatchContents(
        payloads={n: _payload(n, e, grouped.get(n, {})) for n, e in sorted(tensors.items())},
        base=_loads(meta, "base", dict, str),
        result=_loads(meta, "result", dict, str),
        added=_loads(meta, "added", list, str),
        removed=_loads(meta, "removed", list, str),
        description=_loads(meta, "description", dict),
    )


def read_patch(path: str | os.PathLike[str]) -> PatchContents:
    """Read and check a patch file; a ``FormatError`` says what is wrong."""
    meta, grouped = _read_arrays(path)
    try:
        contents = _contents(meta, grouped)
    except FormatError as e:
        renamed = naming(e, str(path))
        if renamed is e:
            raise
        raise renamed from e
    if meta.get("base_digest") != contents.base_digest:
        raise IntegrityError(
            f"{path}: base_digest does not match the base hashes (the metadata was altered)",
            hint=_HINT,
        )
    _check_codecs(path, contents)
    return contents


def _check_codecs(path: str | os.PathLike[str], contents: PatchContents) -> None:
    for name, p in contents.payloads.items():
        try:
            CODECS.get(p.codec)
        except UserError as e:
            raise FormatError(
                f"{path}: tensor {name!r} uses unknown codec {p.codec!r}",
                hint=f"install the plugin that provides it, or re-create the patch ({e.hint})",
                codec=p.codec,
                tensor=name,
            ) from None

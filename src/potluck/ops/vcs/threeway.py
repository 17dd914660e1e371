"""Three-way merge of manifests at tensor level.

A tensor changed on one side only is taken from that side exactly. A tensor changed on both sides
(differently) is a conflict unless a ``combine`` function is given (the merge-method registry
supplies one); conflicted tensors keep "ours" so the result is always a loadable checkpoint.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from potluck.errors import UserError
from potluck.formats.safetensors import build_header
from potluck.objects.manifest import Entry, Manifest, RawEntry, TensorEntry
from potluck.ops.vcs.materialize import load_tensors
from potluck.ops.vcs.odb import ObjectDB
from potluck.tensors.dtypes import from_numpy

Combine = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
#: Per tensor name, how to combine (base, ours, theirs) when both sides changed it; None = conflict.
Combiner = Callable[[str], Combine | None]


@dataclass
class MergeResult:
    """The merged manifest, and the names of tensors in conflict (kept from ours)."""

    manifest: Manifest
    conflicts: list[str] = field(default_factory=list)
    from_theirs: list[str] = field(default_factory=list)
    combined: list[str] = field(default_factory=list)
    reason: dict[str, str] = field(default_factory=dict)


def _key(e: TensorEntry | None) -> tuple[str, str, tuple[int, ...]] | None:
    return None if e is None else (e.oid, e.dtype, e.shape)


def choose_tensors(
    base: Manifest | None, ours: Manifest, theirs: Manifest
) -> tuple[dict[str, TensorEntry | None], list[str], list[str]]:
    """Per name the entry to take (None = deleted), the conflicts, and names taken from theirs."""
    b = base.tensors() if base else {}
    o, t = ours.tensors(), theirs.tensors()
    chosen: dict[str, TensorEntry | None] = {}
    conflicts: list[str] = []
    from_theirs: list[str] = []
    for name in (
        list(o) + [n for n in t if n not in o] + [n for n in b if n not in o and n not in t]
    ):
        kb, ko, kt = _key(b.get(name)), _key(o.get(name)), _key(t.get(name))
        if ko == kt or kt == kb:
            chosen[name] = o.get(name)
        elif ko == kb:
            chosen[name] = t.get(name)
            from_theirs.append(name)
        else:
            chosen[name] = o.get(name)
            conflicts.append(name)
    return chosen, conflicts, from_theirs


METADATA = "__metadata__"  # safetensors' string metadata, merged like a tensor
STRUCTURE = "(file structure)"  # non-tensor content of zip formats (pickled values, records)


def merge_manifests(
    base: Manifest | None,
    ours: Manifest,
    theirs: Manifest,
    odb: ObjectDB,
    combine: Combiner | None = None,
) -> MergeResult:
    """Merge ``theirs`` into ``ours`` against ``base`` (see the module docstring)."""
    if ours == theirs or theirs == base:
        return MergeResult(ours)
    if ours == base:
        return MergeResult(theirs, from_theirs=sorted(theirs.tensors()))
    chosen, conflicts, from_theirs = choose_tensors(base, ours, theirs)
    result = MergeResult(ours, [], from_theirs)
    if combine is not None and base is not None:
        conflicts = _combine(base, ours, theirs, odb, combine, chosen, conflicts, result)
    if ours.format != "safetensors" or ours.views or theirs.views:
        return _whole_file_fallback(ours, conflicts, result)
    metadata = _merge_metadata(base, ours, theirs)
    if metadata is None:
        conflicts.append(METADATA)
        result.reason[METADATA] = "changed on both sides"
        metadata = ours.metadata
    result.manifest = _safetensors_manifest(ours, chosen, metadata, odb)
    result.conflicts = conflicts
    return result


def _merge_metadata(
    base: Manifest | None, ours: Manifest, theirs: Manifest
) -> dict[str, str] | None:
    """Three-way merge of ``__metadata__``; None when both sides changed it differently."""
    b = base.metadata if base else {}
    if ours.metadata == theirs.metadata or theirs.metadata == b:
        return ours.metadata
    if ours.metadata == b:
        return theirs.metadata
    return None


def _differs(chosen: dict[str, TensorEntry | None], m: Manifest) -> bool:
    t = m.tensors()
    return set(chosen) != set(t) or any(_key(chosen[n]) != _key(t.get(n)) for n in chosen)


def _whole_file_fallback(ours: Manifest, conflicts: list[str], result: MergeResult) -> MergeResult:
    """Zip-based formats carry CRCs of tensor data and pickled values in their records: when
    both sides changed the file, only one whole side can be taken."""
    extra = [n for n in result.from_theirs + result.combined if n not in conflicts]
    for n in extra:
        result.reason[n] = f"{ours.format} files can only take whole sides (CRCs in zip records)"
    result.conflicts = sorted(set(conflicts) | set(extra))
    if not result.conflicts:  # same tensors, different pickled values or records
        result.conflicts = [STRUCTURE]
        result.reason[STRUCTURE] = "non-tensor content changed on both sides"
    result.from_theirs, result.combined = [], []
    result.manifest = ours
    return result


def _combine(
    base: Manifest,
    ours: Manifest,
    theirs: Manifest,
    odb: ObjectDB,
    combine: Combiner,
    chosen: dict[str, TensorEntry | None],
    conflicts: list[str],
    result: MergeResult,
) -> list[str]:
    left: list[str] = []
    b, o, t = base.tensors(), ours.tensors(), theirs.tensors()
    for name in conflicts:
        fn = combine(name)
        if fn is None:
            left.append(name)
            continue
        trio = [m.get(name) for m in (b, o, t)]
        if any(e is None for e in trio) or len({(e.dtype, e.shape) for e in trio if e}) != 1:
            result.reason[name] = "added, removed, reshaped or retyped on a side"
            left.append(name)
            continue
        arrays = [load_tensors(m, odb, [name])[name] for m in (base, ours, theirs)]
        merged = np.ascontiguousarray(fn(*arrays).astype(arrays[1].dtype, copy=False))
        data = merged.tobytes()
        oid = hashlib.sha256(data).hexdigest()
        odb.put(
            oid,
            _constant(data),
            size=len(data),
            itemsize=merged.dtype.itemsize,
            base_oid=o[name].oid,
        )
        chosen[name] = TensorEntry(name, from_numpy(merged.dtype), merged.shape, oid, len(data))
        result.combined.append(name)
    return left


def _safetensors_manifest(
    ours: Manifest,
    chosen: dict[str, TensorEntry | None],
    metadata: dict[str, str],
    odb: ObjectDB,
) -> Manifest:
    """Lay out a safetensors file: ours' header when tensor shapes and metadata allow, else a new
    header (ours' tensor order, then tensors new from theirs)."""
    o = ours.tensors()
    same_layout = (
        metadata == ours.metadata
        and set(chosen) == set(o)
        and all(
            e is not None and (e.dtype, e.shape) == (o[n].dtype, o[n].shape)
            for n, e in chosen.items()
        )
    )
    if same_layout:
        entries: list[Entry] = []
        for e in ours.entries:
            entries.append(chosen[e.name] or e if isinstance(e, TensorEntry) else e)
        return ours.with_entries(tuple(entries))
    tensors = [e for e in chosen.values() if e is not None]
    header = build_header([(e.name, e.dtype, e.shape) for e in tensors], metadata or None)
    raw = odb.put_bytes(header)
    new_entries: list[Entry] = [RawEntry(raw.oid, len(header)), *tensors]
    return Manifest("safetensors", 0, (), (), dict(metadata)).with_entries(tuple(new_entries))


def resolve_manifest(
    base: Manifest | None,
    ours: Manifest,
    theirs: Manifest,
    decided: dict[str, str],
    odb: ObjectDB,
) -> Manifest:
    """The file after taking ``decided[name]`` ("ours"/"theirs") for conflicted tensors and the
    one-sided changes for the rest."""
    chosen, _, from_theirs = choose_tensors(base, ours, theirs)
    t = theirs.tensors()
    for name, side in decided.items():
        if side == "theirs" and name not in (METADATA, STRUCTURE):
            chosen[name] = t.get(name)
        if side == "theirs":
            from_theirs.append(name)
    if not from_theirs:
        return ours
    if ours.format == "safetensors" and not ours.views and not theirs.views:
        metadata = _merge_metadata(base, ours, theirs)
        if metadata is None:
            metadata = theirs.metadata if decided.get(METADATA) == "theirs" else ours.metadata
        return _safetensors_manifest(ours, chosen, metadata, odb)
    if not _differs(chosen, theirs):
        return theirs
    if not _differs(chosen, ours):
        return ours
    raise UserError(
        f"a {ours.format} file cannot mix tensors from both sides (its zip records hold CRCs)",
        hint="take one whole side: `git checkout --ours FILE` or `git checkout --theirs FILE`, "
        "then `git add FILE`",
    )


def _constant(data: bytes) -> Callable[[], list[bytes]]:
    """A chunk source that yields ``data`` once per call."""
    return lambda: [data]

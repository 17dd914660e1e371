"""Lineage edges and the ``lineage.json`` file of an output directory (schema
``potluck_lineage: 1``, documented in docs/lineage.md).

An ``Edge`` says that the model with weights digest ``child`` was made from ``parents`` (each by
commit, when there is one, and by weights digest) with ``relation`` (``finetune``, ``merge``,
``adapter``, ``patch``, ``quantized``, ``compose``), ``method`` and ``params``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

from potluck.errors import FormatError
from potluck.fileio import atomic_writer

__all__ = [
    "LINEAGE_FILE",
    "LINEAGE_VERSION",
    "RELATIONS",
    "Edge",
    "Lineage",
    "Parent",
    "lineage_path",
    "parse_lineage",
    "read_lineage",
    "write_lineage",
]

#: The file an output directory carries; a single-file output gets ``<file>.lineage.json``.
LINEAGE_FILE = "lineage.json"
LINEAGE_VERSION = 1
RELATIONS = ("finetune", "merge", "adapter", "patch", "quantized", "compose")

_HEX64 = re.compile(r"[0-9a-f]{64}")
_HINT = "the lineage file is corrupt or was not written by potluck; delete it or restore it"


class Parent(NamedTuple):
    """One parent: its commit (None when it is not in git) and its weights digest."""

    commit: str | None
    digest: str


@dataclass(frozen=True)
class Edge:
    """The model ``child`` (weights digest) made from ``parents`` (see the module docstring).

    ``commit`` and ``path`` locate the child when known (a git commit and the model's path in
    it, or an output directory); ``refs`` names each parent as the user did (a path, ``file@rev``),
    parallel to ``parents``; ``source`` says where the edge was read (``lineage.json``,
    ``commit``, ``merge-trailer``, ``patch``).
    """

    child: str
    parents: tuple[Parent, ...]
    relation: str
    method: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    commit: str | None = None
    path: str | None = None
    refs: tuple[str, ...] = ()
    source: str = "lineage.json"

    def with_child(self, child: str) -> Edge:
        """A copy naming another child digest."""
        return replace(self, child=child)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of one edge (``lineage.json``'s ``edges`` items)."""
        refs = list(self.refs) + [None] * (len(self.parents) - len(self.refs))
        return {
            "child": self.child,
            "commit": self.commit,
            "method": self.method,
            "params": _jsonable(self.params),
            "parents": [
                {"commit": p.commit, "digest": p.digest, "ref": r}
                for p, r in zip(self.parents, refs, strict=True)
            ],
            "path": self.path,
            "relation": self.relation,
        }

    @classmethod
    def from_dict(cls, d: Any, where: str) -> Edge:
        """Parse one edge object; a malformed one is a ``FormatError`` naming ``where``."""
        if not isinstance(d, dict):
            raise FormatError(f"{where}: an edge is not a JSON object", hint=_HINT)
        parents_raw = d.get("parents")
        if not isinstance(parents_raw, list) or not all(isinstance(p, dict) for p in parents_raw):
            raise FormatError(f"{where}: 'parents' must be a list of objects", hint=_HINT)
        parents = tuple(
            Parent(_opt_str(p.get("commit"), where), _digest(p.get("digest"), where))
            for p in parents_raw
        )
        refs = tuple(str(p.get("ref") or "") for p in parents_raw)
        relation = d.get("relation")
        if relation not in RELATIONS:
            raise FormatError(f"{where}: unknown relation {relation!r}", hint=_HINT)
        params = d.get("params") or {}
        if not isinstance(params, dict):
            raise FormatError(f"{where}: 'params' must be an object", hint=_HINT)
        return cls(
            child=_digest(d.get("child"), where),
            parents=parents,
            relation=relation,
            method=_opt_str(d.get("method"), where),
            params=params,
            commit=_opt_str(d.get("commit"), where),
            path=_opt_str(d.get("path"), where),
            refs=refs if any(refs) else (),
        )


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _opt_str(value: Any, where: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise FormatError(f"{where}: expected a string, got {type(value).__name__}", hint=_HINT)


def _digest(value: Any, where: str) -> str:
    if isinstance(value, str) and _HEX64.fullmatch(value):
        return value
    raise FormatError(f"{where}: {value!r} is not a weights digest (64 hex digits)", hint=_HINT)


@dataclass(frozen=True)
class Lineage:
    """What a ``lineage.json`` holds: the weights digest of the output and its edges, the edge
    that made it first, then the edges of its ancestors copied from their lineage files."""

    weights_digest: str
    edges: tuple[Edge, ...]

    def to_json(self) -> str:
        """The file's text (sorted keys, two-space indent, final newline)."""
        doc = {
            "edges": [e.to_dict() for e in self.edges],
            "potluck_lineage": LINEAGE_VERSION,
            "weights_digest": self.weights_digest,
        }
        return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def lineage_path(out: str | os.PathLike[str]) -> Path:
    """Where the lineage of the output ``out`` lives: ``out/lineage.json`` for a directory,
    ``<out>.lineage.json`` beside a single file."""
    p = Path(out)
    return p / LINEAGE_FILE if p.is_dir() else p.with_name(p.name + "." + LINEAGE_FILE)


def read_lineage(out: str | os.PathLike[str]) -> Lineage | None:
    """The lineage of the output ``out`` (a directory or a file), None when it has none.
    A file that is not a valid ``potluck_lineage: 1`` document is a ``FormatError``."""
    path = lineage_path(out)
    if not path.is_file():
        return None
    try:
        data = path.read_bytes()
    except OSError as e:
        raise FormatError(f"{path}: unreadable ({e.strerror})", hint=_HINT) from None
    return parse_lineage(data, str(path))


def parse_lineage(data: bytes, where: str) -> Lineage:
    """Parse the bytes of a lineage file (``where`` names it in errors)."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise FormatError(f"{where}: not valid JSON ({str(e)[:200]})", hint=_HINT) from None
    if not isinstance(doc, dict) or doc.get("potluck_lineage") != LINEAGE_VERSION:
        raise FormatError(
            f'{where}: not a potluck lineage file (need "potluck_lineage": {LINEAGE_VERSION})',
            hint=_HINT,
        )
    edges = doc.get("edges")
    if not isinstance(edges, list):
        raise FormatError(f"{where}: 'edges' must be a list", hint=_HINT)
    parsed = tuple(Edge.from_dict(e, f"{where}: edge {i}") for i, e in enumerate(edges))
    return Lineage(_digest(doc.get("weights_digest"), where), parsed)


def write_lineage(out: str | os.PathLike[str], lineage: Lineage) -> Path:
    """Write ``lineage`` for the output ``out`` atomically; return the file's path."""
    path = lineage_path(out)
    with atomic_writer(path) as f:
        f.write(lineage.to_json().encode("utf-8"))
    return path

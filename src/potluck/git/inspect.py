"""Read-only use cases over a repository: load, ls, diff, log, du."""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from potluck.errors import UserError
from potluck.formats import scan_stream
from potluck.formats.reader import read_tensors
from potluck.git.maintenance import reachable_manifests
from potluck.git.merge_record import commit_trailers
from potluck.git.repo import Repo, open_worktree_file
from potluck.git.sync import fetch_manifest
from potluck.objects.manifest import MAGIC, Manifest, is_manifest, parse
from potluck.ops.vcs import (
    Reader,
    TensorChange,
    diff_manifests,
    entry_offsets,
    load_tensors,
    missing_objects,
    read_range,
    scan_manifest,
    scan_structure,
    unchanged_count,
)


@dataclass
class Side:
    """One version of a file: its manifest and a reader of its tensors' bytes (streamed)."""

    manifest: Manifest | None
    read: Reader | None


def split_rev(spec: str) -> tuple[str, str | None]:
    """``model.safetensors@v1`` → (path, rev); a path without ``@`` has rev None."""
    if "@" in spec:
        path, rev = spec.rsplit("@", 1)
        if path and rev:
            return path, rev
    return spec, None


def side(repo: Repo, path: str, rev: str | None) -> Side:
    """The file ``path`` at ``rev`` (None = work tree, "" = index)."""
    if rev is not None:
        at = repo.manifest_at(rev, path)
        return Side(None, None) if at is None else _store_side(repo, at)
    full = repo.root / path
    if not full.exists():
        return Side(None, None)
    return file_side(repo, str(full))


def _store_side(repo: Repo, m: Manifest) -> Side:
    tensors = m.tensors()
    return Side(m, lambda n: repo.odb.read_chunks(tensors[n].oid))


def file_side(repo: Repo, file: str) -> Side:
    """A side from any file on disk: a manifest, a checkpoint, or /dev/null (absent)."""
    if file == "/dev/null":
        return Side(None, None)
    with open(file, "rb") as f:
        head = f.read(len(MAGIC))
        if is_manifest(head):
            return _store_side(repo, parse(head + f.read(), file))
        f.seek(0, 2)
        size = f.tell()
        m = scan_manifest(f, size, name=file)
    where = entry_offsets(m)  # the file is scanned once; tensors are read by offset
    return Side(m, lambda n: read_range(file, *where[n]))


def _load_from_file(repo: Repo, path: str, names: list[str] | None) -> dict[str, np.ndarray]:
    with open_worktree_file(repo, path) as (f, size):
        layout = scan_stream(f, size, name=path)
        return read_tensors(f, layout, names)


def load(
    path: str, rev: str | None = None, names: list[str] | None = None
) -> dict[str, np.ndarray]:
    """Tensors of ``path`` (work tree, or ``rev``), decoding only ``names`` when given.

    The repository is the one that contains ``path``.
    """
    full_path = Path(path).absolute()
    repo = Repo(full_path.parent if full_path.parent.exists() else Path.cwd())
    rel = repo.relpath(full_path)
    if rev is None:
        full = repo.root / rel
        with open(full, "rb") as f:
            if not is_manifest(f.read(len(MAGIC))):
                return _load_from_file(repo, rel, names)
        m = parse(full.read_bytes(), f"work-tree file {rel}")
    else:
        found = repo.manifest_at(rev, rel)
        if found is None:
            raise UserError(f"{rel} does not exist at {rev}")
        m = found
    if missing_objects(m, repo.odb):  # partial clone: fetch exactly what is asked for
        fetch_manifest(repo, m, rel, names)
    return load_tensors(m, repo.odb, names)


def ls(repo: Repo, path: str, rev: str | None) -> list[dict[str, Any]]:
    """Rows (name, dtype, shape, bytes) of the tensors of a file."""
    m = _listed(repo, path, rev)
    if m is None:
        raise UserError(f"{path} does not exist" + (f" at {rev}" if rev else ""))
    rows = [
        {"name": e.name, "dtype": e.dtype, "shape": list(e.shape), "bytes": e.size}
        for e in sorted(m.tensors().values(), key=lambda e: e.name)
    ]
    rows += [
        {
            "name": v.name,
            "dtype": v.dtype,
            "shape": list(v.shape),
            "bytes": 0,
            "note": f"view of {v.storage}",
        }
        for v in m.views
    ]
    rows += _opaque_rows(m)
    return rows


def _listed(repo: Repo, path: str, rev: str | None) -> Manifest | None:
    """The manifest to list: a work-tree checkpoint's structure is read without hashing it."""
    if rev is not None:
        return repo.manifest_at(rev, path)
    full = repo.root / repo.relpath(path)
    if not full.exists():
        return None
    with open(full, "rb") as f:
        head = f.read(len(MAGIC))
        if is_manifest(head):
            return parse(head + f.read())
        return scan_structure(f, f.seek(0, 2), name=str(full))


def _opaque_rows(m: Manifest) -> list[dict[str, Any]]:
    """Arrays a format keeps as opaque bytes (compressed or non-C-order npz members)."""
    rows: list[dict[str, Any]] = []
    for key, value in sorted(m.metadata.items()):
        kind, _, name = key.partition(":")
        if kind == "deflated":
            info = json.loads(value)
            rows.append(
                {
                    "name": name,
                    "dtype": info["dtype"],
                    "shape": info["shape"],
                    "bytes": 0,
                    "note": "compressed member, stored whole",
                }
            )
        elif kind == "untracked":
            rows.append(
                {
                    "name": name,
                    "dtype": "?",
                    "shape": [],
                    "bytes": 0,
                    "note": f"stored whole: {value}",
                }
            )
    return rows


@dataclass
class FileDiff:
    """Changes of one file between two versions."""

    path: str
    changes: list[TensorChange]
    unchanged: int

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON output."""
        return {
            "path": self.path,
            "unchanged": self.unchanged,
            "changes": [c.to_dict() for c in self.changes],
        }


def diff_sides(path: str, a: Side, b: Side, stats: bool = True) -> FileDiff:
    """Tensor-level diff between two versions of one file."""
    changes = diff_manifests(
        a.manifest, b.manifest, a.read if stats else None, b.read if stats else None
    )
    return FileDiff(path, changes, unchanged_count(a.manifest, b.manifest))


def tracked_paths(repo: Repo, rev: str | None, paths: list[str]) -> list[str]:
    """Files under potluck's filter at ``rev`` (or in the index), limited to ``paths``."""
    files = (
        repo.git.ls_files(*paths)
        if rev is None
        else [p for p, _ in repo.git.list_blobs(rev, paths or None)]
    )
    if not files:
        return []
    return [p for p in files if repo.git.check_attr("filter", p) == "potluck"]


def diff(
    repo: Repo, rev_a: str | None, rev_b: str | None, paths: list[str], stats: bool = True
) -> list[FileDiff]:
    """``potluck diff``: no revs = index vs work tree; one = rev vs work tree; two = a vs b."""
    a_rev = "" if rev_a is None else rev_a
    names = sorted(set(tracked_paths(repo, rev_a, paths)) | set(tracked_paths(repo, rev_b, paths)))
    out = []
    for p in names:
        d = diff_sides(p, side(repo, p, a_rev), side(repo, p, rev_b), stats)
        if d.changes:
            out.append(d)
    return out


def log(repo: Repo, path: str, max_count: int | None = None) -> list[dict[str, Any]]:
    """One summary per commit that changed ``path``: tensors added/removed/changed, bytes; for
    merge commits ``merge`` lists the ``Potluck-Merge`` trailer values about ``path`` (else
    None), changes counted against the first parent."""
    rel = repo.relpath(path)
    rows = []
    with repo.git.batch() as batch:
        for commit, subject, blob in repo.git.log_path(rel, max_count):
            data = batch.get(blob) if blob else None
            cur = parse(data, f"{commit}:{rel}") if data is not None and is_manifest(data) else None
            prev_data = batch.get(f"{commit}^:{rel}")
            prev = (
                parse(prev_data, f"{commit}^:{rel}")
                if prev_data is not None and is_manifest(prev_data)
                else None
            )
            rows.append(_log_row(commit, subject, prev, cur))
    merges = commit_trailers(repo.git, [r["commit"] for r in rows], rel)
    for r in rows:  # merge commits: how potluck merged the file (its Potluck-Merge trailer)
        r["merge"] = merges.get(r["commit"])
    return rows


def _log_row(
    commit: str, subject: str, prev: Manifest | None, cur: Manifest | None
) -> dict[str, Any]:
    changes = diff_manifests(prev, cur)
    counts = {
        k: sum(1 for c in changes if c.status == k)
        for k in ("added", "removed", "changed", "reshaped", "retyped")
    }
    touched = {c.name for c in changes}
    tensors = cur.tensors() if cur else {}
    changed_bytes = sum(e.size for n, e in tensors.items() if n in touched)
    return {
        "commit": commit,
        "subject": subject,
        "deleted": cur is None,
        "counts": counts,
        "changed_bytes": changed_bytes,
        "size": cur.size if cur else 0,
    }


def du(repo: Repo) -> dict[str, Any]:
    """Logical bytes (a full copy per version) vs stored bytes, per path and in total."""
    per_path: dict[str, dict[str, Any]] = {}
    all_oids: set[str] = set()
    for _blob, (path, m) in reachable_manifests(repo).items():
        row = per_path.setdefault(path, {"versions": 0, "logical": 0, "oids": set()})
        row["versions"] += 1
        row["logical"] += m.size
        row["oids"].update(m.oids())
        all_oids.update(m.oids())
    sizes = {o: repo.store.stored_size(o) for o in all_oids if repo.store.has(o)}
    files = []
    for path, row in sorted(per_path.items()):
        stored = sum(sizes.get(o, 0) for o in row["oids"])
        files.append(
            {"path": path, "versions": row["versions"], "logical": row["logical"], "stored": stored}
        )
    return {
        "files": files,
        "logical": sum(f["logical"] for f in files),
        "stored": sum(sizes.values()),
        "objects": len(sizes),
        "missing": len(all_oids) - len(sizes),
    }


def matches(name: str, patterns: list[str]) -> bool:
    """True when ``name`` matches any glob in ``patterns`` (or there are none)."""
    return not patterns or any(fnmatch.fnmatchcase(name, p) for p in patterns)


__all__ = [
    "FileDiff",
    "Side",
    "diff",
    "du",
    "load",
    "log",
    "ls",
    "missing_objects",
    "side",
    "split_rev",
]

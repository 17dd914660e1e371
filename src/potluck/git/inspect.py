"""Read-only use cases over a repository: load, ls, diff, log, du."""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from potluck.errors import CorruptObjectError, FormatError, GitError, UserError
from potluck.formats import scan_stream
from potluck.formats.base import naming
from potluck.formats.reader import read_tensors
from potluck.git.maintenance import reachable_manifests
from potluck.git.merge_record import commit_trailers
from potluck.git.repo import Repo, open_worktree_file
from potluck.git.sync import fetch_manifest
from potluck.objects.encoding import describe
from potluck.objects.manifest import MAGIC, Manifest, is_manifest, parse
from potluck.ops.models.sources import checkpoint_files
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


def file_side(repo: Repo | None, file: str) -> Side:
    """A side from any file on disk: a manifest, a checkpoint, or /dev/null (absent).

    Without a repository a manifest (a placeholder) cannot be read: a ``UserError``.
    """
    if file == "/dev/null":
        return Side(None, None)
    with open(file, "rb") as f:
        head = f.read(len(MAGIC))
        if is_manifest(head):
            if repo is None:
                raise UserError(
                    f"{file} is a potluck placeholder (its tensors are in a repository's store)",
                    hint="compare it inside its repository, or check it out first",
                )
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
    try:
        return load_tensors(m, repo.odb, names)
    except FormatError as e:  # e.g. a view that would copy out far more than its storage
        raise naming(e, rel if rev is None else f"{rev}:{rel}") from None


def ls(repo: Repo, path: str, rev: str | None, stored: bool = False) -> list[dict[str, Any]]:
    """Rows (name, dtype, shape, bytes) of the tensors of a file; with ``stored`` (a committed
    version: ``rev``) also how each tensor's object is stored (``encoding``: standalone, delta,
    delta+lowrank8, ...) and its bytes in the store (``stored``)."""
    m = _listed(repo, path, rev)
    if m is None:
        raise UserError(f"{path} does not exist" + (f" at {rev}" if rev else ""))
    rows = _rows(m)
    if stored:
        tensors = m.tensors()
        for row in rows:
            entry = tensors.get(row["name"])
            if entry is not None and "note" not in row:
                row.update(_stored_as(repo, entry.oid))
    return rows


def _stored_as(repo: Repo, oid: str) -> dict[str, Any]:
    """How one object is stored: its encoding and size (``missing`` when not here)."""
    if not oid or not repo.store.has(oid):
        return {"encoding": "missing", "stored": 0}
    return {"encoding": _encoding_of(repo, oid), "stored": repo.store.stored_size(oid)}


def _encoding_of(repo: Repo, oid: str) -> str:
    """``encoding.describe`` of a present object ("damaged" when its header is unreadable)."""
    try:
        with repo.store.open(oid) as f:
            return describe(f)
    except CorruptObjectError:
        return "damaged"


def ls_path(path: str) -> list[dict[str, Any]]:
    """``ls`` of a file or Hugging Face directory on disk, in a repository or not: the same rows
    as ``ls``; a directory lists every shard's tensors (shard order)."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{path} does not exist")
    files = checkpoint_files(p) if p.is_dir() else [p]
    return [row for f in files for row in _rows(_file_structure(f))]


def _rows(m: Manifest) -> list[dict[str, Any]]:
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
    return _file_structure(full)


def _file_structure(full: Path) -> Manifest:
    """A checkpoint file's structure (read without hashing), or the manifest a placeholder is."""
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


def check_path(repo: Repo, path: str) -> None:
    """A ``UserError`` unless ``path`` (relative to the top) is in the work tree, the index or
    a commit of any branch: a typo'd revision or path must not diff as "no changes"."""
    if (repo.root / path).exists() or repo.git.ls_files(path):
        return
    if repo.git.run("log", "--all", "-1", "--format=%H", "--", f":(top){path}").strip():
        return
    raise UserError(
        f"{path}: unknown revision or path not in the work tree nor in the history",
        hint="a revision must name a commit (`git log`, `git branch`); use `--` before paths",
    )


def diff_paths(a: str, b: str, stats: bool = True, repo: Repo | None = None) -> list[FileDiff]:
    """Diff two checkpoint files, or two Hugging Face directories (all shards), anywhere: no
    repository needed (with one, placeholders are read from its store). Empty when they hold
    the same tensors."""
    pa, pb = Path(a), Path(b)
    for p in (pa, pb):
        if not p.exists():
            raise UserError(f"{p}: no such file or directory", hint="check the path")
    if pa.is_dir() != pb.is_dir():
        raise UserError(
            f"cannot compare {a} with {b}: one is a directory, the other a file",
            hint="compare two files or two model directories",
        )
    label = a if a == b else f"{a} -> {b}"
    d = diff_sides(label, _disk_side(repo, pa), _disk_side(repo, pb), stats)
    return [d] if d.changes else []


def repo_here() -> Repo | None:
    """The repository around the current directory, or None outside one."""
    try:
        return Repo(".")
    except GitError:
        return None


def compares_paths(repo: Repo | None, args: list[str]) -> bool:
    """The rule of ``potluck diff A B`` (as ``git diff --no-index``'s): two paths that exist on
    disk are compared directly when there is no repository here or one of them lies outside it."""
    if len(args) != 2:
        return False
    if repo is None:  # a missing one is then named by ``diff_paths``
        return True
    return all(Path(a).exists() for a in args) and any(not _inside(repo, a) for a in args)


def _inside(repo: Repo, path: str) -> bool:
    try:
        repo.relpath(path)
    except UserError:
        return False
    return True


def _disk_side(repo: Repo | None, p: Path) -> Side:
    """A file's side, or a directory's shards joined into one side (tensors by name)."""
    if not p.is_dir():
        return file_side(repo, str(p))
    sides = [file_side(repo, str(f)) for f in checkpoint_files(p)]
    entries: list[Any] = []
    owner: dict[str, Reader] = {}
    for s in sides:
        assert s.manifest is not None and s.read is not None
        entries += s.manifest.entries
        owner.update(dict.fromkeys(s.manifest.tensors(), s.read))
    m = Manifest("directory", sum(e.size for e in entries), tuple(entries))
    return Side(m, lambda n: owner[n](n))


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
    for p in paths:
        check_path(repo, p)
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
    found = repo.git.log_path(rel, max_count)
    if not found and not (repo.root / rel).exists():
        raise UserError(
            f"{path}: not in the work tree nor in the history of HEAD",
            hint="check the path (`git log --all -- PATH` lists commits on other branches)",
        )
    with repo.git.batch() as batch:
        for commit, subject, blob in found:
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
    encodings: dict[str, dict[str, int]] = {}
    for o, n in sizes.items():
        row = encodings.setdefault(_encoding_of(repo, o), {"objects": 0, "stored": 0})
        row["objects"] += 1
        row["stored"] += n
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
        "encodings": dict(sorted(encodings.items())),
    }


def matches(name: str, patterns: list[str]) -> bool:
    """True when ``name`` matches any glob in ``patterns`` (or there are none)."""
    return not patterns or any(fnmatch.fnmatchcase(name, p) for p in patterns)


__all__ = [
    "FileDiff",
    "Side",
    "check_path",
    "compares_paths",
    "diff",
    "diff_paths",
    "du",
    "load",
    "log",
    "ls",
    "ls_path",
    "missing_objects",
    "repo_here",
    "side",
    "split_rev",
]

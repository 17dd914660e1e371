"""Repository maintenance: reachability, ``gc``, ``fsck`` and ``status``."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from potluck.errors import CorruptObjectError, IntegrityError, MissingObjectError
from potluck.git.merge_driver import load_records
from potluck.git.repo import Repo
from potluck.git.sync import placeholders
from potluck.objects.manifest import Manifest, TensorEntry, is_manifest, parse

MAX_MANIFEST_BYTES = 64 << 20
NOT_FETCHED = "not-fetched"  # far above the manifest of a 100k-tensor checkpoint


def reachable_manifests(repo: Repo) -> dict[str, tuple[str, Manifest]]:
    """blob id → (path, manifest) for every manifest reachable from refs, reflogs, stash and
    the index, plus the sides of unresolved merge conflicts (keyed ``merge:<path>:<side>``)."""
    out: dict[str, tuple[str, Manifest]] = {}
    blobs = dict(repo.git.reachable_blobs(None))
    sizes = repo.git.object_sizes(list(blobs))
    with repo.git.batch() as batch:
        for blob, path in blobs.items():
            if sizes.get(blob, 0) > MAX_MANIFEST_BYTES:  # not a manifest: don't read it
                continue
            data = batch.get(blob)
            if data is not None and is_manifest(data):
                out[blob] = (path, parse(data))
    for rec in load_records(repo):
        for name, m in (("base", rec.base), ("ours", rec.ours), ("theirs", rec.theirs)):
            if m is not None:
                out[f"merge:{rec.path}:{name}"] = (rec.path, m)
    return out


def live_objects(repo: Repo, manifests: dict[str, tuple[str, Manifest]]) -> set[str]:
    """Objects the manifests need, closed over delta bases."""
    live: set[str] = set()
    todo = [o for _, m in manifests.values() for o in m.oids()]
    while todo:
        oid = todo.pop()
        if oid in live:
            continue
        live.add(oid)
        if repo.store.has(oid):
            try:
                base = repo.odb.header(oid).base_oid
            except CorruptObjectError:
                continue
            if base:
                todo.append(base)
    return live


@dataclass
class GcReport:
    """What gc removed (or would remove with ``dry_run``)."""

    removed: int = 0
    freed: int = 0
    kept: int = 0
    dry_run: bool = False


def gc(repo: Repo, dry_run: bool = False, tmp_age_s: float = 3600.0) -> GcReport:
    """Delete objects that nothing reachable (refs, reflogs, stash, index, conflicts) needs."""
    live = live_objects(repo, reachable_manifests(repo))
    rep = GcReport(dry_run=dry_run)
    for oid in list(repo.store.iter_oids()):
        if oid in live:
            rep.kept += 1
            continue
        rep.removed += 1
        rep.freed += repo.store.stored_size(oid)
        if not dry_run:
            repo.store.delete(oid)
    if not dry_run:
        repo.store.clean_tmp(tmp_age_s)
        _clean_spills(repo, tmp_age_s)
    return rep


def _clean_spills(repo: Repo, age: float) -> None:
    d = repo.potluck_dir / "tmp"
    if d.exists():
        for p in d.iterdir():
            if p.is_file() and time.time() - p.stat().st_mtime > age:
                p.unlink(missing_ok=True)


@dataclass
class Problem:
    """A corrupt or missing object and everything that uses it."""

    oid: str
    kind: str  # "corrupt" | "missing" | "not-fetched" (needed only by other revisions)
    detail: str
    uses: list[dict[str, str]] = field(default_factory=list)  # path, tensor, revisions

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON output."""
        return {"oid": self.oid, "kind": self.kind, "detail": self.detail, "uses": self.uses}


def fsck(repo: Repo) -> list[Problem]:
    """Re-hash every stored object; check that every reachable manifest's objects exist."""
    problems: dict[str, Problem] = {}
    for oid in sorted(repo.store.iter_oids()):
        try:
            repo.odb.verify(oid)
        except IntegrityError as e:
            kind = "missing" if isinstance(e, MissingObjectError) else "corrupt"
            problems[oid] = Problem(oid, kind, e.message)
    manifests = reachable_manifests(repo)
    for oid in live_objects(repo, manifests):
        if oid not in problems and not repo.store.has(oid):
            problems[oid] = Problem(oid, "missing", "object is not in the store")
    needed_now: set[str] = set()
    current = _current_blobs(repo)
    left = {row["path"] for row in _placeholders(repo)}
    for blob, (path, m) in manifests.items():
        for entry in m.entries:
            if entry.oid in problems:
                tensor = entry.name if isinstance(entry, TensorEntry) else "(file structure)"
                problems[entry.oid].uses.append(
                    {"path": path, "tensor": tensor, "revisions": _revisions(repo, blob, path)}
                )
                if (blob in current and path not in left) or blob.startswith("merge:"):
                    needed_now.add(entry.oid)
    if repo.git.run("remote").strip():  # a clone fetches other revisions' objects on demand
        for oid, p in problems.items():
            if p.kind == "missing" and oid not in needed_now:
                p.kind = NOT_FETCHED
                p.detail = "not fetched (only other revisions use it; `potluck fetch --rev`)"
    return list(problems.values())


def _current_blobs(repo: Repo) -> set[str]:
    """Blob ids of HEAD's tree and of the index."""
    blobs = {oid for _, oid in repo.git.list_blobs("HEAD")} if repo.git.rev_parse("HEAD") else set()
    return blobs | {blob for _, blob, _ in repo.git.index_entries()}


def _revisions(repo: Repo, blob: str, path: str) -> str:
    if blob.startswith("merge:"):
        return "unresolved merge"
    commits = repo.git.commits_with_blob(blob, path)
    return ", ".join(c[:10] for c in commits[:5]) + (" …" if len(commits) > 5 else "") or "index"


def status(repo: Repo) -> dict[str, Any]:
    """Unresolved tensor conflicts and tracked files left as manifests (data not present)."""
    conflicts = [
        {"path": r.path, "tensors": r.conflicts, "reasons": r.reasons} for r in load_records(repo)
    ]
    return {"conflicts": conflicts, "not_materialized": _placeholders(repo)}


def _placeholders(repo: Repo) -> list[dict[str, Any]]:
    """Tracked files left as manifests, with how much of their data is here."""
    rows = []
    for path, m in placeholders(repo):
        missing = {o for o in m.oids() if not repo.store.has(o)}
        tensors = m.tensors()
        rows.append(
            {
                "path": path,
                "missing_objects": len(missing),
                "tensors": len(tensors),
                "tensors_missing": sum(1 for t in tensors.values() if t.oid in missing),
            }
        )
    return rows

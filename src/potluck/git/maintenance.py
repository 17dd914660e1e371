"""Repository maintenance: reachability, ``gc``, ``fsck`` and ``status``.

What gc keeps (``gc``): every object a reachable manifest needs (refs, reflogs, stash, the
index, unresolved merge conflicts), every object younger than the grace period (written or
re-used after ``potluck.pruneExpire``, default two weeks as git's ``gc.pruneExpire``: a running
``git add`` stores its objects before git writes the blob and the index), and the delta bases of
all of these. A damaged manifest keeps every object id its text names. Temp files of writes and
downloads are removed after an hour without a change.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from potluck.errors import FormatError, IntegrityError, MissingObjectError, UserError
from potluck.git.merge_driver import load_records
from potluck.git.repo import MAX_MANIFEST_BYTES, Repo, worktree_manifests
from potluck.objects.manifest import (
    Manifest,
    TensorEntry,
    is_manifest,
    parse,
    parse_lenient,
    salvage_oids,
)

NOT_FETCHED = "not-fetched"
BAD_MANIFEST = "bad-manifest"  # in HEAD, the index or the work tree: checkout of it fails
OLD_MANIFEST = "manifest-in-history"  # only in older commits: reported, cannot be rewritten
INFORMATIONAL = (NOT_FETCHED, OLD_MANIFEST)
PRUNE_EXPIRE_KEY = "potluck.pruneExpire"
DEFAULT_PRUNE_EXPIRE = "2.weeks.ago"
TMP_AGE_S = 3600.0
_UNITS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400, "week": 604800}
_UNITS |= {"month": 30 * 86400, "year": 365 * 86400}
_AGO = re.compile(r"(\d+)[. ](second|minute|hour|day|week|month|year)s?[. ]ago")


@dataclass(frozen=True)
class DamagedManifest:
    """A reachable manifest blob that ``parse`` refuses: where it is, what is wrong, and what it
    names (its leniently parsed manifest, else every object id in its text)."""

    blob: str
    path: str
    problem: str
    manifest: Manifest | None
    oids: frozenset[str]

    @property
    def source(self) -> str:
        """``path (blob 1a2b3c4d5e6f)``."""
        return f"{self.path} (blob {self.blob[:12]})"


@dataclass
class ManifestScan:
    """Every reachable manifest: those that parse, by blob id (``merge:<path>:<side>`` for the
    sides of a conflict), and the damaged ones."""

    manifests: dict[str, tuple[str, Manifest]] = field(default_factory=dict)
    damaged: list[DamagedManifest] = field(default_factory=list)

    def needed(self) -> set[str]:
        """Object ids the manifests name (damaged ones included)."""
        out = {o for _, m in self.manifests.values() for o in m.oids()}
        return out.union(*(d.oids for d in self.damaged))


def read_damaged(blob: str, path: str, data: bytes) -> DamagedManifest | None:
    """None when ``data`` is a canonical manifest, else what is wrong with it."""
    try:
        parse(data)
        return None
    except FormatError as e:
        problem = str(e.data.get("problem") or e.message)
    try:
        m: Manifest | None = parse_lenient(data)
        oids = frozenset(m.oids()) if m else frozenset()
    except FormatError:
        m, oids = None, frozenset(salvage_oids(data))
    return DamagedManifest(blob, path, problem, m, oids)


def scan_manifests(repo: Repo) -> ManifestScan:
    """Every manifest reachable from refs, reflogs, stash and the index, plus the sides of
    unresolved merge conflicts; damaged ones are collected, never raised."""
    scan = ManifestScan()
    blobs = dict(repo.git.reachable_blobs(None))
    sizes = repo.git.object_sizes(list(blobs))
    with repo.git.batch() as batch:
        for blob, path in blobs.items():
            if sizes.get(blob, 0) > MAX_MANIFEST_BYTES:  # not a manifest: don't read it
                continue
            data = batch.get(blob)
            if data is None or not is_manifest(data):
                continue
            damaged = read_damaged(blob, path, data)
            if damaged is None:
                scan.manifests[blob] = (path, parse(data))
            else:
                scan.damaged.append(damaged)
                if damaged.manifest is not None:
                    scan.manifests[blob] = (path, damaged.manifest)
    for rec in load_records(repo):
        for name, m in (("base", rec.base), ("ours", rec.ours), ("theirs", rec.theirs)):
            if m is not None:
                scan.manifests[f"merge:{rec.path}:{name}"] = (rec.path, m)
    return scan


def reachable_manifests(repo: Repo) -> dict[str, tuple[str, Manifest]]:
    """blob id → (path, manifest) for every reachable manifest (see ``scan_manifests``).

    A damaged one raises ``FormatError`` naming its path, blob and commits."""
    scan = scan_manifests(repo)
    if scan.damaged:
        d = scan.damaged[0]
        raise FormatError(
            f"{d.source}, {_revisions(repo, d.blob, d.path)}: {d.problem}"
            + (
                f" (and {len(scan.damaged) - 1} more damaged manifests)" if scan.damaged[1:] else ""
            ),
            hint="`potluck fsck` lists them; `potluck fsck --repair` rewrites a damaged manifest "
            "of the checked-out commit in canonical form",
            path=d.path,
            blob=d.blob,
        )
    return scan.manifests


def live_objects(repo: Repo, roots: set[str]) -> set[str]:
    """``roots`` closed over delta bases (of the objects that are here)."""
    live: set[str] = set()
    todo = list(roots)
    while todo:
        oid = todo.pop()
        if oid in live:
            continue
        live.add(oid)
        if repo.store.has(oid):
            try:
                base = repo.odb.header(oid).base_oid
            except IntegrityError:
                continue
            if base:
                todo.append(base)
    return live


# -- gc ---------------------------------------------------------------------------------------


def prune_cutoff(value: str, now: float) -> float | None:
    """The time before which unreferenced objects may go: ``now``, ``never`` (None),
    ``N.unit.ago`` (``2.weeks.ago``, ``1.hour.ago``; units second … year) or an ISO date."""
    text = value.strip().lower()
    if text == "now":
        return now
    if text == "never":
        return None
    m = _AGO.fullmatch(text)
    if m:
        return now - int(m.group(1)) * _UNITS[m.group(2)]
    try:
        return datetime.fromisoformat(value.strip()).timestamp()
    except ValueError:
        raise UserError(
            f"invalid prune expiry {value!r}",
            hint="use now, never, N.unit.ago (2.weeks.ago, 1.hour.ago) or an ISO date "
            "(2024-05-01T12:00)",
            value=value,
        ) from None


@dataclass
class GcReport:
    """What gc removed (or would remove with ``dry_run``) and what it kept and why: ``kept``
    counts every object left, ``recent`` those kept only because they are younger than the
    grace period (``expire``: ``prune`` value and cutoff), ``damaged`` the damaged manifests
    whose named objects were all kept."""

    removed: int = 0
    freed: int = 0
    kept: int = 0
    dry_run: bool = False
    recent: int = 0
    recent_bytes: int = 0
    expire: dict[str, str | None] = field(default_factory=dict)
    damaged: list[str] = field(default_factory=list)
    temp_removed: int = 0


def gc(
    repo: Repo, dry_run: bool = False, prune: str | None = None, tmp_age_s: float = TMP_AGE_S
) -> GcReport:
    """Delete the objects nothing reachable needs that are older than the grace period.

    ``prune`` overrides ``potluck.pruneExpire`` (see ``prune_cutoff``). An object written or
    re-used (``ObjectDB.put`` freshens it) after the cutoff stays, with its delta bases: the
    objects of an add still running are not referenced yet."""
    started = time.time()
    expire = prune or repo.git.config_get(PRUNE_EXPIRE_KEY) or DEFAULT_PRUNE_EXPIRE
    cutoff = prune_cutoff(expire, started)
    scan = scan_manifests(repo)
    needed = live_objects(repo, scan.needed())
    recent = {o for o in repo.store.iter_oids() if o not in needed and _newer(repo, o, cutoff)}
    keep = needed | live_objects(repo, recent)
    rep = GcReport(dry_run=dry_run, damaged=[d.source for d in scan.damaged])
    rep.expire = {"prune": expire, "cutoff": _iso(cutoff)}
    sizes = {oid: _size(repo, oid) for oid in repo.store.iter_oids()}
    dead = [oid for oid in sizes if oid not in keep]
    # one call: each pack is rewritten once; objects re-used since gc started stay
    gone = set(dead if dry_run else repo.store.delete_many(dead, keep_newer_than=started))
    for oid, size in sizes.items():
        if oid in gone:
            rep.removed += 1
            rep.freed += size
        elif oid in keep or (oid in dead and _newer(repo, oid, started)):
            rep.kept += 1
            if oid not in needed:
                rep.recent += 1
                rep.recent_bytes += size
    if not dry_run:
        repo.store.merge_packs()
        rep.temp_removed = clean_temp(repo, tmp_age_s)
    return rep


def _newer(repo: Repo, oid: str, cutoff: float | None) -> bool:
    """Whether ``oid`` was written or re-used after ``cutoff`` (None: never expires)."""
    if cutoff is None:
        return True
    try:
        return repo.store.mtime(oid) > cutoff
    except MissingObjectError:
        return False


def _size(repo: Repo, oid: str) -> int:
    try:
        return repo.store.stored_size(oid)
    except MissingObjectError:
        return 0


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t).isoformat(timespec="seconds")


def clean_temp(repo: Repo, age: float = TMP_AGE_S) -> int:
    """Remove temp files untouched for ``age`` seconds: interrupted object writes, spills and
    downloads (``.git/potluck/tmp``, also under ``incoming/``); return how many."""
    removed = repo.store.clean_tmp(age)
    d = repo.potluck_dir / "tmp"
    if d.exists():
        for p in d.rglob("*"):
            try:
                if p.is_file() and time.time() - p.stat().st_mtime > age:
                    p.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
    return removed


# -- fsck -------------------------------------------------------------------------------------


@dataclass
class Problem:
    """A corrupt or missing object, or a damaged manifest, and everything that uses it."""

    oid: str  # the object, or the git blob of a damaged manifest
    kind: str  # "corrupt" | "missing" | NOT_FETCHED | BAD_MANIFEST | OLD_MANIFEST
    detail: str
    uses: list[dict[str, str]] = field(default_factory=list)  # path, tensor, revisions
    repair: str = ""  # what `fsck --repair` does or what to run

    @property
    def bad(self) -> bool:
        """Whether it makes the repository unhealthy (the other kinds are informational)."""
        return self.kind not in INFORMATIONAL

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON output."""
        return {
            "oid": self.oid,
            "kind": self.kind,
            "detail": self.detail,
            "uses": self.uses,
            "repair": self.repair,
        }


def fsck(repo: Repo, rehash: bool = True) -> list[Problem]:
    """Re-hash every stored object (unless ``rehash`` is False); check that every reachable
    manifest parses and that its objects exist. Never raises for damaged data: reports it."""
    problems = _object_problems(repo) if rehash else {}
    scan = scan_manifests(repo)
    for oid in live_objects(repo, scan.needed()):
        if oid not in problems and not repo.store.has(oid):
            problems[oid] = Problem(oid, "missing", "object is not in the store")
    current = _current_blobs(repo)
    left = {path for path, _ in worktree_manifests(repo)}
    needed_now: set[str] = set()
    for blob, (path, m) in scan.manifests.items():
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
    return list(problems.values()) + manifest_problems(repo, scan, current)


def _object_problems(repo: Repo) -> dict[str, Problem]:
    problems: dict[str, Problem] = {}
    for oid in sorted(repo.store.iter_oids()):
        try:
            repo.odb.verify(oid)
        except IntegrityError as e:
            kind = "missing" if isinstance(e, MissingObjectError) else "corrupt"
            problems[oid] = Problem(oid, kind, e.message)
    return problems


def manifest_problems(repo: Repo, scan: ManifestScan, current: set[str]) -> list[Problem]:
    """One problem per damaged manifest (committed, staged or in the work tree)."""
    out: dict[str, Problem] = {}
    for d in scan.damaged:
        now = d.blob in current
        p = Problem(d.blob, BAD_MANIFEST if now else OLD_MANIFEST, f"{d.source}: {d.problem}")
        p.uses.append({"path": d.path, "revisions": _revisions(repo, d.blob, d.path)})
        good = _last_good(repo, scan, d.path) if now and d.manifest is None else None
        p.repair = _manifest_advice(d, now, good)
        out[d.blob] = p
    for path, data in worktree_manifests(repo):
        blob = git_blob_id(data)
        damaged = read_damaged(blob, path, data)
        if damaged is None or blob in out:
            continue
        p = Problem(blob, BAD_MANIFEST, f"work-tree file {path}: {damaged.problem}")
        p.uses.append({"path": path, "revisions": "work tree"})
        p.repair = _manifest_advice(damaged, True)
        out[blob] = p
    return list(out.values())


def _last_good(repo: Repo, scan: ManifestScan, path: str) -> str | None:
    """The newest commit of HEAD whose manifest of ``path`` parses, if any."""
    bad = {d.blob for d in scan.damaged}
    for commit, _, blob in repo.git.log_path(path):
        if blob is not None and blob in scan.manifests and blob not in bad:
            return commit
    return None


def _manifest_advice(d: DamagedManifest, current: bool, good: str | None = None) -> str:
    if not current:
        return (
            "older commits keep this text (history is never rewritten); checking them out "
            f"fails for {d.path}: take the file from a later commit"
        )
    if d.manifest is None:
        take = (
            f"restore the last readable version with `git checkout {good[:10]} -- {d.path}` "
            f"(or put the checkpoint at {d.path})"
            if good
            else f"put the checkpoint at {d.path}"
        )
        return f"cannot be read: {take}, then `git add -- {d.path} && git commit`"
    return (
        f"`potluck fsck --repair` writes it in canonical form to the work tree; then "
        f"`git add --renormalize -- {d.path} && git commit`"
    )


def git_blob_id(data: bytes) -> str:
    """The id git gives ``data`` as a blob (sha1 repositories)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


def _current_blobs(repo: Repo) -> set[str]:
    """Blob ids of HEAD's tree and of the index."""
    blobs = {oid for _, oid in repo.git.list_blobs("HEAD")} if repo.git.rev_parse("HEAD") else set()
    return blobs | {blob for _, blob, _ in repo.git.index_entries()}


def _revisions(repo: Repo, blob: str, path: str) -> str:
    if blob.startswith("merge:"):
        return "unresolved merge"
    commits = repo.git.commits_with_blob(blob, path)
    return ", ".join(c[:10] for c in commits[:5]) + (" …" if len(commits) > 5 else "") or "index"


# -- status -----------------------------------------------------------------------------------


def status(repo: Repo) -> dict[str, Any]:
    """Unresolved tensor conflicts and tracked files left as manifests (data not present)."""
    conflicts = [
        {"path": r.path, "tensors": r.conflicts, "reasons": r.reasons} for r in load_records(repo)
    ]
    return {"conflicts": conflicts, "not_materialized": _placeholders(repo)}


def _placeholders(repo: Repo) -> list[dict[str, Any]]:
    """Tracked files left as manifests, with how much of their data is here (a damaged one
    is read leniently and flagged)."""
    rows = []
    for path, data in worktree_manifests(repo):
        damaged = read_damaged(git_blob_id(data), path, data)
        m = parse(data) if damaged is None else damaged.manifest
        missing = {o for o in m.oids() if not repo.store.has(o)} if m else set()
        tensors = m.tensors() if m else {}
        row: dict[str, Any] = {
            "path": path,
            "missing_objects": len(missing),
            "tensors": len(tensors),
            "tensors_missing": sum(1 for t in tensors.values() if t.oid in missing),
        }
        if damaged is not None:
            row["damaged"] = damaged.problem
        rows.append(row)
    return rows

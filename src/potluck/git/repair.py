"""``potluck fsck --repair``: fix what can be fixed locally, say exactly what to run for the rest.

In order: temp files untouched for an hour are removed; a pack whose index is damaged is
rewritten from its whole records (the damaged file quarantined); a missing object with a
quarantined copy that verifies is put back; every stored object is re-hashed and a corrupt or
torn one is quarantined (moved to ``.git/potluck/objects/quarantine``, never deleted); the
objects the checked-out files need that are missing (quarantined ones included) are fetched from
the remote and verified; a damaged manifest of the checked-out commit or of the index is written
to the work tree in canonical form when it can be read leniently. History is never rewritten and
the index is not touched. Then the repository is checked again (without re-hashing the objects
already verified): it is healthy when no problem is left.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from potluck.errors import IntegrityError, PotluckError
from potluck.fileio import atomic_writer
from potluck.git import maintenance as maint
from potluck.git import wireindex
from potluck.git.remotes import open_object_remote
from potluck.git.repo import Repo
from potluck.objects.manifest import MAGIC, dumps
from potluck.ops.vcs import Wanted, fetch_objects


@dataclass
class RepairReport:
    """What ``repair`` did (``actions``), what is left with the command to run (``left``,
    the problems still there) and whether the repository is healthy now."""

    temp_removed: int = 0
    actions: list[dict[str, str]] = field(default_factory=list)
    left: list[maint.Problem] = field(default_factory=list)
    quarantined: int = 0

    @property
    def healthy(self) -> bool:
        """No problem left that makes the repository unhealthy."""
        return not any(p.bad for p in self.left)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON output."""
        return {
            "healthy": self.healthy,
            "temp_removed": self.temp_removed,
            "actions": self.actions,
            "left": [p.to_dict() for p in self.left],
            "quarantined": self.quarantined,
        }


def repair(repo: Repo, remote: str | None = None) -> RepairReport:
    """Repair the local repository (see the module doc); never raises for damaged data."""
    rep = RepairReport(temp_removed=maint.clean_temp(repo))
    for name, why, kept in repo.store.repair_packs():
        detail = f"{why}; rewritten with the {kept} whole objects it held, moved to quarantine"
        rep.actions.append({"action": "repacked", "path": f"pack {name}", "detail": detail})
    problems = maint.fsck(repo)
    _restore(repo, {p.oid for p in problems if p.kind == "missing"}, rep)
    for p in problems:
        if p.kind == "corrupt":
            where = repo.odb.quarantine(p.oid, p.detail)
            detail = f"{p.detail}; moved to {where}"
            rep.actions.append({"action": "quarantined", "oid": p.oid, "detail": detail})
    refetch = {p.oid for p in problems if p.kind in ("corrupt", "missing")}
    refetch -= {a["oid"] for a in rep.actions if a["action"] == "restored"}
    if refetch:
        _refetch(repo, refetch, remote, rep)
    for p in problems:
        if p.kind == maint.BAD_MANIFEST:
            _rewrite_manifest(repo, p, rep)
    rep.left = maint.fsck(repo, rehash=False)
    rep.quarantined = len(repo.store.quarantined())
    for p in rep.left:
        if p.bad and not p.repair:
            p.repair = _advice(p, remote)
    return rep


def _restore(repo: Repo, oids: set[str], rep: RepairReport) -> None:
    """Put back quarantined copies of missing objects that verify (a whole object can be moved
    aside by a process that raced another one repairing it); others go back to quarantine."""
    for q in repo.store.quarantined():
        if q.oid not in oids or not repo.store.restore(q):
            continue
        try:
            repo.odb.verify(q.oid)
        except IntegrityError:
            repo.odb.quarantine(q.oid, q.reason)
            continue
        oids.discard(q.oid)
        rep.actions.append({"action": "restored", "oid": q.oid, "detail": "from quarantine"})


def _wanted(repo: Repo, oids: set[str]) -> Wanted:
    """The objects ``oids`` with their sizes and one place each is used (from the manifests)."""
    wanted = Wanted()
    for path, m in maint.scan_manifests(repo).manifests.values():
        if any(o in oids for o in m.oids()):
            wanted.add_manifest(m, path)
    wanted.refs = {r: w for r, w in wanted.refs.items() if r.oid in oids}
    return wanted


def _refetch(repo: Repo, oids: set[str], remote: str | None, rep: RepairReport) -> None:
    """Download the objects from the remote (each verified on the way in); failures are left
    for the final check to report."""
    if remote is None and not repo.git.run("remote").strip():
        return
    wanted = _wanted(repo, oids)
    if not wanted.refs:
        return
    try:
        spec, obj_remote = open_object_remote(repo.git, remote)
    except PotluckError as e:
        rep.actions.append({"action": "fetch failed", "detail": e.message})
        return
    try:
        index = wireindex.fetch_index(repo.git, spec.name)
        tmp = repo.tmp_dir / "incoming"
        for one in _batches(wanted):
            try:
                stats = fetch_objects(repo.odb, obj_remote, one, tmp, index=index)
            except IntegrityError as e:
                rep.actions.append({"action": "fetch failed", "detail": e.message})
                continue
            rep.actions.append(
                {"action": "fetched", "detail": f"{stats.objects} objects from {spec.url}"}
            )
    except PotluckError as e:
        rep.actions.append({"action": "fetch failed", "detail": e.message})
    finally:
        obj_remote.close()


def _batches(wanted: Wanted) -> list[Wanted]:
    """One batch per object when there are few (so that one object the remote lacks does not
    stop the others), else a single batch."""
    if len(wanted.refs) > 64:
        return [wanted]
    return [Wanted({r: w}, {r.oid: wanted.itemsizes.get(r.oid, 1)}) for r, w in wanted.refs.items()]


def _rewrite_manifest(repo: Repo, p: maint.Problem, rep: RepairReport) -> None:
    """Write a leniently readable damaged manifest of HEAD or the index to the work tree in
    canonical form, unless the work tree holds the checkpoint itself (then `git add
    --renormalize` records the canonical form)."""
    path = p.uses[0]["path"]
    full = repo.root / path
    if full.is_file() and not full.is_symlink():
        with open(full, "rb") as f:
            if f.read(len(MAGIC)) != MAGIC:
                return  # the checkpoint itself is here: its clean gives canonical text
        data = full.read_bytes()
    else:
        data = repo.git.show_blob(p.oid) or b""
    damaged = maint.read_damaged(p.oid, path, data)
    if damaged is None or damaged.manifest is None:
        return
    full.parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(full) as f:
        f.write(dumps(damaged.manifest))
    rep.actions.append(
        {"action": "rewrote", "path": path, "detail": "manifest in canonical form (work tree)"}
    )


def _advice(p: maint.Problem, remote: str | None) -> str:
    """The command to run for a problem ``repair`` could not fix."""
    used = p.uses[0] if p.uses else {}
    where = f" ({used['path']}, tensor {used.get('tensor')})" if used else ""
    if p.kind in ("missing", "corrupt"):
        name = remote or "<remote>"
        return (
            f"object {p.oid[:12]}{where} is not on any remote this repair could reach: "
            f"`potluck push {name}` from a clone that has it, then `potluck fsck --repair`; or "
            "copy .git/potluck/objects/" + f"{p.oid[:2]}/{p.oid[2:]} from such a clone"
        )
    return "see `potluck fsck`"

"""Fill the hub's index from git: commits, per-tensor diff statistics, refs, evaluations.

Incremental: commits already indexed are skipped, evaluations are re-read when the records ref
moved. ``reindex(full=True)`` drops the repository's rows first (``potluck hub reindex``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from potluck.errors import UserError
from potluck.git import evalstore
from potluck.git.repo import MAX_MANIFEST_BYTES, Repo
from potluck.hub import index as ix
from potluck.objects.manifest import Manifest, is_manifest, parse
from potluck.ops.vcs.diff import TensorChange, diff_manifests, unchanged_count

log = logging.getLogger(__name__)
ALIAS_PREFIX = "refs/potluck/aliases/"
_REF_KINDS = {"refs/heads/": "branch", "refs/tags/": "tag", ALIAS_PREFIX: "alias"}


@dataclass(frozen=True)
class PairDiff:
    """Per-tensor changes between two commits over every model file, and the unchanged count."""

    changes: list[tuple[str, TensorChange]]  # (path, change)
    unchanged: int


class Models:
    """The potluck-stored model files of commits, manifests parsed once per blob."""

    def __init__(self, repo: Repo) -> None:
        self.repo = repo
        self._parsed: dict[str, Manifest] = {}

    def at(self, commit: str) -> dict[str, Manifest]:
        """path → manifest of every potluck-tracked file in ``commit``."""
        return {path: m for path, (_oid, m) in self.blobs(commit).items()}

    def blobs(self, commit: str) -> dict[str, tuple[str, Manifest]]:
        """path → (blob id, manifest) of every potluck-tracked file in ``commit``."""
        if not commit:
            return {}
        git = self.repo.git
        blobs = git.list_blobs(commit)
        sizes = git.object_sizes([oid for _, oid in blobs])
        out: dict[str, tuple[str, Manifest]] = {}
        with git.batch() as cat:
            for path, oid in blobs:
                if sizes.get(oid, MAX_MANIFEST_BYTES + 1) > MAX_MANIFEST_BYTES:
                    continue
                m = self._parsed.get(oid)  # pages run in threads: one lookup, no re-read
                if m is None:
                    data = cat.get(oid)
                    if data is None or not is_manifest(data):
                        continue
                    if len(self._parsed) > 512:
                        self._parsed.clear()
                    m = self._parsed[oid] = parse(data, f"{commit[:12]}:{path}")
                out[path] = (oid, m)
        return out

    def diff(self, base: str, head: str) -> PairDiff:
        """Tensor-level diff (with statistics streamed from the object store) of two commits."""
        a, b = self.at(base), self.at(head)
        changes: list[tuple[str, TensorChange]] = []
        unchanged = 0
        odb = self.repo.odb
        for path in sorted(set(a) | set(b)):
            ma, mb = a.get(path), b.get(path)
            unchanged += unchanged_count(ma, mb)
            if ma is not None and mb is not None and ma.tensors() == mb.tensors():
                continue
            ta = ma.tensors() if ma else {}
            tb = mb.tensors() if mb else {}
            for c in diff_manifests(
                ma,
                mb,
                lambda n, t=ta: odb.read_chunks(t[n].oid),  # type: ignore[misc]
                lambda n, t=tb: odb.read_chunks(t[n].oid),  # type: ignore[misc]
            ):
                changes.append((path, c))
        return PairDiff(changes, unchanged)


def store_pair(conn: Connection, repo: str, base: str, head: str, d: PairDiff) -> None:
    """Write one pair's diff into ``changes`` / ``pairs`` (replacing what was there)."""
    for t in (ix.CHANGES, ix.PAIRS):
        conn.execute(sa.delete(t).where(t.c.repo == repo, t.c.base == base, t.c.head == head))
    conn.execute(sa.insert(ix.PAIRS).values(repo=repo, base=base, head=head, unchanged=d.unchanged))
    rows = []
    for path, c in d.changes:
        s = c.stats
        rows.append(
            {
                "repo": repo,
                "base": base,
                "head": head,
                "path": path,
                "name": c.name,
                "status": c.status,
                "old": c.old,
                "new": c.new,
                "l2": s.l2 if s else None,
                "rel": _finite(s.rel) if s else None,
                "frac": s.frac_changed if s else None,
                "max_abs": s.max_abs if s else None,
                "numel": s.numel if s else None,
            }
        )
    if rows:
        conn.execute(sa.insert(ix.CHANGES), rows)


def _finite(x: float) -> float | None:
    return x if x == x and abs(x) != float("inf") else None


def _commits(repo: Repo) -> list[list[str]]:
    """[sha, parents, author, time, subject] of every commit of a branch, tag or alias."""
    fmt = "--format=%H%x1f%P%x1f%an%x1f%at%x1f%s"
    raw = repo.git.run("log", fmt, "--branches", "--tags", f"--glob={ALIAS_PREFIX}*", "--")
    return [line.split("\x1f", 4) for line in raw.decode("utf-8", "replace").splitlines() if line]


def _refs(repo: Repo) -> list[tuple[str, str, str]]:
    raw = repo.git.run(
        "for-each-ref",
        "--format=%(refname)%09%(objectname)%09%(*objectname)",
        "refs/heads",
        "refs/tags",
        ALIAS_PREFIX.rstrip("/"),
    )
    out = []
    for line in raw.decode("utf-8", "replace").splitlines():
        ref, sha, peeled = line.split("\t")
        for prefix, kind in _REF_KINDS.items():
            if ref.startswith(prefix):
                out.append((ref[len(prefix) :], kind, peeled or sha))
    head = repo.git.rev_parse("HEAD^{commit}")
    return out + ([("HEAD", "head", head)] if head else [])


def _weights(repo: Repo, sha: str) -> str | None:
    try:
        return evalstore.digest_at(repo, sha)
    except UserError:
        return None


def _index_commit(conn: Connection, name: str, models: Models, row: list[str]) -> None:
    sha, parents, author, time, subject = row
    base = parents.split()[0] if parents else ""
    d = models.diff(base, sha)
    store_pair(conn, name, base, sha, d)
    count = {k: sum(1 for _, c in d.changes if c.status == k) for k in ("added", "removed")}
    blobs = models.blobs(sha)
    _store_names(conn, name, blobs)
    conn.execute(
        sa.insert(ix.COMMITS).values(
            repo=name,
            sha=sha,
            parents=parents,
            author=author,
            time=int(time),
            subject=subject,
            weights=_weights(models.repo, sha),
            added=count["added"],
            removed=count["removed"],
            changed=len(d.changes) - count["added"] - count["removed"],
            paths="\n".join(sorted(blobs)),
            blobs="\n".join(f"{p}\t{oid}" for p, (oid, _m) in sorted(blobs.items())),
        )
    )


def _store_names(conn: Connection, name: str, blobs: dict[str, tuple[str, Manifest]]) -> None:
    """The tensor names of each manifest blob not indexed yet (for heat maps' unchanged cells)."""
    t = ix.MANIFESTS
    for oid, m in {oid: m for oid, m in blobs.values()}.items():
        if conn.execute(sa.select(t.c.oid).where(t.c.repo == name, t.c.oid == oid)).first():
            continue
        names = sorted(set(m.tensors()) | {v.name for v in m.views})
        conn.execute(sa.insert(t).values(repo=name, oid=oid, names="\n".join(names)))


def _index_evals(conn: Connection, name: str, repo: Repo) -> None:
    head = repo.git.rev_parse(evalstore.EVALS_REF) or ""
    weights = {
        w for (w,) in conn.execute(sa.select(ix.COMMITS.c.weights).where(ix.COMMITS.c.repo == name))
    } - {None}
    conn.execute(sa.delete(ix.EVALS).where(ix.EVALS.c.repo == name))
    rows = []
    for w in sorted(weights):
        for r in evalstore.records_for(repo, w):
            gate = dict(r.gate or {})
            rows.append(
                {
                    "repo": name,
                    "id": r.id,
                    "weights": r.weights,
                    "kind": r.kind,
                    "task": r.task,
                    "metric": r.metric,
                    "direction": r.direction,
                    "value": _finite(r.value),
                    "stderr": r.stderr,
                    "n": r.n,
                    "trust": r.trust,
                    "verdict": gate.get("verdict"),
                    "base_weights": gate.get("base_weights"),
                }
            )
    if rows:
        conn.execute(sa.insert(ix.EVALS), rows)
    ix.set_state(conn, name, "evals", head)


def reindex(engine: Engine, name: str, repo: Repo, full: bool = False) -> int:
    """Bring ``name``'s rows up to date with ``repo``; returns the number of commits indexed."""
    models = Models(repo)
    with ix.begin(engine) as conn:
        if full:
            ix.drop_repo(conn, name)
        done = {
            s for (s,) in conn.execute(sa.select(ix.COMMITS.c.sha).where(ix.COMMITS.c.repo == name))
        }
    new = [row for row in _commits(repo) if row[0] not in done]
    for row in reversed(new):  # oldest first; one transaction per commit
        with ix.begin(engine) as conn:
            _index_commit(conn, name, models, row)
        log.info("indexed %s %s", row[0][:10], row[4][:60])
    with ix.begin(engine) as conn:
        conn.execute(sa.delete(ix.REFS).where(ix.REFS.c.repo == name))
        refs = [{"repo": name, "name": n, "kind": k, "sha": s} for n, k, s in _refs(repo)]
        if refs:
            conn.execute(sa.insert(ix.REFS), refs)
        if (
            new
            or full
            or ix.get_state(conn, name, "evals") != (repo.git.rev_parse(evalstore.EVALS_REF) or "")
        ):
            _index_evals(conn, name, repo)
        ix.set_state(conn, "", "generation", str(time.time_ns()))  # cached pages are stale
    return len(new)

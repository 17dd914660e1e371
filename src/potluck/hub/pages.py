"""The data behind each hub page (the JSON twins return it as is; templates render it).

Every value taken from a URL is looked up in the index before use: a repository by its name in
the hub, a revision by a ref name or commit id known to the index, a model path by the paths the
index lists for that commit, a tensor by its name in that manifest. Nothing from a URL reaches
git's command line or the file system.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from potluck.errors import UserError
from potluck.git.repo import Repo
from potluck.hub import index as ix
from potluck.hub import svg
from potluck.hub.indexer import Models, reindex, store_pair

_HEX = re.compile(r"^[0-9a-f]{4,40}$")


class NotFound(UserError):
    """A page asked for something the hub does not have (HTTP 404)."""


@dataclass
class Hub:
    """The repositories served, by name, and the index."""

    engine: Engine
    repos: dict[str, Repo]
    models: dict[str, Models] = field(default_factory=dict)

    def repo(self, name: str) -> Repo:
        """The repository called ``name`` in this hub."""
        if name not in self.repos:
            raise NotFound(f"no repository {name!r} in this hub", hint="see the list at /")
        return self.repos[name]

    def models_of(self, name: str) -> Models:
        """The manifest reader of ``name``."""
        return self.models.setdefault(name, Models(self.repo(name)))

    def reindex(self, full: bool = False) -> dict[str, int]:
        """Index every repository (new commits only unless ``full``)."""
        return {n: reindex(self.engine, n, r, full) for n, r in self.repos.items()}


def hub_for(paths: list[str], db: str | None) -> Hub:
    """A hub over the repositories at ``paths`` (default: the current one)."""
    repos: dict[str, Repo] = {}
    for p in paths or ["."]:
        if not Path(p).is_dir():
            raise UserError(f"{p}: no such directory", hint="give the path of a git repository")
        repo = Repo(Path(p))
        name = repo.root.name or "repo"
        while name in repos:
            name += "-"
        repos[name] = repo
    first = next(iter(repos.values()))
    if db is None:
        first.potluck_dir.mkdir(parents=True, exist_ok=True)
        db = f"sqlite:///{first.potluck_dir / 'hub.sqlite'}"
    return Hub(ix.engine_for(db), repos)


def resolve(hub: Hub, name: str, rev: str) -> str:
    """A ref name (branch, tag, alias) or an indexed commit id (4+ hex digits) → commit."""
    hub.repo(name)
    with hub.engine.connect() as c:
        sha = c.execute(
            sa.select(ix.REFS.c.sha).where(ix.REFS.c.repo == name, ix.REFS.c.name == rev)
        ).scalar()
        if sha is None and _HEX.match(rev):
            found = c.execute(
                sa.select(ix.COMMITS.c.sha)
                .where(ix.COMMITS.c.repo == name, ix.COMMITS.c.sha.startswith(rev))
                .limit(2)
            ).all()
            sha = found[0][0] if len(found) == 1 else None
    if sha is None:
        raise NotFound(
            f"no revision {rev!r} in {name}", hint="give a branch, tag, alias or commit id"
        )
    return str(sha)


def overview(hub: Hub, name: str) -> dict[str, Any]:
    """Branches, tags, aliases, counts and the latest evaluations of ``name``."""
    hub.repo(name)
    with hub.engine.connect() as c:
        refs = ix.rows(c, sa.select(ix.REFS).where(ix.REFS.c.repo == name).order_by(ix.REFS.c.name))
        n = c.execute(sa.select(sa.func.count()).where(ix.COMMITS.c.repo == name)).scalar()
        latest = ix.rows(
            c,
            sa.select(ix.EVALS, ix.COMMITS.c.sha, ix.COMMITS.c.time)
            .join(
                ix.COMMITS,
                sa.and_(
                    ix.COMMITS.c.repo == ix.EVALS.c.repo, ix.COMMITS.c.weights == ix.EVALS.c.weights
                ),
            )
            .where(ix.EVALS.c.repo == name, ix.EVALS.c.kind == "score")
            .order_by(ix.COMMITS.c.time.desc(), ix.EVALS.c.task)
            .limit(10),
        )
    by_kind: dict[str, list[dict[str, Any]]] = {"branch": [], "tag": [], "alias": [], "head": []}
    for r in refs:
        by_kind[r["kind"]].append({"name": r["name"], "sha": r["sha"]})
    return {
        "repo": name,
        "commits": n,
        "branches": by_kind["branch"],
        "tags": by_kind["tag"],
        "aliases": by_kind["alias"],
        "head": by_kind["head"][0]["sha"] if by_kind["head"] else None,
        "latest_evals": [_eval_row(e) for e in latest],
    }


def _eval_row(e: dict[str, Any]) -> dict[str, Any]:
    keep = ("task", "metric", "direction", "value", "stderr", "n", "trust", "weights", "kind")
    out = {k: e[k] for k in keep}
    out.update({"verdict": e.get("verdict"), "commit": e.get("sha")})
    return out


def commits(hub: Hub, name: str, limit: int = 100, offset: int = 0) -> dict[str, Any]:
    """Commits newest first, with their tensor change counts."""
    hub.repo(name)
    t = ix.COMMITS
    with hub.engine.connect() as c:
        got = ix.rows(
            c,
            sa.select(
                t.c.sha,
                t.c.parents,
                t.c.author,
                t.c.time,
                t.c.subject,
                t.c.weights,
                t.c.added,
                t.c.removed,
                t.c.changed,
            )
            .where(t.c.repo == name)
            .order_by(t.c.time.desc(), t.c.sha)
            .limit(max(1, min(limit, 1000)))
            .offset(max(0, offset)),
        )
    for r in got:
        r["parents"] = r["parents"].split()
    return {"repo": name, "commits": got, "limit": limit, "offset": offset}


def _pair(hub: Hub, name: str, base: str, head: str) -> tuple[int, list[dict[str, Any]]]:
    with hub.engine.connect() as c:
        q = sa.select(ix.PAIRS.c.unchanged).where(
            ix.PAIRS.c.repo == name, ix.PAIRS.c.base == base, ix.PAIRS.c.head == head
        )
        unchanged = c.execute(q).scalar()
        if unchanged is not None:
            t = ix.CHANGES
            cols = [
                t.c.path,
                t.c.name,
                t.c.status,
                t.c.old,
                t.c.new,
                t.c.l2,
                t.c.rel,
                t.c.frac,
                t.c.max_abs,
                t.c.numel,
            ]
            got = ix.rows(
                c,
                sa.select(*cols)
                .where(t.c.repo == name, t.c.base == base, t.c.head == head)
                .order_by(t.c.path, t.c.name),
            )
            return int(unchanged), got
    d = hub.models_of(name).diff(base, head)  # a pair no page asked for yet: computed once
    with ix.begin(hub.engine) as conn:
        store_pair(conn, name, base, head, d)
    return _pair(hub, name, base, head)


def diff(hub: Hub, name: str, a: str, b: str) -> dict[str, Any]:
    """Per-tensor statistics from revision ``a`` to ``b`` and the heat map of ‖Δ‖/‖W‖."""
    return _changes(hub, name, resolve(hub, name, a), resolve(hub, name, b))


def _head_names(hub: Hub, name: str, head: str) -> dict[str, list[str]]:
    """path → tensor names of every model file at ``head`` (from the index)."""
    with hub.engine.connect() as c:
        blobs = c.execute(
            sa.select(ix.COMMITS.c.blobs).where(ix.COMMITS.c.repo == name, ix.COMMITS.c.sha == head)
        ).scalar()
        pairs = [line.split("\t") for line in (blobs or "").split("\n") if line]
        oids = {oid for _, oid in pairs}
        t = ix.MANIFESTS
        names = dict(
            c.execute(
                sa.select(t.c.oid, t.c.names).where(t.c.repo == name, t.c.oid.in_(oids))
            ).all()
        )
    return {p: [n for n in names.get(oid, "").split("\n") if n] for p, oid in pairs}


def _changes(hub: Hub, name: str, base: str, head: str) -> dict[str, Any]:
    """The diff table and heat map: one cell per tensor of ``head`` (unchanged ones white) and
    per removed tensor."""
    unchanged, rows = _pair(hub, name, base, head)
    rows.sort(key=lambda r: (-(r["rel"] if r["rel"] is not None else -1.0), r["path"], r["name"]))
    heads = _head_names(hub, name, head)
    several = len(set(heads) | {r["path"] for r in rows}) > 1
    cells: dict[tuple[str, str], tuple[str, str, float | None]] = {}
    for path, names in heads.items():
        for n in names:
            cells[(path, n)] = (f"{path}:{n}" if several else n, "unchanged", 0.0)
    for r in rows:
        label = f"{r['path']}:{r['name']}" if several else r["name"]
        cells[(r["path"], r["name"])] = (label, r["status"], r["rel"])
    return {
        "repo": name,
        "base": base or None,
        "head": head,
        "unchanged": unchanged,
        "changes": rows,
        "heatmap": svg.heatmap(list(cells.values())),
    }


def commit(hub: Hub, name: str, rev: str) -> dict[str, Any]:
    """A commit's metadata and its diff against its first parent."""
    sha = resolve(hub, name, rev)
    with hub.engine.connect() as c:
        meta = ix.rows(
            c, sa.select(ix.COMMITS).where(ix.COMMITS.c.repo == name, ix.COMMITS.c.sha == sha)
        )[0]
    parents = meta["parents"].split()
    out = _changes(hub, name, parents[0] if parents else "", sha)
    out["commit"] = {k: meta[k] for k in ("sha", "author", "time", "subject", "weights")}
    out["commit"]["parents"] = parents
    out["paths"] = [p for p in meta["paths"].split("\n") if p]
    return out

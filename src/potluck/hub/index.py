"""The hub's index (SQLAlchemy: SQLite by default, Postgres by URL), rebuildable from git.

Tables, every row keyed by the repository's name in the hub:

* ``commits``: one row per commit reachable from a branch, tag or alias, with the number of
  tensors added / removed / changed against its first parent and its weights digest;
* ``changes``: per-tensor diff statistics (‖Δ‖, ‖Δ‖/‖W‖, fraction changed, max |Δ|) between two
  commits (``base`` = the first parent for indexed commits, "" for a root commit; other pairs
  are added when a page first asks for them, see ``potluck.hub.pages``);
* ``pairs``: which (base, head) pairs ``changes`` holds (an empty diff is a fact too);
* ``manifests``: the tensor names of each model file version (the heat map's unchanged cells);
* ``refs``: branches, tags and aliases (``refs/potluck/aliases/*``);
* ``evals``: the evaluation records (``potluck.git.evalstore``) of the indexed weights;
* ``state``: what was indexed (the evals ref's commit), to re-read only what moved.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from potluck.errors import UserError

META = sa.MetaData()
#: The layout of the tables; an index with another value is rebuilt from scratch.
SCHEMA = "1"
_R = sa.String(200)
_SHA = sa.String(64)

STATE = sa.Table(
    "state",
    META,
    sa.Column("repo", _R, primary_key=True),
    sa.Column("key", sa.String(100), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)
COMMITS = sa.Table(
    "commits",
    META,
    sa.Column("repo", _R, primary_key=True),
    sa.Column("sha", _SHA, primary_key=True),
    sa.Column("parents", sa.Text, nullable=False),  # space-separated
    sa.Column("author", sa.Text, nullable=False),
    sa.Column("time", sa.BigInteger, nullable=False),
    sa.Column("subject", sa.Text, nullable=False),
    sa.Column("weights", sa.String(64), nullable=True),
    sa.Column("added", sa.Integer, nullable=False),
    sa.Column("removed", sa.Integer, nullable=False),
    sa.Column("changed", sa.Integer, nullable=False),
    sa.Column("paths", sa.Text, nullable=False),  # newline-separated model files at the commit
    sa.Column("blobs", sa.Text, nullable=False),  # "path\tmanifest blob id" lines
)
MANIFESTS = sa.Table(
    "manifests",
    META,
    sa.Column("repo", _R, primary_key=True),
    sa.Column("oid", sa.String(64), primary_key=True),
    sa.Column("names", sa.Text, nullable=False),  # newline-separated tensor and view names
)
PAIRS = sa.Table(
    "pairs",
    META,
    sa.Column("repo", _R, primary_key=True),
    sa.Column("base", sa.String(40), primary_key=True),
    sa.Column("head", sa.String(40), primary_key=True),
    sa.Column("unchanged", sa.Integer, nullable=False),
)
CHANGES = sa.Table(
    "changes",
    META,
    sa.Column("repo", _R, primary_key=True),
    sa.Column("base", sa.String(40), primary_key=True),
    sa.Column("head", sa.String(40), primary_key=True),
    sa.Column("path", sa.Text, primary_key=True),
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("old", sa.Text, nullable=True),
    sa.Column("new", sa.Text, nullable=True),
    sa.Column("l2", sa.Float, nullable=True),
    sa.Column("rel", sa.Float, nullable=True),
    sa.Column("frac", sa.Float, nullable=True),
    sa.Column("max_abs", sa.Float, nullable=True),
    sa.Column("numel", sa.BigInteger, nullable=True),
    sa.Index("changes_by_name", "repo", "path", "name"),
)
REFS = sa.Table(
    "refs",
    META,
    sa.Column("repo", _R, primary_key=True),
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("kind", sa.String(20), nullable=False),  # branch, tag, alias
    sa.Column("sha", sa.String(40), nullable=False),
)
EVALS = sa.Table(
    "evals",
    META,
    sa.Column("repo", _R, primary_key=True),
    sa.Column("id", _SHA, primary_key=True),
    sa.Column("weights", _SHA, nullable=False),
    sa.Column("kind", sa.String(10), nullable=False),
    sa.Column("task", sa.Text, nullable=False),
    sa.Column("metric", sa.Text, nullable=False),
    sa.Column("direction", sa.String(10), nullable=False),
    sa.Column("value", sa.Float, nullable=True),
    sa.Column("stderr", sa.Float, nullable=True),
    sa.Column("n", sa.Integer, nullable=True),
    sa.Column("trust", sa.String(20), nullable=False),
    sa.Column("verdict", sa.String(20), nullable=True),
    sa.Column("base_weights", sa.String(64), nullable=True),
    sa.Index("evals_by_weights", "repo", "weights"),
)


def engine_for(url: str) -> Engine:
    """An engine for ``url`` (``sqlite:///PATH`` or ``postgresql://…``), tables created."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    try:
        args = {"check_same_thread": False} if url.startswith("sqlite") else {}
        eng = sa.create_engine(url, connect_args=args, pool_pre_ping=True)
        _create(eng)
    except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError) as e:
        raise UserError(
            f"not a database URL: {url.split('@')[-1]!r}",
            hint="give sqlite:///PATH or postgresql://USER@HOST:PORT/DB",
        ) from e
    except sa.exc.OperationalError as e:
        raise UserError(
            f"cannot open the hub index at {url.split('@')[-1]}: {e.orig}",
            hint="check that the database server runs and the URL names it",
        ) from e
    return eng


def _create(eng: Engine) -> None:
    """Create the tables; an index of another schema version is dropped and made again (it is a
    cache of git: ``reindex`` refills it)."""
    META.create_all(eng)
    with eng.begin() as conn:
        try:
            found = get_state(conn, "", "schema")
        except sa.exc.DBAPIError:  # a table of an older layout
            found = None
    if found == SCHEMA:
        return
    META.drop_all(eng)
    META.create_all(eng)
    with eng.begin() as conn:
        set_state(conn, "", "schema", SCHEMA)


@contextmanager
def begin(engine: Engine) -> Iterator[Connection]:
    """One transaction."""
    with engine.begin() as conn:
        yield conn


def rows(conn: Connection, stmt: Any) -> list[dict[str, Any]]:
    """The result rows of ``stmt`` as plain dicts."""
    return [dict(r._mapping) for r in conn.execute(stmt)]


def get_state(conn: Connection, repo: str, key: str) -> str | None:
    """A value saved by ``set_state``."""
    t = STATE
    return conn.execute(
        sa.select(t.c.value).where(t.c.repo == repo, t.c.key == key)
    ).scalar_one_or_none()


def set_state(conn: Connection, repo: str, key: str, value: str) -> None:
    """Save ``value`` under (repo, key)."""
    conn.execute(sa.delete(STATE).where(STATE.c.repo == repo, STATE.c.key == key))
    conn.execute(sa.insert(STATE).values(repo=repo, key=key, value=value))


def drop_repo(conn: Connection, repo: str) -> None:
    """Forget everything indexed about ``repo``."""
    for t in (STATE, COMMITS, PAIRS, CHANGES, REFS, EVALS, MANIFESTS):
        conn.execute(sa.delete(t).where(t.c.repo == repo))

"""Evaluation records (schema ``potluck_eval: 1``) on ``refs/potluck/evals``.

Records are immutable, content-addressed files on their own ref, keyed by the weights digest
(not the commit: a rebase or cherry-pick keeps the weights and so keeps their records)::

    records/<weights[:2]>/<weights>/<record id>.json
    outcomes/<oid[:2]>/<oid>.json

Two copies of the ref merge by union of their files (same path = same bytes), so push/pull
never conflict. See docs/evaluations.md. (The point values of ``potluck eval record`` stay git
notes: ``potluck.git.evalrec``.)
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

from potluck.errors import IntegrityError, UserError
from potluck.git.plumbing import Git
from potluck.git.repo import MAX_MANIFEST_BYTES, Repo
from potluck.objects.manifest import Manifest, is_manifest, parse
from potluck.ops.evals.records import (
    EvalRecord,
    Outcomes,
    outcomes_from_bytes,
    record_from_bytes,
)

EVALS_REF = "refs/potluck/evals"
#: Remote-tracking copies of the records: ``refs/potluck/remotes/<remote>/evals``
#: (``potluck.git.evalsync``).
TRACKING_ROOT = "refs/potluck/remotes/"
_ZERO = "0" * 40


def _resolve(git: Git, rev: str) -> str:
    commit = git.rev_parse(f"{rev}^{{commit}}")
    if commit is None:
        raise UserError(f"{rev!r} is not a commit", hint="give a branch, tag or commit id", rev=rev)
    return commit


def digest_at(repo: Repo, rev: str, paths: Sequence[str] = ()) -> str:
    """The weights digest of every potluck-tracked checkpoint in ``rev`` (under ``paths``)."""
    commit = _resolve(repo.git, rev)
    blobs = repo.git.list_blobs(commit, list(paths) or None)
    sizes = repo.git.object_sizes([oid for _, oid in blobs])
    manifests: list[Manifest] = []
    labels: list[str] = []
    with repo.git.batch() as cat:
        for path, oid in blobs:
            if sizes.get(oid, MAX_MANIFEST_BYTES + 1) > MAX_MANIFEST_BYTES:
                continue
            data = cat.get(oid)
            if data is not None and is_manifest(data):
                manifests.append(parse(data, f"{rev}:{path}"))
                labels.append(path)
    if not manifests:
        raise UserError(
            f"{rev} holds no checkpoint stored by potluck"
            + (f" under {', '.join(paths)}" if paths else ""),
            hint="give a revision whose model files are tracked (potluck track)",
            rev=rev,
        )
    from potluck.ops.lineage import manifests_digest  # here: git's pre-push hook imports this
    from potluck.ops.vcs import load_tensors  # module only to push records (0.1-0.2 s less)

    return manifests_digest(manifests, lambda m, n: load_tensors(m, repo.odb, [n])[n], labels)


def _hash_blob(git: Git, data: bytes) -> str:
    return git.run("hash-object", "-w", "--stdin", input=data).decode().strip()


def _record_path(rec: EvalRecord) -> str:
    return f"records/{rec.weights[:2]}/{rec.weights}/{rec.id}.json"


def _outcomes_path(oid: str) -> str:
    return f"outcomes/{oid[:2]}/{oid}.json"


def _commit_index(git: Git, entries: Sequence[tuple[str, str]], parents: Sequence[str],
                  message: str, tmp: Path) -> str:  # fmt: skip
    """A commit of the tree of ``parents[0]`` plus ``entries`` (path, blob id)."""
    index = tmp / f"evals-index-{os.getpid()}"
    env = {"GIT_INDEX_FILE": str(index)}
    try:
        if parents:
            git.run("read-tree", parents[0], env=env)
        else:
            git.run("read-tree", "--empty", env=env)
        lines = "".join(f"100644 {oid}\t{path}\n" for path, oid in entries)
        git.run("update-index", "--add", "--index-info", input=lines.encode(), env=env)
        tree = git.run("write-tree", env=env).decode().strip()
    finally:
        index.unlink(missing_ok=True)
    args = ["commit-tree", tree, "-m", message]
    for p in parents:
        args += ["-p", p]
    return git.run(*args, env=_COMMIT_ENV).decode().strip()


_COMMIT_ENV = {
    "GIT_AUTHOR_NAME": "potluck", "GIT_AUTHOR_EMAIL": "potluck@localhost",
    "GIT_COMMITTER_NAME": "potluck", "GIT_COMMITTER_EMAIL": "potluck@localhost",
}  # fmt: skip


def store_records(
    repo: Repo, records: Sequence[EvalRecord], outcomes: Sequence[Outcomes] = ()
) -> list[str]:
    """Add records (and the outcome objects they reference) to ``refs/potluck/evals``.

    A record referencing an outcomes object not given and not stored is refused. Returns the
    record ids. The ref moves with a compare-and-swap: a concurrent writer makes this fail, not
    lose a record.
    """
    git = repo.git
    absorb(repo)  # what was fetched from remotes, so the next push is a fast-forward
    head = git.rev_parse(EVALS_REF)
    given = {o.oid: o for o in outcomes}
    entries = [(_outcomes_path(o.oid), _hash_blob(git, o.dumps())) for o in given.values()]
    for rec in records:
        if (
            rec.outcomes is not None
            and rec.outcomes not in given
            and (head is None or git.show_blob(f"{head}:{_outcomes_path(rec.outcomes)}") is None)
        ):
            raise UserError(
                f"record for {rec.task} references outcomes {rec.outcomes[:12]} that are not "
                "stored", hint="store the outcomes object with the record",
            )  # fmt: skip
        entries.append((_record_path(rec), _hash_blob(git, rec.dumps())))
    msg = f"potluck eval: {len(records)} record(s)"
    new = _commit_index(git, entries, [head] if head else [], msg, repo.tmp_dir)
    git.run("update-ref", "-m", msg, EVALS_REF, new, head or _ZERO)
    return [r.id for r in records]


def records_for(repo: Repo, weights: str, ref: str = EVALS_REF) -> list[EvalRecord]:
    """Every record stored for the weights digest ``weights`` (sorted by task, kind, id)."""
    head = repo.git.rev_parse(ref)
    if head is None:
        return []
    out = []
    with repo.git.batch() as cat:  # one git process however many records
        for path, oid in repo.git.list_blobs(head, [f"records/{weights[:2]}/{weights}/"]):
            rec = record_from_bytes(cat.get(oid) or b"", f"{ref}:{path}")
            if rec.weights != weights:
                raise UserError(
                    f"{ref}:{path} is filed under another weights digest ({rec.weights[:12]})",
                    hint="the records ref was edited by hand; remove that file",
                )
            out.append(rec)
    return sorted(out, key=lambda r: (r.task, r.kind, r.id))


def read_outcomes(repo: Repo, oid: str) -> Outcomes | None:
    """The outcomes object ``oid`` (None when not stored)."""
    data = repo.git.show_blob(f"{EVALS_REF}:{_outcomes_path(oid)}")
    if data is None:
        return None
    oc = outcomes_from_bytes(data, f"outcomes {oid[:12]}")
    if oc.oid != oid:
        raise IntegrityError(f"outcomes object {oid[:12]} does not hash to its id")
    return oc


def check_record_weights(rec: EvalRecord, weights: str, what: str) -> None:
    """Refuse a record whose weights digest is not ``weights`` (the digest of ``what``)."""
    if rec.weights != weights:
        raise UserError(
            f"the record of {rec.task} is for weights {rec.weights[:12]}, but {what} holds "
            f"weights {weights[:12]}",
            hint="record evaluations of the exact weights they measured",
            record_weights=rec.weights, weights=weights,
        )  # fmt: skip


def tracking_ref(remote: str) -> str:
    """Where the records of the remote ``remote`` (a name or a URL) are fetched to."""
    if not _is_ref_component(remote):
        remote = "url-" + hashlib.sha1(remote.encode()).hexdigest()[:16]
    return f"{TRACKING_ROOT}{remote}/evals"


def _is_ref_component(name: str) -> bool:
    bad = (":", " ", "~", "^", "?", "*", "[", "\\", "..", "@{", "//")
    return (
        bool(name) and not name.startswith(("/", ".", "-")) and not name.endswith((".", "/"))
        and not any(b in name for b in bad) and not name.endswith(".lock")
    )  # fmt: skip


def pull_records(repo: Repo, remote: str, *, missing_ok: bool = False) -> str:
    """Fetch the remote's records and merge them into ours (union of content-addressed files)."""
    tracking = tracking_ref(remote)
    proc = repo.git.run_proc("fetch", "-q", remote, f"+{EVALS_REF}:{tracking}")
    if proc.returncode != 0:
        if missing_ok and b"couldn't find remote ref" in proc.stderr:
            return f"{remote} has no evaluation records yet"
        raise UserError(
            f"cannot fetch evaluation records from {remote}: {proc.stderr.decode().strip()}",
            hint="check the remote's name, or that it has records (potluck eval push)",
        )
    return merge_records_ref(repo, tracking)


def merge_records_ref(repo: Repo, other: str) -> str:
    """Union-merge the records ref ``other`` into ours; fast-forward when possible."""
    git = repo.git
    theirs, ours = git.rev_parse(other), git.rev_parse(EVALS_REF)
    if theirs is None or theirs == ours:
        return "records already up to date"
    if ours is None or git.is_ancestor(ours, theirs):
        git.run("update-ref", EVALS_REF, theirs, ours or _ZERO)
        return "records fast-forwarded"
    if git.is_ancestor(theirs, ours):
        return "records already up to date"
    have = {p for p, _ in git.list_blobs(ours)}
    extra = [(p, o) for p, o in git.list_blobs(theirs) if p not in have]
    new = _commit_index(git, extra, [ours, theirs], f"potluck eval: merge {other}", repo.tmp_dir)
    git.run("update-ref", EVALS_REF, new, ours)
    return f"merged {len(extra)} file(s) of records"


def tracking_refs(git: Git) -> list[str]:
    """Every remote-tracking copy of the records (``TRACKING_ROOT``)."""
    out = git.run("for-each-ref", "--format=%(refname)", TRACKING_ROOT).decode()
    return [r for r in out.split() if r.endswith("/evals")]


def absorb(repo: Repo) -> int:
    """Union every remote-tracking copy of the records into ``refs/potluck/evals`` (a plain
    ``git fetch`` brings them there); returns how many copies brought something new. Costs one
    ``git for-each-ref`` when there is nothing to merge."""
    new = 0
    for ref in tracking_refs(repo.git):
        if merge_records_ref(repo, ref) != "records already up to date":
            new += 1
    return new

"""How potluck merged the weights, recorded by the merge driver and written into the merge commit.

The merge driver appends one JSON line per merged file to ``<git dir>/potluck/merge-record.jsonl``
(per worktree): the path, the git blob ids of the base/ours/theirs/result manifests, ``HEAD`` at
merge time, the tensors taken one-sided from each side, the tensors combined per merge rule
(method, resolved parameters, seed) and the conflicts, later the ``potluck resolve`` decisions.

The ``prepare-commit-msg`` hook (``potluck init`` installs it) turns the entries of the merge in
progress into ``Potluck-Merge:`` trailers. An entry describes the commit only when it was made at
the current ``HEAD`` (ours), its base/theirs blobs are the file's blobs at the merge base and at
``MERGE_HEAD``, and its result blob is the staged one (``potluck resolve`` records the blob it
stages): so the trailer is true of the committed bytes, a record left behind by an aborted merge
never describes a later one (``git merge -s ours`` of the same branch, a hand resolution), and a
file changed by hand after the merge gets no trailer. The driver drops entries of another ``HEAD``
before it appends; each commit drops the entries that do not describe it, so an ordinary commit
clears the record.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from potluck.config import MergeRule
from potluck.fileio import atomic_writer
from potluck.git.plumbing import Git
from potluck.git.setup import MERGE_RECORD
from potluck.merging import MERGE_METHODS
from potluck.objects.manifest import Manifest

TRAILER = "Potluck-Merge"
_SIDE_METHODS = ("ours", "theirs", "conflict")


@dataclass
class MethodGroup:
    """Tensors combined by one merge rule: its method, resolved parameters and seed."""

    method: str
    params: dict[str, Any]
    seed: int | None
    tensors: list[str]

    def label(self) -> str:
        """``ties(density=0.2, …, seed=0)``; bare ``ours``/``theirs`` for side rules."""
        if self.seed is None:
            return self.method
        args = [f"{k}={_fmt(v)}" for k, v in sorted(self.params.items())]
        return f"{self.method}({', '.join([*args, f'seed={self.seed}'])})"


@dataclass
class MergeEntry:
    """One merged file (see the module docstring); ``blobs`` maps base/ours/theirs/result to git
    blob ids (None: no base, or a result not decided yet)."""

    path: str
    head: str | None
    blobs: dict[str, str | None]
    combined: list[MethodGroup] = field(default_factory=list)
    from_theirs: list[str] = field(default_factory=list)
    from_ours: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    resolved: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        """One compact JSON line."""
        d = dict(vars(self), version=1, combined=[vars(g) for g in self.combined])
        return json.dumps(d, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> MergeEntry:
        """Parse one line."""
        d = json.loads(text)
        d.pop("version", None)
        d["combined"] = [MethodGroup(**g) for g in d["combined"]]
        return cls(**d)

    def trailer_value(self, squashed: tuple[str, str] | None = None) -> str:
        """``PATH: ties(…) 12 tensors; ours 2 tensors; one-sided: 30 from theirs, 4 from ours``;
        a squash merge adds ``; squashed COMMIT DIGEST`` (the squashed branch's tip and the
        weights digest of this file there, since that commit is no parent of the squash)."""
        parts = [f"{g.label()} {_count(len(g.tensors))}" for g in self.combined]
        parts.append(
            f"one-sided: {len(self.from_theirs)} from theirs, {len(self.from_ours)} from ours"
        )
        if self.conflicts:
            sides = [self.resolved.get(n, "unresolved") for n in self.conflicts]
            counts = ", ".join(f"{sides.count(s)} {s}" for s in sorted(set(sides)))
            parts.append(f"conflicts: {counts} (potluck resolve)")
        if squashed is not None:
            parts.append(f"squashed {squashed[0]} {squashed[1]}")
        return f"{_quote_path(self.path)}: " + "; ".join(parts)


def _count(n: int) -> str:
    return f"{n} tensor" + ("" if n == 1 else "s")


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    return json.dumps(value)


def _quote_path(path: str) -> str:
    return json.dumps(path) if any(c.isspace() or c in ':;"' for c in path) else path


def blob_id(data: bytes, like: str | None) -> str:
    """git's blob id of ``data``; sha256 when ``like`` (an object id) is 64 hex digits."""
    algo = "sha256" if like is not None and len(like) == 64 else "sha1"
    return hashlib.new(algo, b"blob %d\0" % len(data) + data).hexdigest()


def group_by_rule(rules: Iterable[MergeRule], path: str, names: Iterable[str]) -> list[MethodGroup]:
    """The combined tensors ``names`` grouped by the first rule matching each (rule order),
    with each method's parameters resolved to their full values (defaults included)."""
    active = [r for r in rules if fnmatch.fnmatchcase(path, r.path)]
    groups: dict[int, MethodGroup] = {}
    for name in names:
        i = next((i for i, r in enumerate(active) if fnmatch.fnmatchcase(name, r.tensors)), None)
        if i is None:
            continue
        if i not in groups:
            r = active[i]
            side = r.method in _SIDE_METHODS
            params = {} if side else MERGE_METHODS.get(r.method).resolve_params(r.params)
            groups[i] = MethodGroup(r.method, params, None if side else r.seed, [])
        groups[i].tensors.append(name)
    return [groups[i] for i in sorted(groups)]


def one_sided_ours(base: Manifest | None, ours: Manifest, theirs: Manifest) -> list[str]:
    """Tensors changed on ours only (kept from ours exactly)."""
    b = base.tensors() if base else {}
    o, t = ours.tensors(), theirs.tensors()

    def key(m: Mapping[str, Any], n: str) -> tuple[str, str, tuple[int, ...]] | None:
        e = m.get(n)
        return None if e is None else (e.oid, e.dtype, e.shape)

    names = list(o) + [n for n in b if n not in o]
    return [n for n in names if key(o, n) != key(b, n) and key(t, n) == key(b, n)]


def record_file(git: Git) -> Path:
    """This worktree's record (``.git/potluck/merge-record.jsonl`` in the main worktree)."""
    return git.git_dir() / "potluck" / MERGE_RECORD


def read_entries(git: Git) -> list[MergeEntry]:
    """Every entry of the record, oldest first."""
    path = record_file(git)
    if not path.exists():
        return []
    return [MergeEntry.from_json(ln) for ln in path.read_text().splitlines() if ln.strip()]


def _write_entries(git: Git, entries: list[MergeEntry]) -> None:
    path = record_file(git)
    if not entries:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(path) as f:
        f.write("".join(e.to_json() + "\n" for e in entries).encode())


def append_entry(git: Git, entry: MergeEntry) -> None:
    """Add ``entry``; entries recorded at another ``HEAD`` (an earlier merge) are dropped."""
    kept = [e for e in read_entries(git) if e.head == entry.head]
    _write_entries(git, [*kept, entry])


def latest_entry(git: Git, path: str) -> MergeEntry | None:
    """The newest entry of ``path`` recorded at the current ``HEAD``."""
    head = git.rev_parse("HEAD")
    found = [e for e in read_entries(git) if e.path == path and e.head == head]
    return found[-1] if found else None


def merge_entries(git: Git, theirs: str = "MERGE_HEAD") -> list[MergeEntry]:
    """The entries describing the merge in progress (module docstring), newest per path; [] when
    no merge is in progress. ``theirs``: the merged commit (a squash names it)."""
    head, merge_head = git.rev_parse("HEAD"), git.rev_parse(theirs)
    if head is None or merge_head is None:
        return []
    base_commit = git.merge_base(head, merge_head)
    latest: dict[str, MergeEntry] = {}
    for e in read_entries(git):
        if e.head == head:
            latest[e.path] = e
    out = []
    for path, e in sorted(latest.items()):
        base = git.rev_parse(f"{base_commit}:{path}") if base_commit else None
        now = (base, git.rev_parse(f"{merge_head}:{path}"), git.rev_parse(f":{path}"))
        if now == (e.blobs["base"], e.blobs["theirs"], e.blobs["result"]):
            out.append(e)
    return out


def trailers(entries: list[MergeEntry]) -> list[str]:
    """One ``Potluck-Merge: …`` line per entry."""
    return [f"{TRAILER}: {e.trailer_value()}" for e in entries]


def prepare_commit_msg(git: Git, message_file: Path) -> list[str]:
    """The ``prepare-commit-msg`` hook: add the merge's trailers to ``message_file``; returns
    them. Entries that do not describe the merge in progress are dropped (a commit that is not a
    merge clears the record); this merge's stay, so a retried ``git commit`` gets them again, and
    are dropped by the next commit or merge."""
    if not record_file(git).exists():
        return []
    squashed = None if git.rev_parse("MERGE_HEAD") else squash_head(git)
    if git.rev_parse("MERGE_HEAD") is None and squashed is None:
        _write_entries(git, [])
        return []
    entries = merge_entries(git, squashed or "MERGE_HEAD")
    _write_entries(git, entries)  # whatever does not describe this merge is stale
    lines = trailers(entries) if squashed is None else squash_trailers(git, entries, squashed)
    if lines:
        text = message_file.read_bytes()
        if text and not text.endswith(b"\n"):  # git merge writes no final newline; without
            message_file.write_bytes(text + b"\n")  # one the trailer would join the subject
        args = [a for line in lines for a in ("--trailer", line)]
        git.run(
            "interpret-trailers",
            "--in-place",
            "--if-exists",
            "addIfDifferent",
            *args,
            str(message_file),
        )
    return lines


def commit_trailers(git: Git, commits: list[str], path: str) -> dict[str, list[str]]:
    """Per merge commit (or squash merge) among ``commits``, the values of its
    ``Potluck-Merge`` trailers about ``path`` (one ``git show`` for all of them)."""
    if not commits:
        return {}
    fmt = f"--format=%H%x1f%P%x1f%(trailers:key={TRAILER},valueonly,separator=%x1e)%x00"
    raw = git.run("show", "-s", fmt, *commits).decode("utf-8", "surrogateescape")
    prefix = f"{_quote_path(path)}: "
    out: dict[str, list[str]] = {}
    for record in raw.split("\0"):
        fields = record.strip("\n").split("\x1f")
        if len(fields) != 3 or (len(fields[1].split()) < 2 and "; squashed " not in fields[2]):
            continue
        values = [v.strip() for v in fields[2].split("\x1e") if v.strip().startswith(prefix)]
        out[fields[0]] = values
    return out


def squash_head(git: Git) -> str | None:
    """The tip of the branch ``git merge --squash`` merged (the first ``commit`` line of
    ``SQUASH_MSG``), while its commit is being made; else None."""
    try:
        text = git.git_path("SQUASH_MSG").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("commit "):
            return git.rev_parse(line.split()[1] + "^{commit}")
    return None


def squash_trailers(git: Git, entries: list[MergeEntry], squashed: str) -> list[str]:
    """The trailers of a squash merge: each entry's, naming the squashed commit and the weights
    digest of its file there."""
    from potluck.git.repo import Repo
    from potluck.objects.manifest import parse
    from potluck.ops.lineage import manifests_digest
    from potluck.ops.vcs.materialize import load_tensors

    repo = Repo(git.cwd)
    out = []
    for e in entries:
        blob = git.show_blob(e.blobs["theirs"] or "")
        if blob is None:
            continue
        m = parse(blob, f"{squashed}:{e.path}")
        digest = manifests_digest([m], lambda mm, n: load_tensors(mm, repo.odb, [n])[n])
        out.append(f"{TRAILER}: {e.trailer_value((squashed, digest))}")
    return out

"""git merge driver (``merge.potluck.driver``) and the conflict records behind ``resolve``.

Called as ``git-potluck merge-driver %O %A %B %P``. The result manifest is written to %A; on a
conflict it keeps "ours" for the conflicted tensors (so the checked-out file always loads), a
record goes to ``.git/potluck/merge/`` and the exit code is 1. Every merged file also gets an
entry in the merge record (``potluck.git.merge_record``) that the merge commit's
``Potluck-Merge:`` trailer is made from.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from potluck.config import MergeRule
from potluck.errors import UserError
from potluck.fileio import atomic_writer
from potluck.git import merge_record as mrec
from potluck.git.repo import Repo
from potluck.merging import MERGE_METHODS, three_way_combine
from potluck.objects.manifest import Manifest, dumps, is_manifest, parse
from potluck.ops.vcs import (
    Combine,
    Combiner,
    MergeResult,
    merge_manifests,
    resolve_manifest,
    write_file,
)


@dataclass(frozen=True)
class ConflictRecord:
    """A tensor-level conflict waiting for ``potluck resolve``."""

    path: str
    base: Manifest | None
    ours: Manifest
    theirs: Manifest
    conflicts: list[str]
    reasons: dict[str, str]

    def to_json(self) -> str:
        """JSON text of the record."""
        return json.dumps(
            {
                "path": self.path,
                "base": dumps(self.base).decode() if self.base else None,
                "ours": dumps(self.ours).decode(),
                "theirs": dumps(self.theirs).decode(),
                "conflicts": self.conflicts,
                "reasons": self.reasons,
            },
            indent=1,
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> ConflictRecord:
        """Parse a record."""
        d = json.loads(text)
        return cls(
            d["path"],
            parse(d["base"].encode()) if d["base"] else None,
            parse(d["ours"].encode()),
            parse(d["theirs"].encode()),
            list(d["conflicts"]),
            dict(d["reasons"]),
        )


def record_path(repo: Repo, path: str) -> Path:
    """Where the conflict record of ``path`` lives."""
    return repo.merge_dir / (hashlib.sha1(path.encode()).hexdigest() + ".json")


def save_record(repo: Repo, rec: ConflictRecord) -> None:
    """Write a conflict record atomically."""
    repo.merge_dir.mkdir(parents=True, exist_ok=True)
    with atomic_writer(record_path(repo, rec.path)) as f:
        f.write(rec.to_json().encode())


def load_records(repo: Repo) -> list[ConflictRecord]:
    """All unresolved conflict records, sorted by path."""
    if not repo.merge_dir.exists():
        return []
    recs = [ConflictRecord.from_json(p.read_text()) for p in repo.merge_dir.glob("*.json")]
    return sorted(recs, key=lambda r: r.path)


def run_merge_driver(repo: Repo, base_f: str, ours_f: str, theirs_f: str, path: str) -> MergeResult:
    """Merge the three manifest files; write the result to ``ours_f``; record conflicts."""
    blobs = [Path(p).read_bytes() for p in (base_f, ours_f, theirs_f)]
    if not is_manifest(blobs[1]) or not is_manifest(blobs[2]):
        raise UserError(
            f"{path}: one side is not a potluck manifest; cannot merge tensor by tensor",
            hint="check the file out from one side (`git checkout --ours/--theirs`) and commit",
        )
    base = parse(blobs[0], f"{path} (merge base)") if is_manifest(blobs[0]) else None
    ours, theirs = parse(blobs[1], f"{path} (ours)"), parse(blobs[2], f"{path} (theirs)")
    result = merge_manifests(base, ours, theirs, repo.odb, rule_combiner(repo.config.merge, path))
    out = dumps(result.manifest)
    Path(ours_f).write_bytes(out)
    rp = record_path(repo, path)
    if result.conflicts:
        save_record(repo, ConflictRecord(path, base, ours, theirs, result.conflicts, result.reason))
    elif rp.exists():
        rp.unlink()
    _record_merge(repo, path, blobs, out, (base, ours, theirs), result)
    return result


def _record_merge(
    repo: Repo,
    path: str,
    blobs: list[bytes],
    out: bytes,
    sides: tuple[Manifest | None, Manifest, Manifest],
    result: MergeResult,
) -> None:
    """Append how ``path`` was merged to the merge record (see ``merge_record``)."""
    head = repo.git.rev_parse("HEAD")
    ids = [mrec.blob_id(b, head) for b in blobs]
    entry = mrec.MergeEntry(
        path,
        head,
        {
            "base": ids[0] if sides[0] is not None else None,
            "ours": ids[1],
            "theirs": ids[2],
            "result": None if result.conflicts else mrec.blob_id(out, head),
        },
        combined=mrec.group_by_rule(repo.config.merge, path, result.combined),
        from_theirs=list(result.from_theirs),
        from_ours=mrec.one_sided_ours(*sides),
        conflicts=list(result.conflicts),
    )
    mrec.append_entry(repo.git, entry)


def _side(index: int) -> Combine:
    return lambda base, ours, theirs: (base, ours, theirs)[index]


_SIDES = ("conflict", "ours", "theirs")


def rule_combiner(rules: tuple[MergeRule, ...], path: str) -> Combiner:
    """Per tensor name, the combine function of the first matching rule (None = conflict).

    Methods and parameters are checked up front, so a bad rule fails before any tensor is read.
    """
    active = [r for r in rules if fnmatch.fnmatchcase(path, r.path)]
    for r in active:
        if r.method not in _SIDES:
            MERGE_METHODS.get(r.method).resolve_params(r.params)

    def combiner(name: str) -> Combine | None:
        for r in active:
            if fnmatch.fnmatchcase(name, r.tensors):
                return _rule_combine(r, name)
        return None

    return combiner


def _rule_combine(rule: MergeRule, name: str) -> Combine | None:
    if rule.method == "conflict":
        return None
    if rule.method in ("ours", "theirs"):
        return _side(1 if rule.method == "ours" else 2)
    method = MERGE_METHODS.get(rule.method)
    return three_way_combine(method, name, seed=rule.seed, **rule.params)


def resolve(repo: Repo, path: str, take: str, pattern: str | None = None) -> list[str]:
    """Resolve conflicted tensors of ``path`` (all, or those matching ``pattern``) by taking a
    side; when none remain, write the file and stage it. Returns the tensors still conflicted."""
    if take not in ("ours", "theirs"):
        raise UserError(f"--take must be ours or theirs, not {take!r}")
    rp = record_path(repo, path)
    if not rp.exists():
        raise UserError(f"{path} has no tensor-level merge conflict", hint="see `potluck status`")
    rec = ConflictRecord.from_json(rp.read_text())
    picked = [n for n in rec.conflicts if pattern is None or fnmatch.fnmatchcase(n, pattern)]
    if not picked:
        raise UserError(
            f"no conflicted tensor of {path} matches {pattern!r}",
            hint=f"conflicted: {', '.join(rec.conflicts)}",
        )
    decided = dict.fromkeys(picked, take)
    left = [n for n in rec.conflicts if n not in picked]
    manifest = resolve_manifest(rec.base, rec.ours, rec.theirs, decided, repo.odb)
    _write_worktree(repo, path, manifest)
    if left:
        save_record(repo, ConflictRecord(path, rec.base, manifest, rec.theirs, left, rec.reasons))
        _record_resolution(repo, path, decided, None)
        return left
    repo.git.run("add", "--", path)
    rp.unlink()
    _record_resolution(repo, path, decided, repo.git.rev_parse(f":{path}"))
    return []


def _record_resolution(repo: Repo, path: str, decided: dict[str, str], staged: str | None) -> None:
    """Add ``potluck resolve``'s decisions (and, when finished, the staged blob) to the path's
    merge-record entry."""
    entry = mrec.latest_entry(repo.git, path)
    if entry is None:
        return
    entry.resolved.update(decided)
    entry.blobs["result"] = staged
    mrec.append_entry(repo.git, entry)


def _write_worktree(repo: Repo, path: str, manifest: Manifest) -> None:
    """Materialise a manifest into the work tree atomically."""
    with atomic_writer(repo.root / path) as f:
        write_file(manifest, repo.odb, f, path=path)

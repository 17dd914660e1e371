"""``potluck track`` next to git-lfs, and moving files from git-lfs to potluck (``--migrate``).

A clone of a Hugging Face repository routes ``*.safetensors`` through git-lfs
(``*.safetensors filter=lfs diff=lfs merge=lfs -text``) and its index holds LFS pointers.
Appending potluck's line for the same pattern would silently shadow git-lfs' line while the
index still holds pointers, so ``track`` refuses and names ``--migrate``, which:

1. rewrites the pattern's ``filter=lfs`` line into potluck's, in place;
2. re-adds every index entry that was an LFS pointer and is now routed through potluck
   (``git add --renormalize``: the smudged work-tree file is cleaned by potluck's filter);
3. stages ``.gitattributes``. The user commits.

Older commits keep their pointers and their ``.gitattributes``, so git-lfs still checks them
out; nothing is rewritten. Refused, with nothing changed: potluck's filter not configured, a
re-added file with local changes, or a work-tree file that is still a pointer (never pulled).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from potluck.errors import PotluckError, UserError
from potluck.git import attributes
from potluck.git.plumbing import Git

POINTER_PREFIX = b"version https://git-lfs.github.com/spec/v1"
#: git-lfs' own bound: a pointer file is smaller than this.
MAX_POINTER_BYTES = 1024
_LITERAL = {"GIT_LITERAL_PATHSPECS": "1"}


def is_pointer(data: bytes) -> bool:
    """True when ``data`` is a git-lfs pointer file."""
    return len(data) < MAX_POINTER_BYTES and data.startswith(POINTER_PREFIX)


@dataclass
class Tracked:
    """What ``track`` changed."""

    added: list[str] = field(default_factory=list)  # patterns given a new potluck line
    migrated: list[str] = field(default_factory=list)  # patterns whose lfs line was rewritten
    readded: list[str] = field(default_factory=list)  # files re-added (were LFS pointers)


def track(git: Git, patterns: Sequence[str], migrate: bool = False) -> Tracked:
    """Route ``patterns`` through potluck; with ``migrate``, take them over from git-lfs.

    ``UserError`` (nothing written) when a pattern has a ``filter=lfs`` line and ``migrate``
    is not set.
    """
    for pattern in patterns:
        attributes.quote_pattern(pattern)  # every pattern is checked before anything is written
    root = git.toplevel()
    lfs_tracked = set(attributes.tracked_patterns(root, "lfs"))
    from_lfs = [p for p in dict.fromkeys(patterns) if p in lfs_tracked]
    if from_lfs and not migrate:
        raise UserError(
            f"{', '.join(from_lfs)} {'is' if len(from_lfs) == 1 else 'are'} tracked by git-lfs "
            "(a filter=lfs line in .gitattributes); a potluck line would shadow it while the "
            "index still holds LFS pointers",
            hint="`potluck track --migrate PATTERN…` rewrites the line to potluck's filter and "
            "re-adds the files (then `git commit`); see docs/cli.md, 'Moving from git-lfs'",
            patterns=from_lfs,
        )
    if not from_lfs:
        return Tracked(added=attributes.add_patterns(root, list(patterns)))
    return _migrate(git, root, list(patterns), from_lfs)


def _migrate(git: Git, root: Path, patterns: list[str], from_lfs: list[str]) -> Tracked:
    if not git.config_get("filter.potluck.process"):
        raise UserError(
            "potluck's filter is not configured in this repository",
            hint="run `potluck init`, then this command again",
        )
    pointers = lfs_pointer_paths(git)
    _refuse_local_changes(git, pointers)
    gitattributes = root / attributes.FILENAME
    before = gitattributes.read_bytes()
    result = Tracked(migrated=attributes.rewrite_filter(root, from_lfs, "lfs"))
    try:
        result.added = attributes.add_patterns(root, [p for p in patterns if p not in from_lfs])
        filters = git.check_attr_many("filter", pointers)
        result.readded = [p for p in pointers if filters.get(p) == "potluck"]
        _refuse_unfetched(root, result.readded)
        if result.readded:
            paths = b"".join(p.encode("utf-8", "surrogateescape") + b"\0" for p in result.readded)
            git.run(
                *("add", "--renormalize", "--pathspec-from-file=-", "--pathspec-file-nul"),
                input=paths,
                env=_LITERAL,
            )
    except PotluckError:
        gitattributes.write_bytes(before)
        raise
    git.run("add", "--", attributes.FILENAME, env=_LITERAL)
    return result


def lfs_pointer_paths(git: Git) -> list[str]:
    """Index entries (stage 0) whose blob is a git-lfs pointer."""
    entries = [(path, oid) for path, oid, stage in git.index_entries() if stage == 0]
    sizes = git.object_sizes(sorted({oid for _, oid in entries}))
    small = [(p, o) for p, o in entries if sizes.get(o, MAX_POINTER_BYTES) < MAX_POINTER_BYTES]
    found: list[str] = []
    with git.batch() as batch:
        for path, oid in small:
            data = batch.get(oid)
            if data is not None and is_pointer(data):
                found.append(path)
    return found


def _refuse_local_changes(git: Git, paths: list[str]) -> None:
    """``UserError`` when a file to re-add differs from its index entry (git-lfs compares)."""
    if not paths:
        return
    out = git.run("diff", "--name-only", "-z", "--", *paths, env=_LITERAL)
    changed = [p.decode("utf-8", "surrogateescape") for p in out.split(b"\0") if p]
    if changed:
        raise UserError(
            f"{', '.join(changed)} {'has' if len(changed) == 1 else 'have'} changes not staged",
            hint="commit or stash them first (`git stash`), then run this command again",
            paths=changed,
        )


def _refuse_unfetched(root: Path, paths: list[str]) -> None:
    """``UserError`` when a file to re-add is still a pointer in the work tree."""
    unfetched = []
    for path in paths:
        with (root / path).open("rb") as f:
            if is_pointer(f.read(MAX_POINTER_BYTES)):
                unfetched.append(path)
    if unfetched:
        include = ",".join(unfetched)
        raise UserError(
            f"{', '.join(unfetched)}: only the git-lfs pointer is here (the data was never "
            "downloaded)",
            hint=f"`git lfs pull --include='{include}'` downloads it; then run this again",
            paths=unfetched,
        )

"""Which tensors a partial clone fetches: the selection kept in git config
(``potluck.fetchInclude`` / ``potluck.fetchExclude``, as ``git sparse-checkout set`` keeps its
patterns) and the hint that names the exact command fetching what a file left as a manifest lacks.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from potluck.git.plumbing import Git

FETCH_INCLUDE = "potluck.fetchInclude"
FETCH_EXCLUDE = "potluck.fetchExclude"


@dataclass(frozen=True)
class Selection:
    """Which tensors to fetch: globs matched against the tensor name or the file path."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def accepts(self, path: str, tensor: str) -> bool:
        """True when (path, tensor) is included and not excluded."""

        def hit(patterns: tuple[str, ...]) -> bool:
            return any(
                fnmatch.fnmatchcase(tensor, p) or fnmatch.fnmatchcase(path, p) for p in patterns
            )

        return (not self.include or hit(self.include)) and not hit(self.exclude)


def configured_selection(git: Git) -> Selection:
    """The default selection from ``potluck.fetchInclude`` / ``potluck.fetchExclude``
    (comma-separated globs), as set by ``potluck clone --include/--exclude``."""

    def globs(key: str) -> tuple[str, ...]:
        value = git.config_get(key) or ""
        return tuple(p.strip() for p in value.split(",") if p.strip())

    return Selection(globs(FETCH_INCLUDE), globs(FETCH_EXCLUDE))


def save_selection(git: Git, selection: Selection) -> Selection:
    """Keep ``selection`` for later checkouts, fetches and pulls (``potluck.fetchInclude`` /
    ``potluck.fetchExclude``), as ``git sparse-checkout set`` does; an include of ``*``
    (everything) clears the include list. Returns what is kept."""
    include = () if "*" in selection.include else selection.include
    for key, globs in ((FETCH_INCLUDE, include), (FETCH_EXCLUDE, selection.exclude)):
        if globs:
            git.config_set(key, ",".join(globs))
        else:
            git.config_unset(key)
    return Selection(include, selection.exclude)


def pull_hint(git: Git) -> str:
    """The exact command that fetches and checks out what a file left as a manifest lacks."""
    selection = configured_selection(git)
    if selection.include or selection.exclude:
        kept = ", ".join(
            f"{key}={','.join(globs)}"
            for key, globs in (
                (FETCH_INCLUDE, selection.include),
                (FETCH_EXCLUDE, selection.exclude),
            )
            if globs
        )
        return (
            f"`potluck pull --include '*'` fetches every tensor and checks the files out (the "
            f"selection {kept} leaves the others out; that command clears it)"
        )
    return "`potluck pull` fetches them and checks the file out"

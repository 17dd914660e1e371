"""Install potluck's filter, diff and merge drivers and hook lines into a repository.

Everything is repository-local and idempotent: running ``install`` twice changes nothing the
second time, and hook files written by others (git-lfs, pre-commit) are appended to, never
overwritten.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from potluck.git.plumbing import Git

SECTIONS = ("filter.potluck", "diff.potluck", "merge.potluck")
#: The merge driver's record, under ``<git dir>/potluck/`` (``potluck.git.merge_record``).
MERGE_RECORD = "merge-record.jsonl"


def driver_config(command: str = "git-potluck") -> dict[str, str]:
    """The config keys and values ``install`` sets; ``command`` is inserted verbatim (shell).
    Re-running ``install`` on a repository set up by an older potluck adds what is new.

    Every driver that gets paths from git has ``--`` before them: a file named ``-x.pt`` is
    a path, never an option.
    """
    return {
        "filter.potluck.process": f"{command} filter-process",
        "filter.potluck.clean": f"{command} clean -- %f",
        "filter.potluck.smudge": f"{command} smudge -- %f",
        "filter.potluck.required": "true",
        "diff.potluck.command": f"{command} diff-driver --",
        "diff.potluck.textconv": f"{command} textconv --",
        # `git log -p` keeps each blob's textconv output in refs/notes/textconv/potluck
        # instead of starting one potluck process per blob every time
        "diff.potluck.cachetextconv": "true",
        "merge.potluck.name": "potluck tensor-level merge",
        "merge.potluck.driver": f"{command} merge-driver -- %O %A %B %P",
    }


def install(git: Git, command: str = "git-potluck") -> list[str]:
    """Set the driver config in the repository; return the keys whose value changed."""
    changed: list[str] = []
    for key, value in driver_config(command).items():
        if git.config_get(key, local=True) != value:
            git.config_set(key, value)
            changed.append(key)
    return changed


def uninstall(git: Git) -> list[str]:
    """Remove potluck's driver sections from the repository config; return the keys removed."""
    removed: list[str] = []
    for section in SECTIONS:
        keys = git.config_local_keys(section)
        if keys:
            git.run("config", "--local", "--remove-section", section)
            removed += keys
    return removed


def pre_push_line(command: str = "git-potluck") -> str:
    """The pre-push hook line: upload objects before git sends the commits; its failure stops
    the push even when other tools' lines follow."""
    return f'{command} pre-push "$@" || exit $?'


def prepare_commit_msg_line(command: str = "git-potluck") -> str:
    """The prepare-commit-msg hook line: write the ``Potluck-Merge:`` trailers of a merge into
    its commit message; a failure stops the commit. potluck only starts when the merge driver
    left a record, so ordinary commits pay one ``git rev-parse``."""
    record = f'"$(git rev-parse --git-dir)/potluck/{MERGE_RECORD}"'
    return f'if [ -f {record} ]; then {command} prepare-commit-msg "$@" || exit $?; fi'


#: Hooks ``potluck init`` installs, with their line builders.
HOOKS = {"pre-push": pre_push_line, "prepare-commit-msg": prepare_commit_msg_line}


def hook_path(git: Git, name: str) -> Path:
    """Where git looks for hook ``name`` (honours ``core.hooksPath`` and worktrees)."""
    configured = git.config_get("core.hooksPath")
    if not configured:
        return git.git_path("hooks") / name
    hooks = Path(configured).expanduser()
    if not hooks.is_absolute():  # hooks run at the top of the work tree
        hooks = git.toplevel() / hooks
    return hooks / name


def _make_executable(path: Path) -> None:
    mode = path.stat().st_mode
    path.chmod(mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def install_hook(git: Git, name: str, line: str) -> bool:
    """Make hook ``name`` run ``line``; True when the hook file changed.

    A missing hook is created as ``#!/bin/sh`` plus ``line`` (executable). An existing hook
    that already has the line is left alone; otherwise the line is appended, so both run.
    """
    path = hook_path(git, name)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"#!/bin/sh\n{line}\n", encoding="utf-8")
        _make_executable(path)
        return True
    text = path.read_bytes().decode("utf-8", "surrogateescape")
    if any(existing.strip() == line.strip() for existing in text.splitlines()):
        return False
    if text and not text.endswith("\n"):
        text += "\n"
    text += line + "\n"
    mode = path.stat().st_mode
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    os.chmod(path, mode)
    return True


def uninstall_hook(git: Git, name: str, line: str) -> bool:
    """Remove ``line`` from hook ``name``; delete the file if only a shebang is left."""
    path = hook_path(git, name)
    if not path.exists():
        return False
    lines = path.read_bytes().decode("utf-8", "surrogateescape").splitlines(keepends=True)
    kept = [ln for ln in lines if ln.strip() != line.strip()]
    if len(kept) == len(lines):
        return False
    if all(not ln.strip() or ln.startswith("#!") for ln in kept):
        path.unlink()
    else:
        path.write_bytes("".join(kept).encode("utf-8", "surrogateescape"))
    return True

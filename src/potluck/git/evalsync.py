"""Evaluation records travel with plain ``git push`` / ``fetch`` / ``pull`` / ``clone``.

Records are append-only, so two copies of ``refs/potluck/evals`` are combined by union
(``evalstore.merge_records_ref``), never by overwriting one with the other:

* **fetch / pull / clone.** Each remote gets the fetch refspec
  ``+refs/potluck/evals*:refs/potluck/remotes/<remote>/evals*`` (``potluck init``, ``potluck
  clone``, and the first ``git push`` through the hook). It only moves a remote-tracking copy,
  never the local ref; the glob makes a remote without records no error. potluck unions those
  copies into the local ref whenever it reads or writes records (``absorb``).
* **push.** The pre-push hook pushes the local ref too (``push_for_hook``): a rejected
  non-fast-forward is fetched, unioned and retried. The inner push skips hooks (no recursion)
  and a push that names ``refs/potluck/evals`` itself is left alone. A remote that refuses the
  ref does not stop the user's push: the hook warns on stderr.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterable

from potluck.errors import UserError
from potluck.git.evalstore import (
    EVALS_REF,
    absorb,
    merge_records_ref,
    pull_records,
    tracking_ref,
)
from potluck.git.plumbing import Git
from potluck.git.repo import Repo

#: Set for the inner push, and by anyone who wants ``git push`` to leave records alone.
SKIP_ENV = "POTLUCK_NO_EVAL_SYNC"
#: How often a push rejected by a concurrent writer is merged and retried.
ATTEMPTS = 4
_QUIET = {"GIT_TERMINAL_PROMPT": "0", SKIP_ENV: "1"}


def fetch_refspec(remote: str) -> str:
    """The fetch refspec that brings ``remote``'s records into its remote-tracking ref."""
    return f"+{EVALS_REF}*:{tracking_ref(remote)}*"


def _remotes(git: Git) -> list[str]:
    return git.run("remote").decode().split()


def configure_remote(git: Git, remote: str) -> bool:
    """Add the records' fetch refspec to ``remote`` (once); True when the config changed."""
    key = f"remote.{remote}.fetch"
    proc = git.run_proc("config", "--local", "--get-all", key)
    if fetch_refspec(remote) in proc.stdout.decode().splitlines():
        return False
    git.run("config", "--local", "--add", key, fetch_refspec(remote))
    return True


def configure_remotes(repo: Repo, *, fetch: bool = True) -> list[str]:
    """Configure every remote (``configure_remote``); with ``fetch``, a newly configured remote's
    records are fetched at once (quietly; an unreachable remote is tried again by the next
    ``git fetch``). Returns the config keys changed."""
    changed = []
    for remote in _remotes(repo.git):
        if configure_remote(repo.git, remote):
            changed.append(f"remote.{remote}.fetch")
            if fetch:
                fetch_records(repo.git, remote)
    return changed


def fetch_records(git: Git, remote: str) -> bool:
    """Fetch ``remote``'s records into its remote-tracking ref; False when that failed."""
    spec = f"+{EVALS_REF}*:{tracking_ref(remote)}*"
    return git.run_proc("fetch", "-q", "--no-tags", remote, spec, env=_QUIET).returncode == 0


def _pushes_records(lines: Iterable[str]) -> bool:
    """Whether a pre-push hook's stdin names ``refs/potluck/evals`` as a remote ref."""
    return any(len(f) == 4 and f[2] == EVALS_REF for f in (ln.split() for ln in lines))


def push_for_hook(repo: Repo, remote: str, lines: Iterable[str]) -> str | None:
    """Push the local records along with a ``git push`` to ``remote`` (called by the pre-push
    hook with its stdin ``lines``). None when there was nothing to do; raises ``UserError`` when
    the remote refused them (the caller warns and lets the user's push go on)."""
    git = repo.git
    if os.environ.get(SKIP_ENV) or _pushes_records(lines):
        return None
    if remote in _remotes(git):
        configure_remote(git, remote)
    absorb(repo)
    local = git.rev_parse(EVALS_REF)
    if local is None:
        return None
    known = git.rev_parse(tracking_ref(remote))  # a URL's too: the last push there set it
    if known is not None and git.is_ancestor(local, known):
        return None  # the remote had them at the last fetch, and records are never removed
    return push_records_merging(repo, remote)


def push_records_merging(repo: Repo, remote: str) -> str:
    """Push ``refs/potluck/evals`` to ``remote``; when a concurrent writer got there first,
    fetch their records, union them with ours and try again."""
    git = repo.git
    for _ in range(ATTEMPTS):
        args = ("push", "--no-verify", "--porcelain", remote, f"{EVALS_REF}:{EVALS_REF}")
        proc = git.run_proc(*args, env=_QUIET)
        if proc.returncode == 0:
            git.run("update-ref", tracking_ref(remote), EVALS_REF)
            return f"pushed {EVALS_REF} to {remote}"
        if not _rejected_as_stale(proc.stdout):
            raise UserError(
                f"{remote} did not take the evaluation records: {_reason(proc)}",
                hint=f"the push itself went on; set {SKIP_ENV}=1 to stop pushing records there",
                remote=remote,
            )
        if not fetch_records(git, remote):
            raise UserError(f"cannot fetch the evaluation records of {remote}", remote=remote)
        merge_records_ref(repo, tracking_ref(remote))
    raise UserError(
        f"{remote}'s evaluation records kept moving: {ATTEMPTS} pushes were rejected",
        hint="push again (`potluck eval push`)",
        remote=remote,
    )


def _rejected_as_stale(porcelain: bytes) -> bool:
    """Whether git's ``--porcelain`` report says our ref was behind (fetch first)."""
    for line in porcelain.decode(errors="replace").splitlines():
        fields = line.split("\t")
        if len(fields) >= 3 and fields[0] == "!" and fields[1].endswith(f":{EVALS_REF}"):
            return "[rejected]" in fields[2]
    return False


def _reason(proc: subprocess.CompletedProcess[bytes]) -> str:
    """Our ref's status from git's ``--porcelain`` report, then what the remote said."""
    status = [f[2] for f in (ln.split("\t") for ln in proc.stdout.decode(errors="replace")
              .splitlines()) if len(f) >= 3 and f[1].endswith(f":{EVALS_REF}")]  # fmt: skip
    said = [ln[len("remote:"):].strip() for ln in proc.stderr.decode(errors="replace")
            .splitlines() if ln.startswith("remote:") and ln[7:].strip()]  # fmt: skip
    errors = [ln.strip() for ln in proc.stderr.decode(errors="replace").splitlines()
              if ln.startswith(("fatal:", "error:"))]  # fmt: skip
    parts = status[:1] + said[-2:] + ([] if status or said else errors[-1:])
    return ": ".join(parts) or f"git push exited {proc.returncode}"


def push_records(repo: Repo, remote: str) -> str:
    """``potluck eval push``: merge the remote's records if it has ones we lack, then push ours
    (merging and retrying when a concurrent writer got there first)."""
    if repo.git.rev_parse(EVALS_REF) is None:
        absorb(repo)
        if repo.git.rev_parse(EVALS_REF) is None:
            raise UserError("no evaluation records to push", hint="run `potluck eval run` first")
    pull_records(repo, remote, missing_ok=True)
    return push_records_merging(repo, remote)

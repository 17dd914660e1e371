"""Disk space for checkouts: refuse a fetch that cannot fit before anything is written, and
turn a full disk met anyway into an error that says how to resume (``potluck pull``)."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager

from potluck.errors import PotluckError
from potluck.git.repo import Repo

#: room kept free beyond what a checkout needs (git's index, logs, small files)
SPACE_MARGIN = 1 << 20
RESUME_HINT = (
    "free some space (or point the clone somewhere roomier), then run `potluck pull` in {root}: "
    "it fetches what is missing (interrupted downloads resume) and checks out every file left "
    "as a manifest"
)


def check_space(repo: Repo, path: str, fetch_bytes: int, file_bytes: int) -> None:
    """Refuse, before anything is written, a checkout of ``path`` that cannot fit: the
    downloads (kept while smudge copies them out) and their copy in the store need
    ``2 * fetch_bytes`` under ``.git/potluck``, the file itself ``file_bytes`` in the work tree.
    """
    store_dir = repo.tmp_dir
    store_dir.mkdir(parents=True, exist_ok=True)
    needs = {store_dir: 2 * fetch_bytes + SPACE_MARGIN}
    if os.stat(store_dir).st_dev == os.stat(repo.root).st_dev:
        needs[store_dir] += file_bytes
    elif file_bytes:
        needs[repo.root] = file_bytes + SPACE_MARGIN
    for where, need in needs.items():
        free = shutil.disk_usage(where).free
        if free < need:
            raise PotluckError(
                f"not enough disk space to check out {path}: it needs about {need >> 20} MiB "
                f"on the file system of {where}, {free >> 20} MiB are free",
                hint=RESUME_HINT.format(root=repo.root),
                path=path,
                free=free,
                need=need,
            )


@contextmanager
def disk_errors(repo: Repo, what: str) -> Iterator[None]:
    """Turn a full disk (or quota) met while doing ``what`` ("fetching …") into a
    ``PotluckError`` that says how to resume."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        raise PotluckError(
            f"no space left while {what}: {e.strerror} ({e.filename or repo.root})",
            hint=RESUME_HINT.format(root=repo.root),
            errno=e.errno,
        ) from None

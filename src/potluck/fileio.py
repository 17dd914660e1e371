"""Atomic writes (stdlib only): a file or directory appears complete or not at all.

What they publish is an ordinary file or directory: its mode is what ``open``/``mkdir`` would
have given under the process's umask (0644 / 0755 under umask 022), not the private 0600 / 0700
of the temporary file or directory it was staged in.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from potluck.errors import UserError

__all__ = ["atomic_dir", "atomic_writer", "current_umask", "file_sha256", "publish_mode"]


def current_umask() -> int:
    """The process's umask, read without changing it where the OS allows (Linux ``/proc``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not atomic, but brief)
    os.umask(mask)
    return mask


def publish_mode(path: str | os.PathLike[str]) -> None:
    """Give a staged file 0o666 and a staged directory 0o777, less the umask (what ``open`` and
    ``mkdir`` give a new one), so a published output can be shared like any other file."""
    p = Path(path)
    full = 0o777 if p.is_dir() else 0o666
    os.chmod(p, full & ~current_umask())


def check_output_dir(path: str | os.PathLike[str]) -> None:
    """A ``UserError`` unless the folder that is to hold the file ``path`` exists (and is a
    folder): checked before work whose result goes there, not after it."""
    parent = Path(path).parent
    if not parent.is_dir():
        what = "is not a folder" if parent.exists() else "does not exist"
        raise UserError(
            f"cannot write {path}: {parent} {what}",
            hint="create the folder first, or pick another output path",
            path=str(path),
        )


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """A temp file next to ``path``, moved over it with ``os.replace`` only on success; a
    missing or unwritable folder is a ``UserError`` naming it (``check_output_dir``)."""
    target = Path(path)
    check_output_dir(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~current_umask())  # mkstemp makes it private
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A staging directory beside ``path`` that becomes ``path`` only on success.

    ``path`` must not exist or be an empty directory (it is then replaced); on any error the
    staging directory is removed, so a reader sees the whole directory or nothing.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        publish_mode(tmp)  # mkdtemp makes it private; the result is an ordinary directory
        yield tmp
        if target.is_dir():
            target.rmdir()  # empty, else this fails and nothing is replaced
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

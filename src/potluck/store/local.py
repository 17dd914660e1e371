"""Loose object files on the local disk, fanned out by the first two hex digits of the id.

Layout: ``root/ab/cdef…`` holds object ``abcdef…``; ``root/tmp/`` holds writes in progress;
``root/quarantine/`` holds objects moved aside as damaged (``<oid>.<ns>`` plus a ``.why`` text).
A write goes to a fresh file in ``tmp/``, is fsynced and then renamed into place with
``os.replace``, so a process killed mid-write never leaves a partial object visible; its
leftover in ``tmp/`` is removed later by ``clean_tmp``. An object's mtime is when it was
written or last re-used (``freshen``): gc's grace period reads it.
"""

from __future__ import annotations

import os
import stat
import tempfile
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import BinaryIO

from potluck.store.base import Quarantined, missing, validate_oid

_HEX = frozenset("0123456789abcdef")
TMP_DIR = "tmp"
QUARANTINE_DIR = "quarantine"


def _fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class LocalStore:
    """``ObjectStore`` of loose files under ``root`` (created on first write)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def path(self, oid: str) -> Path:
        """Where ``oid`` lives (whether or not it exists)."""
        validate_oid(oid)
        return self.root / oid[:2] / oid[2:]

    def has(self, oid: str) -> bool:
        """Whether ``oid`` is stored."""
        return self.path(oid).is_file()

    def open(self, oid: str) -> BinaryIO:
        """Open the object file for reading."""
        try:
            return open(self.path(oid), "rb")
        except FileNotFoundError:
            raise missing(oid) from None

    def stored_size(self, oid: str) -> int:
        """Size of the object file in bytes."""
        try:
            return self.path(oid).stat().st_size
        except FileNotFoundError:
            raise missing(oid) from None

    def writer(self, oid: str, durable: bool = True) -> AbstractContextManager[BinaryIO]:
        """Write ``oid`` through a temporary file, renamed into place when the block succeeds
        (fsynced first unless ``durable`` is False)."""
        return self._writer(oid, self.path(oid), durable)

    @contextmanager
    def _writer(self, oid: str, dest: Path, durable: bool = True) -> Iterator[BinaryIO]:
        if dest.exists():
            with open(os.devnull, "wb") as sink:  # first write wins; discard this one
                yield sink
            return
        tmp_dir = self.root / TMP_DIR
        tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f"{oid[:16]}-", suffix=".tmp", dir=tmp_dir)
        tmp = Path(name)
        try:
            with os.fdopen(fd, "wb") as f:
                yield f
                f.flush()
                if durable:
                    os.fsync(f.fileno())
            self._publish(tmp, dest, durable)
        finally:
            tmp.unlink(missing_ok=True)

    def _publish(self, tmp: Path, dest: Path, durable: bool = True) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            return
        os.chmod(tmp, stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
        os.replace(tmp, dest)
        if durable:
            _fsync_dir(dest.parent)

    def delete(self, oid: str) -> bool:
        """Remove ``oid``; return whether it was there."""
        path = self.path(oid)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        except PermissionError:  # Windows refuses to delete read-only files
            os.chmod(path, stat.S_IWRITE)
            path.unlink()
        return True

    def iter_oids(self) -> Iterator[str]:
        """Every stored oid; stray files and ``tmp/`` are skipped."""
        if not self.root.is_dir():
            return
        for fan in sorted(self.root.iterdir()):
            if len(fan.name) != 2 or not _HEX.issuperset(fan.name) or not fan.is_dir():
                continue
            for f in sorted(fan.iterdir()):
                oid = fan.name + f.name
                if len(oid) == 64 and _HEX.issuperset(f.name) and f.is_file():
                    yield oid

    def mtime(self, oid: str) -> float:
        """When the object was written or last freshened."""
        try:
            return self.path(oid).stat().st_mtime
        except FileNotFoundError:
            raise missing(oid) from None

    def freshen(self, oid: str) -> bool:
        """Set the object file's times to now; return whether it was there."""
        try:
            os.utime(self.path(oid))
        except FileNotFoundError:
            return False
        except PermissionError:  # not the owner: a shared store; gc runs as its owner
            return True
        return True

    def quarantine(self, oid: str, reason: str) -> str | None:
        """Rename the object file into ``quarantine/`` (atomic; never deleted)."""
        src = self.path(oid)
        qdir = self.root / QUARANTINE_DIR
        qdir.mkdir(parents=True, exist_ok=True)
        dest = qdir / f"{oid}.{time.time_ns()}"
        dest.with_name(dest.name + ".why").write_text(reason + "\n", encoding="utf-8")
        try:
            os.replace(src, dest)
        except FileNotFoundError:
            dest.with_name(dest.name + ".why").unlink(missing_ok=True)
            return None
        _fsync_dir(src.parent)
        return str(dest)

    def quarantined(self) -> list[Quarantined]:
        """Every object in ``quarantine/``, oldest first."""
        qdir = self.root / QUARANTINE_DIR
        if not qdir.is_dir():
            return []
        out = []
        for p in qdir.iterdir():
            oid, _, ns = p.name.partition(".")
            if len(oid) != 64 or not _HEX.issuperset(oid) or not ns.isdigit() or not p.is_file():
                continue
            why = p.with_name(p.name + ".why")
            reason = why.read_text(encoding="utf-8").strip() if why.is_file() else ""
            out.append(Quarantined(oid, str(p), reason, int(ns) / 1e9))
        return sorted(out, key=lambda q: (q.when, q.oid))

    def restore(self, q: Quarantined) -> bool:
        """Move a quarantined file back (unless the id is stored again meanwhile)."""
        dest = self.path(q.oid)
        if dest.exists():
            return False
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(q.location, dest)
        except FileNotFoundError:
            return False
        Path(q.location + ".why").unlink(missing_ok=True)
        _fsync_dir(dest.parent)
        return True

    def clean_tmp(self, older_than_s: float) -> int:
        """Remove leftovers of interrupted writes older than ``older_than_s``; return the count."""
        tmp_dir = self.root / TMP_DIR
        if not tmp_dir.is_dir():
            return 0
        cutoff = time.time() - older_than_s
        removed = 0
        for p in tmp_dir.iterdir():
            try:
                if p.stat().st_mtime <= cutoff:
                    p.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

"""The packs of a ``LocalStore``: which exist, where an object is, and rewriting one without
some objects (gc, quarantine).

Packs appear (another process finished an add) and disappear (another process's gc rewrote
one) at any time. The list is re-read when an object is not found and the ``pack/`` directory
changed since it was last read (or changed so recently that its time cannot tell). A pack
already open stays readable after another process deletes it (POSIX); one that is gone before
it was opened is skipped.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

from potluck.store.pack import SUFFIX, Pack, PackDamaged, PackWriter

log = logging.getLogger("potluck")

#: a directory time this close to when it was read may hide a later change in the same tick
RACY_NS = 2_000_000_000
#: while the time is that close, a plain look re-reads the directory at most this often (a
#: forced one, after a miss where absence matters, always does)
RESCAN_NS = 50_000_000


class PackSet:
    """The packs under ``pack_dir`` (rewrites are built in ``tmp_dir``)."""

    def __init__(self, pack_dir: Path, tmp_dir: Path) -> None:
        self.pack_dir = pack_dir
        self.tmp_dir = tmp_dir
        self.packs: dict[str, Pack] = {}
        self.bad: dict[str, str] = {}  # file name -> why it is not a pack
        self._seen: int | None = None  # the directory's mtime_ns when last read
        self._read_at = 0

    def refresh(self, force: bool = False) -> bool:
        """Re-read the directory when it may have changed; return whether it was read."""
        try:
            mtime = os.stat(self.pack_dir).st_mtime_ns
        except FileNotFoundError:
            mtime = -1
        settled = self._read_at - mtime > RACY_NS or time.time_ns() - self._read_at < RESCAN_NS
        if not force and mtime == self._seen and settled:
            return False
        self._seen, self._read_at = mtime, time.time_ns()
        names = set() if mtime < 0 else {n for n in os.listdir(self.pack_dir) if n.endswith(SUFFIX)}
        for gone in set(self.packs) - names:
            self.packs.pop(gone).close()
        for name in sorted(names - set(self.packs) - set(self.bad)):
            self._open(name)
        return True

    def _open(self, name: str) -> None:
        try:
            pack = Pack.load(self.pack_dir / name)
        except PackDamaged as e:
            self.bad[name] = str(e)
            return
        except OSError:
            return  # removed meanwhile (another gc)
        if pack.problem:
            log.warning("pack %s is damaged (%s): read from its records", name, pack.problem)
        self.packs[name] = pack

    def find(self, digest: bytes, refresh: bool = True) -> tuple[Pack, int, int] | None:
        """The pack holding ``digest`` and where; with ``refresh``, re-reads the directory on a
        miss."""
        for pack in self.packs.values():
            at = pack.find(digest)
            if at is not None:
                return pack, at[0], at[1]
        if refresh and self.refresh(force=True):
            return self.find(digest, refresh=False)
        return None

    def holding(self, digest: bytes) -> list[Pack]:
        """Every pack (known now) that holds ``digest``."""
        return [p for p in self.packs.values() if p.find(digest) is not None]

    def oids(self) -> Iterator[str]:
        """Every packed oid (each once), after re-reading the directory."""
        self.refresh(force=True)
        seen: set[str] = set()
        for pack in list(self.packs.values()):
            for oid, _, _ in pack.entries():
                if oid not in seen:
                    seen.add(oid)
                    yield oid

    def drop(self, pack: Pack, digests: set[bytes], keep_newer_than: float | None) -> set[bytes]:
        """Rewrite ``pack`` without ``digests`` (a new pack with the rest, same mtime; the old
        one deleted); return the ids dropped. Nothing changes when the pack was written or
        freshened after ``keep_newer_than`` (before or during the rewrite): its objects count as
        re-used."""
        try:
            st = os.stat(pack.path)
        except FileNotFoundError:
            return set()  # rewritten by another process meanwhile
        if keep_newer_than is not None and st.st_mtime > keep_newer_than:
            return set()
        entries = list(_raw_entries(pack))
        rest = [(d, off, n) for d, off, n in entries if d not in digests]
        if len(rest) == len(entries):
            return set()
        try:
            new = self._write(pack, rest) if rest else None
        except FileNotFoundError:
            return set()  # removed by another process's gc while we copied
        if new is not None:
            os.utime(new, ns=(st.st_atime_ns, st.st_mtime_ns))
        try:
            unchanged = os.stat(pack.path).st_mtime_ns == st.st_mtime_ns
        except FileNotFoundError:
            unchanged = False
        if not unchanged:  # freshened while we copied: keep it, forget the copy
            if new is not None and new != pack.path:
                new.unlink(missing_ok=True)
            return set()
        self._remove(pack)
        return {d for d, _, _ in entries if d in digests}

    def merge(self, at_least: int) -> int:
        """Copy the objects of every pack into one new pack when there are at least
        ``at_least`` (lookups search every pack), then remove the old ones; return how many
        were merged. The new pack takes the newest time of the old ones (and now, when one
        was refreshed during the merge), so no object's grace period gets shorter."""
        self.refresh(force=True)
        olds = [p for p in self.packs.values() if p.problem is None]
        if len(olds) < max(2, at_least):
            return 0
        times = {p.path.name: os.stat(p.path).st_mtime_ns for p in olds if p.path.exists()}
        olds = [p for p in olds if p.path.name in times]
        writer = PackWriter(self.tmp_dir)
        try:
            for pack in olds:
                for digest, off, n in _raw_entries(pack):
                    if writer.find(digest) is None:
                        writer.add(digest, pack.read(off, n))
            new = writer.finish(self.pack_dir)
        except BaseException:
            writer.discard()
            raise
        if new is None:
            return 0
        newest = max(times.values())
        os.utime(new, ns=(newest, newest))
        for pack in olds:
            try:
                touched = os.stat(pack.path).st_mtime_ns != times[pack.path.name]
            except FileNotFoundError:
                touched = False
            if touched:
                os.utime(new)
            if pack.path != new:
                self._remove(pack)
        return len(olds)

    def rebuild_damaged(self, quarantine_dir: Path) -> list[tuple[str, str, int]]:
        """Rewrite every pack whose index had to be rebuilt from its records into a whole pack
        of the objects it still holds, and move the damaged file (and any file under ``pack/``
        that is not a pack) into ``quarantine_dir`` with a ``.why`` text; return
        (file name, problem, objects kept) for each."""
        self.refresh(force=True)
        out: list[tuple[str, str, int]] = []
        damaged = [(n, p.problem, p) for n, p in self.packs.items() if p.problem is not None]
        for name, problem, pack in damaged:
            self._write(pack, list(_raw_entries(pack)))
            self.packs.pop(name, None)
            pack.close()
            out.append((name, problem, pack.count))
        out += [(name, problem, 0) for name, problem in self.bad.items()]
        for name, problem, _ in out:
            _move_aside(self.pack_dir / name, quarantine_dir, problem)
        self.bad.clear()
        self.refresh(force=True)
        return out

    def _write(self, pack: Pack, rest: list[tuple[bytes, int, int]]) -> Path | None:
        writer = PackWriter(self.tmp_dir)
        try:
            for digest, off, n in rest:
                writer.add(digest, pack.read(off, n))
            return writer.finish(self.pack_dir)
        except BaseException:
            writer.discard()
            raise

    def _remove(self, pack: Pack) -> None:
        name = pack.path.name
        self.packs.pop(name, None)
        pack.close()
        pack.path.unlink(missing_ok=True)
        self.refresh(force=True)


def _raw_entries(pack: Pack) -> Iterator[tuple[bytes, int, int]]:
    for oid, off, n in pack.entries():
        yield bytes.fromhex(oid), off, n


def _move_aside(path: Path, quarantine_dir: Path, why: str) -> None:
    quarantine_dir.mkdir(parents=True, exist_ok=True)
    dest = quarantine_dir / f"{path.name}.{time.time_ns()}"
    dest.with_name(dest.name + ".why").write_text(why + "\n", encoding="utf-8")
    try:
        os.replace(path, dest)
    except FileNotFoundError:
        dest.with_name(dest.name + ".why").unlink(missing_ok=True)

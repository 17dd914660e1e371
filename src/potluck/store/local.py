"""Objects on the local disk: loose files fanned out by the first two hex digits of the id,
and pack files of many small objects.

Layout: ``root/ab/cdef…`` holds object ``abcdef…``; ``root/pack/pack-<id>.pack`` holds small
objects written together (``store.pack``); ``root/tmp/`` holds writes in progress;
``root/quarantine/`` holds objects moved aside as damaged (``<oid>.<ns>`` plus a ``.why`` text).
A write goes to a fresh file in ``tmp/``, is fsynced and then renamed into place with
``os.replace``, so a process killed mid-write never leaves a partial object visible; its
leftover in ``tmp/`` is removed later by ``clean_tmp``. Inside ``batch()``, objects written with
``durable=False`` go into one pack instead, fsynced and renamed once when the batch ends. An
object's mtime is when it was written or last re-used (``freshen``; for a packed object, its
pack's): gc's grace period reads it.
"""

from __future__ import annotations

import io
import os
import stat
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import BinaryIO

from potluck.store.base import Quarantined, missing, raw_oids, validate_oid
from potluck.store.pack import Pack, PackWriter
from potluck.store.packs import PackSet

_HEX = frozenset("0123456789abcdef")
TMP_DIR = "tmp"
QUARANTINE_DIR = "quarantine"
PACK_DIR = "pack"
#: gc merges the packs into one when there are this many (every lookup searches every pack)
PACK_MERGE_AT = 16
#: objects larger than this are written loose even inside a batch (bounds a writer's buffer)
PACK_OBJECT_MAX = 8 << 20
#: a batch of fewer objects than this is written as loose files (as git's unpackLimit): a pack
#: pays off for many objects; a few loose files are simpler to look at
PACK_MIN = 100


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


def _columns(
    packed: list[tuple[str, bytes, bytes]], skip: set[str]
) -> tuple[list[str], list[bytes]]:
    """The ids and raw digests of the ``packed`` objects not in ``skip``."""
    rows = [(oid, digest) for oid, digest, _ in packed if oid not in skip]
    return [oid for oid, _ in rows], [digest for _, digest in rows]


class _PackedWrite:
    """The writer of one object into the store's batch (buffered: it is small)."""

    def __init__(self, store: LocalStore, oid: str) -> None:
        self.store, self.oid, self.buf = store, oid, io.BytesIO()

    def __enter__(self) -> BinaryIO:
        return self.buf

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        batch, data = self.store._batch, self.buf.getbuffer()
        if kind is not None:
            return
        if batch is None:
            raise RuntimeError("a pack writer outlived its batch")
        if len(data) > PACK_OBJECT_MAX:
            with self.store.writer(self.oid, durable=True) as f:
                f.write(data)
            return
        batch.add(bytes.fromhex(self.oid), data)


class LocalStore:
    """``ObjectStore`` of loose files and packs under ``root`` (created on first write)."""

    def __init__(self, root: Path | str, pack_min: int = PACK_MIN) -> None:
        self.root = Path(root)
        self.pack_min = pack_min
        self._base = str(self.root)
        self.packs = PackSet(self.root / PACK_DIR, self.root / TMP_DIR)
        self._batch: PackWriter | None = None

    def path(self, oid: str) -> Path:
        """Where ``oid`` lives as a loose file (whether or not it exists)."""
        validate_oid(oid)
        return self.root / oid[:2] / oid[2:]

    def _loose(self, oid: str) -> str:
        validate_oid(oid)
        return f"{self._base}{os.sep}{oid[:2]}{os.sep}{oid[2:]}"

    def _packed(self, oid: str, refresh: bool = True) -> tuple[Pack | PackWriter, int, int] | None:
        """Where a packed (or, in a batch, just written) object is."""
        return self._where(bytes.fromhex(validate_oid(oid)), refresh)

    def _where(self, digest: bytes, refresh: bool) -> tuple[Pack | PackWriter, int, int] | None:
        if self._batch is not None:
            at = self._batch.find(digest)
            if at is not None:
                return self._batch, at[0], at[1]
        return self.packs.find(digest, refresh)

    def has(self, oid: str) -> bool:
        """Whether ``oid`` is stored. Inside a batch, packs published by other processes since
        it began may be missed (the object is then written again: harmless)."""
        loose = self._loose(oid)  # validates ``oid``
        if self._batch is None:
            self.packs.refresh()  # one stat: notices packs other processes added or removed
        return self._where(bytes.fromhex(oid), False) is not None or os.path.isfile(loose)

    def has_many(self, oids: Iterable[str]) -> set[str]:
        """The ``oids`` that are stored: one look at the packs, then one directory listing per
        fan-out directory the rest fall in (not a stat per object)."""
        if self._batch is None:
            self.packs.refresh()
        valid, digests = raw_oids(oids)
        packed = self._packed_among(valid, digests)
        return packed | self._loose_among(o for o in valid if o not in packed)

    def _packed_among(self, oids: list[str], digests: list[bytes], batch: bool = True) -> set[str]:
        """The ``oids`` (with their raw ``digests``) in a known pack or (with ``batch``) in the
        batch being written."""
        finds = [pack.find for pack in self.packs.packs.values()]
        if batch and self._batch is not None and len(self._batch):
            finds.append(self._batch.find)
        found: set[str] = set()
        for find in finds:
            found.update(o for o, d in zip(oids, digests, strict=True) if find(d) is not None)
        return found

    def _loose_among(self, oids: Iterable[str]) -> set[str]:
        """The ``oids`` (valid ones) stored as loose files, by listing the fan-out dirs that
        exist and then those of them the ``oids`` fall in."""
        try:
            fans = set(os.listdir(self._base))
        except (FileNotFoundError, NotADirectoryError):
            return set()
        by_fan: dict[str, list[str]] = {}
        for oid in oids:
            if (fan := oid[:2]) in fans:
                by_fan.setdefault(fan, []).append(oid)
        found: set[str] = set()
        for fan, members in by_fan.items():
            try:
                names = set(os.listdir(os.path.join(self._base, fan)))
            except (FileNotFoundError, NotADirectoryError):
                continue
            found.update(oid for oid in members if oid[2:] in names)
        return found

    def write_many(self, objects: Iterable[tuple[str, bytes]], durable: bool = True) -> None:
        """Write each object; inside ``batch()`` with ``durable`` False, small ones go straight
        into the batch's pack (an id stored already, or earlier in ``objects``, is skipped)."""
        items = list(objects)
        oids, digests = raw_oids(oid for oid, _ in items)
        batch = self._batch
        if batch is None or durable:
            for oid, data in items:
                with self.writer(oid, durable) as f:
                    f.write(data)
            return
        packed: list[tuple[str, bytes, bytes]] = []
        for oid, digest, (_, data) in zip(oids, digests, items, strict=True):
            if len(data) > PACK_OBJECT_MAX:
                with self.writer(oid, durable) as f:
                    f.write(data)
            else:
                packed.append((oid, digest, data))
        if packed:
            stored = self._loose_among(oid for oid, _, _ in packed)
            if self.packs.packs:
                stored |= self._packed_among(*_columns(packed, stored), batch=False)
            batch.add_many((digest, data) for oid, digest, data in packed if oid not in stored)

    def open(self, oid: str) -> BinaryIO:
        """Open the object for reading (a packed object is read into memory: it is small).
        A packed copy is preferred to a loose one (every method looks in that order)."""
        where = self._packed(oid, refresh=False)
        if where is None:
            try:
                return open(self._loose(oid), "rb")
            except FileNotFoundError:
                where = self._packed(oid)
        if where is None:
            raise missing(oid)
        return io.BytesIO(self._read_packed(oid, where))

    def _read_packed(self, oid: str, where: tuple[Pack | PackWriter, int, int]) -> bytes:
        """The bytes of a packed object; when its pack was removed meanwhile (another process's
        gc rewrote it), from wherever the object is now."""
        src, offset, length = where
        try:
            return src.read(offset, length)
        except FileNotFoundError:
            self.packs.refresh(force=True)
        again = self._packed(oid, refresh=False)
        if again is None:
            if os.path.isfile(self._loose(oid)):
                with open(self._loose(oid), "rb") as f:
                    return f.read()
            raise missing(oid) from None
        return again[0].read(again[1], again[2])

    def stored_size(self, oid: str) -> int:
        """Size of the object in bytes."""
        where = self._packed(oid, refresh=False)
        if where is None:
            try:
                return os.stat(self._loose(oid)).st_size
            except FileNotFoundError:
                where = self._packed(oid)
        if where is None:
            raise missing(oid)
        return where[2]

    def writer(self, oid: str, durable: bool = True) -> AbstractContextManager[BinaryIO]:
        """Write ``oid`` through a temporary file, renamed into place when the block succeeds
        (fsynced first unless ``durable`` is False). Inside ``batch()``, an object written
        with ``durable`` False goes into the batch's pack."""
        if self._batch is not None and not durable:
            return self._pack_writer(validate_oid(oid))
        return self._writer(oid, self.path(oid), durable)

    def _pack_writer(self, oid: str) -> AbstractContextManager[BinaryIO]:
        if self._where(bytes.fromhex(oid), False) is not None:  # a loose copy does no harm
            return self._writer(oid, self.path(oid))  # discards: first write wins
        return _PackedWrite(self, oid)

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Objects written with ``durable=False`` inside go into one pack, fsynced and renamed
        into ``pack/`` once when the outermost block exits without an exception (discarded on
        one). Objects of the batch are readable from the store before it ends."""
        if self._batch is not None:
            yield
            return
        self.packs.refresh()  # inside, a miss does not look for new packs again
        self._batch = batch = PackWriter(self.root / TMP_DIR)
        try:
            yield
            if len(batch) < self.pack_min:
                self._unpack(batch)
                return
            done = batch.finish(self.root / PACK_DIR)
            if done is not None:
                _fsync_dir(done.parent)
                self.packs.refresh(force=True)
        finally:
            batch.discard()
            self._batch = None

    def _unpack(self, batch: PackWriter) -> None:
        """Write the objects of a small batch as loose files, made durable by one ``os.sync``
        (each flushed on its own where there is none)."""
        self._batch = None
        objects = batch.objects()
        syncs = hasattr(os, "sync")
        for digest, offset, length in objects:
            oid = digest.hex()
            with self._writer(oid, self.path(oid), durable=not syncs) as f:
                f.write(batch.read(offset, length))
        if objects and syncs:
            os.sync()

    @contextmanager
    def _writer(self, oid: str, dest: Path, durable: bool = True) -> Iterator[BinaryIO]:
        if dest.exists() or self._packed(oid, refresh=False) is not None:
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
        """Remove ``oid`` (a packed one: its packs are rewritten without it); return whether
        it was there."""
        return bool(self.delete_many([oid]))

    def delete_many(self, oids: Iterable[str], keep_newer_than: float | None = None) -> list[str]:
        """Remove every one of ``oids`` (each pack holding some is rewritten once); with
        ``keep_newer_than``, objects written or freshened after it stay. Return those removed."""
        removed: set[str] = set()
        digests: set[bytes] = set()
        for oid in oids:
            if self._delete_loose(oid, keep_newer_than):
                removed.add(oid)
            digests.add(bytes.fromhex(oid))
        removed.update(d.hex() for d in self._drop_packed(digests, keep_newer_than))
        return sorted(removed)

    def _drop_packed(self, digests: set[bytes], keep_newer_than: float | None) -> set[bytes]:
        """Remove the packed copies of ``digests`` (each pack holding some rewritten once)."""
        dropped = set()
        if self._batch is not None:
            dropped = {d for d in digests if self._batch.forget(d)}
        self.packs.refresh()
        for pack in list(self.packs.packs.values()):
            if any(pack.find(d) is not None for d in digests):
                dropped |= self.packs.drop(pack, digests, keep_newer_than)
        return dropped

    def _delete_loose(self, oid: str, keep_newer_than: float | None) -> bool:
        path = self._loose(oid)
        try:
            if keep_newer_than is not None and os.stat(path).st_mtime > keep_newer_than:
                return False
            os.unlink(path)
        except FileNotFoundError:
            return False
        except PermissionError:  # Windows refuses to delete read-only files
            os.chmod(path, stat.S_IWRITE)
            os.unlink(path)
        return True

    def iter_oids(self) -> Iterator[str]:
        """Every stored oid, loose then packed (each once); stray files and ``tmp/`` are
        skipped."""
        seen: set[str] = set()
        if not self.root.is_dir():
            return
        for fan in sorted(self.root.iterdir()):
            if len(fan.name) != 2 or not _HEX.issuperset(fan.name) or not fan.is_dir():
                continue
            for f in sorted(fan.iterdir()):
                oid = fan.name + f.name
                if len(oid) == 64 and _HEX.issuperset(f.name) and f.is_file():
                    seen.add(oid)
                    yield oid
        for oid in self.packs.oids():
            if oid not in seen:
                yield oid

    def mtime(self, oid: str) -> float:
        """When the object was written or last freshened (a packed one: its newest pack)."""
        if self._packed(oid, refresh=False) is None:
            try:
                return os.stat(self._loose(oid)).st_mtime
            except FileNotFoundError:
                pass
        if self._packed(oid) is None:
            raise missing(oid)
        if self._batch is not None and self._batch.find(bytes.fromhex(oid)) is not None:
            return time.time()
        times = []
        for pack in self.packs.holding(bytes.fromhex(oid)):
            try:
                times.append(os.stat(pack.path).st_mtime)
            except FileNotFoundError:
                continue
        if not times:
            raise missing(oid)
        return max(times)

    def freshen(self, oid: str) -> bool:
        """Set the object's time to now (a packed one: its pack's); return whether it was
        there."""
        where = self._packed(oid, refresh=False)
        if where is None:
            try:
                os.utime(self._loose(oid))
                return True
            except FileNotFoundError:
                where = self._packed(oid)
            except PermissionError:  # not the owner: a shared store; gc runs as its owner
                return True
        if where is None:
            return False
        src = where[0]
        if isinstance(src, Pack) and not self._freshen_pack(src):
            self.packs.refresh(force=True)  # rewritten meanwhile: touch where it is now
            again = self._packed(oid, refresh=False)
            return again is not None and self.freshen(oid)
        return True

    def _freshen_pack(self, pack: Pack) -> bool:
        """Touch the pack; False when it is gone (another process's gc removed it)."""
        try:
            os.utime(pack.path)  # every time: gc re-checks the time just before it rewrites
        except FileNotFoundError:
            return False
        except PermissionError:  # not the owner: a shared store; gc runs as its owner
            pass
        return True

    def quarantine(self, oid: str, reason: str) -> str | None:
        """Move the object into ``quarantine/`` (a loose file: renamed; a packed object: copied
        out, then its packs rewritten without it; never deleted)."""
        src = self.path(oid)
        qdir = self.root / QUARANTINE_DIR
        qdir.mkdir(parents=True, exist_ok=True)
        dest = qdir / f"{oid}.{time.time_ns()}"
        dest.with_name(dest.name + ".why").write_text(reason + "\n", encoding="utf-8")
        if self._quarantine_packed(oid, dest):  # the copy ``open`` returns goes first
            return str(dest)
        try:
            os.replace(src, dest)
        except FileNotFoundError:
            dest.with_name(dest.name + ".why").unlink(missing_ok=True)
            return None
        _fsync_dir(src.parent)
        return str(dest)

    def _quarantine_packed(self, oid: str, dest: Path) -> bool:
        where = self._packed(oid)
        if where is None:
            return False
        data = self._read_packed(oid, where)
        with open(dest, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        self._drop_packed({bytes.fromhex(oid)}, None)
        return True

    def merge_packs(self, at_least: int = PACK_MERGE_AT) -> int:
        """Merge all packs into one when there are at least ``at_least`` (gc); return how many
        were merged."""
        return self.packs.merge(at_least)

    def repair_packs(self) -> list[tuple[str, str, int]]:
        """Rewrite damaged packs (a cut or damaged index: read from their records) into whole
        ones and move the damaged files into ``quarantine/``; return (pack file name, problem,
        objects kept) for each (``fsck --repair``)."""
        return self.packs.rebuild_damaged(self.root / QUARANTINE_DIR)

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
        """Move a quarantined file back, as a loose object (unless the id is stored again
        meanwhile)."""
        dest = self.path(q.oid)
        if self.has(q.oid):
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

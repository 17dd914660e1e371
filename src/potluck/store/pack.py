"""Pack files: many small objects in one immutable file, written and synced once.

Layout (all integers little-endian)::

    offset  size      field
    0       8         head: magic b"PLKP", u8 version (1), 3 zero bytes
    8       ...       records, back to back: b"PLKR", 32-byte raw oid, u64 length, the bytes
    I       48 * n    index, sorted by oid: 32-byte raw oid, u64 offset of the bytes, u64 length
    I+48n   56        tail: u64 I, u64 n, sha256 of (index + I + n), b"PLKPEND\\n"

A pack is built in ``tmp/`` (``PackWriter``), fsynced once and renamed into ``pack/`` when
complete, so a pack under ``pack/`` was whole when written. The reader (``Pack``) trusts the
index only when the tail's checksum matches; a pack whose tail or index is damaged (a truncated
copy, a bad disk) is read by walking its records instead (``salvaged``): each record names its
object and length, and a record cut short is left out. Object bytes are not checksummed here:
the caller hashes every object it reads against its id, as for loose files.
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
import tempfile
import threading
from collections.abc import Iterable
from itertools import accumulate, chain, repeat
from operator import add
from pathlib import Path
from typing import BinaryIO

MAGIC = b"PLKP"
VERSION = 1
RECORD_MAGIC = b"PLKR"
END = b"PLKPEND\n"
SUFFIX = ".pack"

_HEAD = struct.Struct("<4sB3x")
_RECORD = struct.Struct("<4s32sQ")
_ENTRY = struct.Struct("<32sQQ")
_TAIL = struct.Struct("<QQ32s8s")
HEAD_SIZE = _HEAD.size
RECORD_SIZE = _RECORD.size
ENTRY_SIZE = _ENTRY.size
TAIL_SIZE = _TAIL.size


class PackDamaged(Exception):
    """The file is not a pack at all (bad head): nothing in it can be located."""


def _index_checksum(index: bytes, offset: int, count: int) -> bytes:
    h = hashlib.sha256(index)
    h.update(struct.pack("<QQ", offset, count))
    return h.digest()


class Pack:
    """A read-only pack: ``find`` locates an object by binary search over the sorted index."""

    def __init__(self, path: Path, index: bytes, data_end: int, problem: str | None) -> None:
        self.path = path
        self.index = index  # n sorted _ENTRY records
        self.count = len(index) // ENTRY_SIZE
        self._fan = _fanout(index, self.count)
        self.data_end = data_end  # where the records end (the index starts)
        self.problem = problem  # None, or why the index was rebuilt from the records
        self._file: BinaryIO | None = None  # opened on the first read (``_OPEN`` bounds them)
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: Path) -> Pack:
        """Open the pack at ``path``; ``PackDamaged`` when it is not a pack, ``OSError`` when it
        cannot be read (gone meanwhile)."""
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(HEAD_SIZE)
            if len(head) != HEAD_SIZE or _HEAD.unpack(head) != (MAGIC, VERSION):
                raise PackDamaged(f"{path.name}: not a pack file (bad head)")
            index, end, problem = _read_index(f, size)
            if problem is not None:
                index, end = _walk_records(f, size)
        return cls(path, index, end, problem)

    def close(self) -> None:
        """Close the file handle (before the pack is deleted, for Windows)."""
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
        _OPEN.forget(self)

    def find(self, digest: bytes) -> tuple[int, int] | None:
        """(offset, length) of the object with raw id ``digest``, or None."""
        idx, lo, hi = self.index, self._fan[digest[0]], self._fan[digest[0] + 1]
        while lo < hi:
            mid = (lo + hi) // 2
            at = mid * ENTRY_SIZE
            key = idx[at : at + 32]
            if key < digest:
                lo = mid + 1
            elif key > digest:
                hi = mid
            else:
                _, offset, length = _ENTRY.unpack_from(idx, at)
                if offset < HEAD_SIZE + RECORD_SIZE or offset + length > self.data_end:
                    return None  # cannot happen with a checksummed index; never read past
                return offset, length
        return None

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset`` (short when the file was cut meanwhile);
        ``FileNotFoundError`` when the pack was removed (by another process's gc) while its
        handle was closed."""
        with self._lock:
            opened = self._file is None
            if self._file is None:
                self._file = open(self.path, "rb")  # noqa: SIM115 - kept: readable after unlink
            self._file.seek(offset)
            data = self._file.read(length)
        _OPEN.used(self, opened)
        return data

    def entries(self) -> list[tuple[str, int, int]]:
        """(oid, offset, length) of every object, in oid order."""
        rows = (_ENTRY.unpack_from(self.index, i) for i in range(0, len(self.index), ENTRY_SIZE))
        return [(d.hex(), off, n) for d, off, n in rows]


class _OpenPacks:
    """The packs whose file is open, least recently read first: at most ``limit`` (a store
    with thousands of packs must not run out of file descriptors)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._order: dict[int, Pack] = {}
        self._lock = threading.Lock()

    def used(self, pack: Pack, opened: bool) -> None:
        with self._lock:
            self._order.pop(id(pack), None)
            self._order[id(pack)] = pack
            excess = len(self._order) - self.limit if opened else 0
            victims = [self._order.pop(k) for k in list(self._order)[: max(0, excess)]]
        for victim in victims:  # closed outside our lock: ``close`` takes the pack's lock
            victim.close()

    def forget(self, pack: Pack) -> None:
        with self._lock:
            self._order.pop(id(pack), None)


MAX_OPEN_PACKS = 64
_OPEN = _OpenPacks(MAX_OPEN_PACKS)


def _fanout(index: bytes, count: int) -> list[int]:
    """``fan[b]``: the first entry whose id starts with a byte >= ``b`` (257 values), so that a
    lookup searches only the entries sharing its first byte."""
    fan = [0] * 257
    lo = 0
    for b in range(1, 256):
        hi = count
        while lo < hi:
            mid = (lo + hi) // 2
            if index[mid * ENTRY_SIZE] < b:
                lo = mid + 1
            else:
                hi = mid
        fan[b] = lo
    fan[256] = count
    return fan


def _read_index(f: BinaryIO, size: int) -> tuple[bytes, int, str | None]:
    """(index, data end, None) from a whole pack, or (b"", 0, why) when the tail or index do
    not check out."""
    if size < HEAD_SIZE + TAIL_SIZE:
        return b"", 0, "too short for an index"
    f.seek(size - TAIL_SIZE)
    offset, count, checksum, end = _TAIL.unpack(f.read(TAIL_SIZE))
    if end != END or offset < HEAD_SIZE or offset + count * ENTRY_SIZE != size - TAIL_SIZE:
        return b"", 0, "the index is missing or cut short"
    f.seek(offset)
    index = f.read(count * ENTRY_SIZE)
    if _index_checksum(index, offset, count) != checksum:
        return b"", 0, "the index does not match its checksum"
    return index, offset, None


def _walk_records(f: BinaryIO, size: int) -> tuple[bytes, int]:
    """Rebuild the index of a pack from its records (a damaged tail): every record that is
    whole; the walk stops at the first one that is not."""
    found: dict[bytes, tuple[int, int]] = {}
    pos = HEAD_SIZE
    while pos + RECORD_SIZE <= size:
        f.seek(pos)
        magic, digest, length = _RECORD.unpack(f.read(RECORD_SIZE))
        start = pos + RECORD_SIZE
        if magic != RECORD_MAGIC or start + length > size:
            break
        found.setdefault(digest, (start, length))
        pos = start + length
    index = b"".join(_ENTRY.pack(d, off, n) for d, (off, n) in sorted(found.items()))
    return index, pos


#: Once this many record bytes are written and not yet synced, a thread starts an
#: ``fdatasync`` of the pack (one at a time): the disk writes of a large add overlap its work,
#: so ``finish``'s fsync has little left to wait for.
SYNC_AHEAD = 4 << 20


class PackWriter:
    """Builds one pack in ``tmp_dir``: ``add`` appends records, ``finish`` writes the index,
    fsyncs once and renames the file into ``pack_dir``. Objects added are readable (``find``,
    ``read``) before the pack is finished; ``discard`` leaves nothing. The records are synced
    ahead in the background as they grow (``SYNC_AHEAD``)."""

    def __init__(self, tmp_dir: Path) -> None:
        tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="pack-", suffix=".tmp", dir=tmp_dir)
        self.tmp = Path(name)
        self._file = os.fdopen(fd, "w+b", buffering=1 << 20)
        self._file.write(_HEAD.pack(MAGIC, VERSION))
        self._pos = HEAD_SIZE
        self._entries: dict[bytes, tuple[int, int]] = {}
        #: the index entry of each object added, packed as it is added (``_index`` sorts them);
        #: None once ``forget`` has dropped one (``_index`` then packs ``_entries`` instead)
        self._records: list[bytes] | None = []
        self._lock = threading.Lock()
        self._synced = 0  # record bytes a started sync covers
        self._syncer: threading.Thread | None = None
        self._sync_error: OSError | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, digest: bytes, data: bytes | memoryview) -> None:
        """Append one object (ignored when the id is in the pack already)."""
        with self._lock:
            if digest in self._entries:
                return
            self._file.write(_RECORD.pack(RECORD_MAGIC, digest, len(data)) + data)
            self._entries[digest] = (self._pos + RECORD_SIZE, len(data))
            if self._records is not None:
                self._records.append(_ENTRY.pack(digest, self._pos + RECORD_SIZE, len(data)))
            self._pos += RECORD_SIZE + len(data)
            self._sync_ahead()

    def add_many(self, objects: Iterable[tuple[bytes, bytes | memoryview]]) -> None:
        """``add`` of each ``(raw id, bytes)``, written with one call (the records, their
        offsets and the index entries made by C-level maps: a file of many small tensors
        adds tens of thousands at once)."""
        with self._lock:
            digests, datas = self._unseen(objects)
            if not digests:
                return
            lengths = list(map(len, datas))
            ends = list(accumulate(map(add, lengths, repeat(RECORD_SIZE)), initial=self._pos))
            starts = list(map(add, ends[:-1], repeat(RECORD_SIZE)))
            self._entries.update(zip(digests, zip(starts, lengths, strict=True), strict=True))
            if self._records is not None:
                self._records += map(_ENTRY.pack, digests, starts, lengths)
            heads = map(_RECORD.pack, repeat(RECORD_MAGIC), digests, lengths)
            # through the file's buffer: no joined copy of the whole run (and its page faults)
            self._file.writelines(chain.from_iterable(zip(heads, datas, strict=True)))
            self._pos = ends[-1]
            self._sync_ahead()

    def _sync_ahead(self) -> None:
        """Start syncing the records written so far on a thread, when ``SYNC_AHEAD`` bytes
        wait for it and no earlier sync still runs (the caller holds the lock)."""
        if self._syncer is not None:
            if self._syncer.is_alive():
                return
            self._syncer.join()
            self._syncer = None
        if self._pos - self._synced < SYNC_AHEAD:
            return
        self._file.flush()
        self._synced = self._pos
        fd = self._file.fileno()
        self._syncer = threading.Thread(target=self._datasync, args=(fd,), daemon=True)
        self._syncer.start()

    def _datasync(self, fd: int) -> None:
        try:
            os.fdatasync(fd)
        except OSError as e:  # raised by ``finish`` when the pack is to be durable
            self._sync_error = e

    def _wait_for_sync(self) -> None:
        """Wait until the background sync, if one runs, has ended."""
        if self._syncer is not None:
            self._syncer.join()
            self._syncer = None

    def _unseen(
        self, objects: Iterable[tuple[bytes, bytes | memoryview]]
    ) -> tuple[list[bytes], list[bytes | memoryview]]:
        """The ids and bytes of ``objects`` not in the pack yet, each id once (the first)."""
        items = list(objects)
        digests = [digest for digest, _ in items]
        if len(set(digests)) == len(digests) and self._entries.keys().isdisjoint(digests):
            return digests, [data for _, data in items]
        seen = set(self._entries)
        kept = []
        for digest, data in items:
            if digest not in seen:
                seen.add(digest)
                kept.append((digest, data))
        return [digest for digest, _ in kept], [data for _, data in kept]

    def find(self, digest: bytes) -> tuple[int, int] | None:
        """(offset, length) of an object added to this pack, or None."""
        return self._entries.get(digest)

    def objects(self) -> list[tuple[bytes, int, int]]:
        """(raw id, offset, length) of every object added, in the order added."""
        return [(d, off, n) for d, (off, n) in self._entries.items()]

    def forget(self, digest: bytes) -> bool:
        """Leave an added object out of the index (its bytes stay, unreferenced)."""
        with self._lock:
            if digest not in self._entries:
                return False
            del self._entries[digest]
            self._records = None
            return True

    def read(self, offset: int, length: int) -> bytes:
        """Bytes of an added object."""
        with self._lock:
            self._file.flush()
            self._file.seek(offset)
            data = self._file.read(length)
            self._file.seek(0, os.SEEK_END)
            return data

    def finish(self, pack_dir: Path, durable: bool = True) -> Path | None:
        """Write the index and tail, fsync, rename into ``pack_dir``; return the pack's path
        (None, and nothing left, when no object was added)."""
        if not self._entries:
            self.discard()
            return None
        self._wait_for_sync()
        if durable and self._sync_error is not None:
            raise self._sync_error
        index = self._index()
        count = len(self._entries)
        checksum = _index_checksum(index, self._pos, count)
        self._file.write(index)
        self._file.write(_TAIL.pack(self._pos, count, checksum, END))
        self._file.flush()
        if durable:
            os.fsync(self._file.fileno())
        self._file.close()
        pack_dir.mkdir(parents=True, exist_ok=True)
        dest = pack_dir / f"pack-{hashlib.sha256(index).hexdigest()[:40]}{SUFFIX}"
        os.chmod(self.tmp, stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
        os.replace(self.tmp, dest)
        return dest

    def _index(self) -> bytes:
        """The index of the objects added: their entries sorted by id."""
        if self._records is not None:  # an entry starts with its id: sorting sorts by id
            return b"".join(sorted(self._records))
        items = sorted(self._entries.items())
        return b"".join([_ENTRY.pack(digest, offset, n) for digest, (offset, n) in items])

    def discard(self) -> None:
        """Remove the unfinished pack."""
        self._wait_for_sync()  # the thread uses the file's descriptor
        if not self._file.closed:
            self._file.close()
        self.tmp.unlink(missing_ok=True)

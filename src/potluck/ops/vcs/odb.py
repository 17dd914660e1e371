"""The object database: the physical encoding (``objects.encoding``) over a store, with hashes.

Every read verifies the sha256 of the logical bytes against the object id; every write is
atomic (the store publishes an object only when it is complete). ``has`` does not trust a file
it has not checked in this process: a torn object (shorter or longer than its records say, e.g.
after a crash that lost unsynced data) is quarantined and reported absent, so fetch downloads it
again and ``put`` writes it again.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import repeat
from typing import BinaryIO, NamedTuple

import zstandard

from potluck import workers
from potluck.config import RepoConfig
from potluck.errors import CorruptObjectError, MissingObjectError
from potluck.objects import structured
from potluck.objects.encoding import (
    Chunk,
    ObjectHeader,
    byte_group,
    check_layout,
    decode_object,
    encode_object,
    encode_small_many,
    read_header,
    rechunk,
    xor_bytes,
)
from potluck.objects.structdetect import best_model
from potluck.store.base import ObjectStore

log = logging.getLogger("potluck")


#: chunks a read keeps in flight, decoding ahead and waiting to be hashed: 2 keeps two decode
#: workers busy, and each chunk in flight is a few MiB of the filter's RSS (bf16 checkouts of
#: GPT-2 peaked at 0.3-0.4x the file with 4 and 8)
READ_WINDOW = 2


class PutResult(NamedTuple):
    """What ``ObjectDB.put`` did: ``new`` is False when the object already existed (a tuple:
    one is made per tensor, and a file may have tens of thousands)."""

    oid: str
    new: bool
    stored: int
    depth: int


class SmallObject(NamedTuple):
    """One object for ``ObjectDB.put_small_many``: content known to hash to ``oid``."""

    oid: str
    data: Chunk
    itemsize: int
    base_oid: str | None = None


#: quick mode (objects downloaded from a remote): a chunk whose sample does not compress to half
#: is stored verbatim, as git-lfs keeps its objects, saving a full compression on every fetch
QUICK_RATIO = 0.5


class ObjectDB:
    """Content-addressed tensors and raw byte strings over an ``ObjectStore``."""

    def __init__(self, store: ObjectStore, config: RepoConfig, workers: int | None = None) -> None:
        self.store = store
        self.config = config
        self.workers = workers if workers is not None else min(8, os.cpu_count() or 1)
        self._executor: ThreadPoolExecutor | None = None
        self._hasher: ThreadPoolExecutor | None = None
        self._whole: set[str] = set()  # objects whose layout was checked by this process

    def _hash_pool(self) -> ThreadPoolExecutor | None:
        """One thread that hashes decoded chunks (in order) while the caller writes them."""
        if self.workers <= 1:
            return None
        if self._hasher is None:
            self._hasher = workers.pool(1, "potluck-hash")
        return self._hasher

    def _pool(self) -> ThreadPoolExecutor | None:
        """Threads that encode chunks concurrently (None when ``workers`` is 1)."""
        if self.workers <= 1:
            return None
        if self._executor is None:
            self._executor = workers.pool(self.workers, "potluck-enc")
        return self._executor

    def has(self, oid: str) -> bool:
        """True when the object is present and whole. The first time in this process, its
        record layout is checked against the file size (``check_layout``: cheap, no hash); a
        torn object is quarantined and reported absent so that it is fetched or written again.
        A flipped bit is only found by ``verify`` (``potluck fsck``)."""
        if not self.store.has(oid):  # one stat, as before: all a put of a new object pays
            return False
        if oid in self._whole:
            return True
        problem = self.layout_problem(oid)
        if problem:
            self.quarantine(oid, problem)
        return problem is None

    def has_many(self, oids: Iterable[str]) -> set[str]:
        """The ``oids`` that ``has`` calls present and whole, with one look at the store for all
        of them (``store.has_many``: one pack-directory check, not a stat per object); the
        first-time layout check and the quarantine of a torn object are ``has``'s."""
        wanted = list(dict.fromkeys(oids))
        present = self.store.has_many(wanted)
        whole: set[str] = set()
        for oid in wanted:
            if oid not in present:
                continue
            problem = None if oid in self._whole else self.layout_problem(oid)
            if problem:
                self.quarantine(oid, problem)
            elif problem is None:  # "": gone since the look (absent)
                whole.add(oid)
        return whole

    def layout_problem(self, oid: str) -> str | None:
        """None when the object is present and whole (remembered), "" when it is absent, else
        what is wrong with its file."""
        try:
            f = self.store.open(oid)
        except MissingObjectError:
            return ""
        with f:
            size = f.seek(0, os.SEEK_END)
            f.seek(0)
            try:
                check_layout(f, size)
            except CorruptObjectError as e:
                return e.message
        self._whole.add(oid)
        return None

    def quarantine(self, oid: str, reason: str) -> str | None:
        """Move a damaged object aside (``store.quarantine``: never deleted) and log where."""
        self._whole.discard(oid)
        where = self.store.quarantine(oid, reason)
        if where is not None:
            log.warning("object %s is damaged (%s); moved to %s", oid[:12], reason, where)
        return where

    def header(self, oid: str) -> ObjectHeader:
        """The stored object's header (size, depth, base)."""
        with self.store.open(oid) as f:
            return read_header(f)

    def read_chunks(self, oid: str, *, verify: bool = True) -> Iterator[bytes]:
        """Stream the object's logical bytes; with ``verify`` raise ``CorruptObjectError`` at the
        end when they do not hash to ``oid`` (callers must not trust data before the end)."""
        with self.store.open(oid) as f:
            several = read_header(f).n_chunks > 1  # one chunk: no hand-off to the pools
            f.seek(0)
            h = _BackgroundHash(self._hash_pool() if verify and several else None)
            pool = self._pool() if several else None
            for chunk in decode_object(f, self._open_base, pool, READ_WINDOW):
                if verify:
                    h.update(chunk)
                yield chunk
        got = h.hexdigest() if verify else oid
        if got != oid:
            raise CorruptObjectError(
                f"object {oid[:12]} is corrupt: its content hashes to {got[:12]}",
                hint="run `potluck fsck` to find every affected tensor and revision",
                oid=oid,
            )

    def _open_base(self, oid: str) -> Iterator[bytes]:
        if not self.store.has(oid):
            raise MissingObjectError(
                f"delta base object {oid[:12]} is missing", hint="run `potluck fsck`", oid=oid
            )
        return self.read_chunks(oid, verify=False)

    def read_bytes(self, oid: str) -> bytes:
        """The whole logical content (use only for small or single tensors)."""
        return b"".join(self.read_chunks(oid))

    def verify(self, oid: str) -> None:
        """Decode and re-hash one object; raises on corruption or a missing object."""
        for _ in self.read_chunks(oid):
            pass

    def put(
        self,
        oid: str,
        chunks: Callable[[], Iterable[Chunk]],
        *,
        size: int,
        itemsize: int,
        base_oid: str | None = None,
        quick: bool = False,
        durable: bool = True,
        dtype: str | None = None,
        shape: tuple[int, ...] | None = None,
    ) -> PutResult:
        """Store the content ``chunks()`` (already known to hash to ``oid``) if absent.

        With ``base_oid`` (an earlier version of the same tensor, same size) the encoder may
        store chunks as XOR deltas, unless that would make the chain deeper than allowed. With
        ``quick``, chunks that a sample shows to be nearly incompressible are stored verbatim.
        With ``durable`` False the object is not flushed on its own: the caller makes a batch
        of them durable at once (``os.sync``) before anything refers to them. A matrix's
        ``dtype`` and ``shape`` let the encoder look for a structured update of the base (a
        merged low-rank or scale update, stored as factors plus an exact residual).
        """
        # re-used: fresh again, so gc's grace period covers it until referenced; gone by the
        # time it is freshened (another process's gc came between): written again below
        if self.has(oid) and self.store.freshen(oid):
            return PutResult(oid, False, 0, 0)
        self._whole.discard(oid)
        base = self._usable_base(base_oid, size) if base_oid != oid else None
        try:
            if base is not None and structured.eligible(dtype, shape, size):
                assert dtype is not None and shape is not None
                return self._encode_structured(oid, chunks, base, dtype, shape, durable)
            return self._encode(oid, chunks, size, itemsize, base, quick, durable)
        except CorruptObjectError:
            if base is None:
                raise
            return self._encode(oid, chunks, size, itemsize, None, quick, durable)

    def put_small_many(
        self, items: Sequence[SmallObject], durable: bool = False
    ) -> list[PutResult]:
        """``put`` of each item, in order, with the same objects as a result, for many objects of
        at most one chunk each: those that are new and have no usable base are encoded together
        (``encode_small_many``) and written to the store at once; the others (present already,
        a delta candidate, repeated in ``items``) take ``put``'s own way."""
        wanted = {it.oid for it in items}
        wanted.update(it.base_oid for it in items if it.base_oid)
        present = self.store.has_many(wanted)
        results: dict[int, PutResult] = {}
        for itemsize, members in self._together(items, present).items():
            oids = [items[k].oid for k in members]
            files = encode_small_many(
                [items[k].data for k in members],
                itemsize=itemsize,
                chunk_size=self.config.chunk_bytes,
                level=self.config.zstd_level,
            )
            self.store.write_many(zip(oids, files, strict=True), durable)
            made = map(PutResult, oids, repeat(True), map(len, files), repeat(0))
            results.update(zip(members, made, strict=True))
        if len(results) == len(items):
            return [results[k] for k in range(len(items))]
        return [
            results[k] if k in results else self._put_one(it, durable) for k, it in enumerate(items)
        ]

    def _together(self, items: Sequence[SmallObject], present: set[str]) -> dict[int, list[int]]:
        """{itemsize: indexes of ``items``} of those ``put_small_many`` encodes together: new,
        without a stored base, the first of their id, at most one chunk long."""
        cs = self.config.chunk_bytes
        together: dict[int, list[int]] = {}
        claimed: set[str] = set()
        for k, (oid, data, itemsize, base) in enumerate(items):
            if oid in present or oid in claimed or (base != oid and base in present):
                continue  # stored, repeated, or a delta candidate (``put`` decides)
            if 0 < len(data) <= cs:
                claimed.add(oid)
                together.setdefault(itemsize, []).append(k)
        return together

    def _put_one(self, it: SmallObject, durable: bool) -> PutResult:
        data = it.data
        return self.put(
            it.oid,
            lambda: [data],
            size=len(data),
            itemsize=it.itemsize,
            base_oid=it.base_oid,
            durable=durable,
        )

    def _usable_base(self, base_oid: str | None, size: int) -> tuple[str, int] | None:
        if base_oid is None or size == 0 or not self.store.has(base_oid):
            return None
        try:
            head = self.header(base_oid)
        except CorruptObjectError:
            return None
        if head.size != size or head.depth >= self.config.max_delta_depth:
            return None
        if head.chunk_size != self.config.chunk_bytes:
            return None
        return base_oid, head.depth

    def _encode(
        self,
        oid: str,
        chunks: Callable[[], Iterable[Chunk]],
        size: int,
        itemsize: int,
        base: tuple[str, int] | None,
        quick: bool = False,
        durable: bool = True,
    ) -> PutResult:
        cs = self.config.chunk_bytes
        base_iter = self.read_chunks(base[0]) if base else None
        with self.store.writer(oid, durable=durable and not quick) as out:
            stats = encode_object(
                rechunk(chunks(), cs),
                size=size,
                itemsize=itemsize,
                chunk_size=cs,
                level=self.config.zstd_level,
                out=out,
                base=base_iter,
                base_oid=base[0] if base else None,
                base_depth=base[1] if base else 0,
                executor=self._pool() if size > cs else None,  # one chunk: no hand-off
                quick=QUICK_RATIO if quick else None,
            )
            if base_iter is not None:
                for _ in base_iter:  # drain: runs the base's hash check
                    pass
        return PutResult(oid, True, stats.stored_size, stats.depth)

    def _encode_structured(
        self,
        oid: str,
        chunks: Callable[[], Iterable[Chunk]],
        base: tuple[str, int],
        dtype: str,
        shape: tuple[int, ...],
        durable: bool,
    ) -> PutResult:
        """``_encode`` of a matrix held in memory with its base (both at most
        ``structured.MAX_ELEMENTS`` elements), with a model when one pays."""
        new = b"".join(chunks())
        size = len(new)
        old = b"".join(self.read_chunks(base[0]))
        k = structured.DTYPE_ITEMSIZE[dtype]
        cctx = zstandard.ZstdCompressor(level=self.config.zstd_level)
        m, n = shape
        model = best_model(old, new, dtype, (m, n), cctx.compress, byte_group, xor_bytes)
        # the whole matrices are needed only to choose the model: the encoder gets the new bytes
        # from ``chunks()`` again and the base cut into chunks, so neither is held twice
        del new
        cs = self.config.chunk_bytes
        base_chunks = _chunks_of(old, cs)
        del old
        with self.store.writer(oid, durable=durable) as out:
            stats = encode_object(
                chunks(),
                size=size,
                itemsize=k,
                chunk_size=cs,
                level=self.config.zstd_level,
                out=out,
                base=base_chunks,
                base_oid=base[0],
                base_depth=base[1],
                executor=self._pool() if size > cs else None,
                model=model,
            )
        return PutResult(oid, True, stats.stored_size, stats.depth)

    def put_bytes(self, data: bytes, itemsize: int = 1) -> PutResult:
        """Store a small byte string; returns its id."""
        oid = hashlib.sha256(data).hexdigest()
        return self.put(oid, lambda: [data], size=len(data), itemsize=itemsize)


def _chunks_of(data: bytes, size: int) -> Iterator[bytes]:
    """``data`` cut into pieces of ``size`` bytes, each let go of once it has been taken (the
    caller drops ``data``: the pieces then replace it)."""
    return _taken(deque(data[at : at + size] for at in range(0, len(data), size)))


def _taken(pieces: deque[bytes]) -> Iterator[bytes]:
    while pieces:
        yield pieces.popleft()


class _BackgroundHash:
    """sha256 of a stream of chunks, computed on a single worker thread (so in order) while the
    caller goes on; at most ``window`` chunks wait. Without a pool it hashes inline."""

    def __init__(self, pool: ThreadPoolExecutor | None, window: int = READ_WINDOW) -> None:
        self.h = hashlib.sha256()
        self.pool = pool
        self.window = window
        self.pending: deque[Future[None]] = deque()

    def update(self, chunk: bytes) -> None:
        if self.pool is None:
            self.h.update(chunk)
            return
        self.pending.append(self.pool.submit(self.h.update, chunk))
        if len(self.pending) > self.window:
            self.pending.popleft().result()

    def hexdigest(self) -> str:
        while self.pending:
            self.pending.popleft().result()
        return self.h.hexdigest()


def copy_range(f: BinaryIO, offset: int, length: int, piece: int) -> Iterator[bytes]:
    """Yield ``length`` bytes of ``f`` from ``offset`` in pieces of at most ``piece`` bytes."""
    f.seek(offset)
    left = length
    while left > 0:
        buf = f.read(min(piece, left))
        if not buf:
            raise EOFError(f"file ended {left} bytes early at offset {offset + length - left}")
        left -= len(buf)
        yield buf

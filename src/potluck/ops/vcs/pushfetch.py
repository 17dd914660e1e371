"""Move objects between the local object database and an object remote.

Objects travel as their *logical* bytes (a tensor's or a structural segment's exact bytes), so
an object on a remote is an ordinary content-addressed blob whose sha256 is its id: a genuine
Git LFS object. Only what the other side lacks moves; uploads are checked to be complete
locally before the first byte is sent, and every download is verified (by the remote layer)
before it enters the store.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from potluck.errors import CorruptObjectError, IntegrityError, MissingObjectError
from potluck.objects.encoding import decode_object, read_header
from potluck.objects.manifest import Manifest, TensorEntry
from potluck.ops.vcs.bundle import (
    BUNDLE_MEMBER_MAX,
    BUNDLE_MIN_OBJECTS,
    Bundle,
    ChunkReader,
    bundle_entries,
    group_by_wire,
    open_bundle,
    plan_bundles,
    seal_bundles,
    store_wire,
)
from potluck.ops.vcs.odb import ObjectDB
from potluck.ops.vcs.wire import (
    MAX_CHAIN,
    RemoteView,
    WireEntry,
    encoded_candidate,
    plan_fetch,
    verify_remote,
    worth_encoding,
)
from potluck.remote import ObjectRef, ObjectRemote, TransferStats
from potluck.remote.base import Opener, Sink, UploadPlanner
from potluck.remote.base import TransferStats as Stats
from potluck.tensors.dtypes import grouping_size

OnBytes = Callable[[int], None]
log = logging.getLogger("potluck")


@dataclass(frozen=True)
class Where:
    """Where an object is used: a file (at a commit, when known) and a tensor (or structure)."""

    path: str
    tensor: str | None = None
    commit: str | None = None

    def describe(self) -> str:
        """``path: tensor 'x' (commit abc123)``."""
        what = f"tensor {self.tensor!r}" if self.tensor else "structural bytes"
        at = f" (commit {self.commit[:10]})" if self.commit else ""
        return f"{self.path}: {what}{at}"


@dataclass
class Wanted:
    """Objects to move, each with one place it is used (for messages) and its element size."""

    refs: dict[ObjectRef, Where] = field(default_factory=dict)
    itemsizes: dict[str, int] = field(default_factory=dict)

    def add_manifest(
        self,
        m: Manifest,
        path: str,
        commit: str | None = None,
        select: Callable[[str], bool] | None = None,
    ) -> None:
        """Add the objects of ``m``; with ``select``, only tensors whose name it accepts (the
        structural bytes of the file are always added: they are small)."""
        for e in m.entries:
            if isinstance(e, TensorEntry):
                if select is not None and not select(e.name):
                    continue
                where = Where(path, e.name, commit)
                size = grouping_size(e.dtype)
            else:
                where = Where(path, None, commit)
                size = 1
            ref = ObjectRef(e.oid, e.size)
            self.refs.setdefault(ref, where)
            self.itemsizes.setdefault(e.oid, size)

    def __len__(self) -> int:
        return len(self.refs)


@dataclass(frozen=True)
class PushReport:
    """What a push moved: objects checked, uploaded (plain or encoded), already on the remote,
    the wire entries of the objects sent encoded (to publish in the wire index), and how many
    objects had a stale index entry (its wire object not on the remote: sent as plain bytes)."""

    checked: int
    uploaded: int
    bytes: int
    already_there: int
    encoded: tuple[WireEntry, ...] = ()
    stale: int = 0
    early: bool = False  # ``encoded`` went to the ``early`` callback
    bundles: int = 0  # wire objects holding several objects' stored files (``ops.vcs.bundle``)


def push_objects(
    odb: ObjectDB,
    remote: ObjectRemote,
    wanted: Wanted,
    on_bytes: OnBytes | None = None,
    *,
    index: Mapping[str, WireEntry] | None = None,
    encode: bool = False,
    early: Callable[[tuple[WireEntry, ...]], None] | None = None,
) -> PushReport:
    """Upload the wanted objects the remote lacks.

    What the remote has is asked of the remote itself (``verify_remote``): an object listed in
    the wire ``index`` counts only when its wire object and base chain are really there; one
    whose entry is stale goes again as plain bytes. Every object the remote lacks must be in
    the local store; if one is not, raise ``MissingObjectError`` naming file, tensor and commit
    before anything is uploaded. With ``encode``, a push of at least ``BUNDLE_MIN_OBJECTS``
    standalone objects sends their stored files in bundles (``ops.vcs.bundle``: a few wire
    objects, nothing decoded); otherwise objects whose stored file is much smaller than their
    bytes travel encoded (``ops.vcs.wire``) when together they save at least
    ``ENCODED_MIN_GAIN`` of what the push would send plain. Either way the caller must then
    publish ``PushReport.encoded``. Encoded objects go first: when every delta base they name was on
    the remote before this push, ``early`` gets their entries before the plain objects are
    sent (``PushReport.early``), so the caller can publish the index while they upload.
    """
    refs = sorted(wanted.refs)
    index = index or {}
    guesses = _encoded_guesses(odb, refs, index) if encode else {}
    bases = _outside_bases(odb, refs, guesses)
    planning = _Planning(remote, [e.wire for e in guesses.values()])
    view = verify_remote(planning, [*refs, *bases], index)  # one existence check for all
    lacking = [r for r in refs if r.oid not in view.present]
    _check_local(odb, remote, wanted, lacking)
    encoded = _choose_encoded(refs, lacking, view, guesses)
    bundles = _bundled(odb, wanted, lacking, view) if encode else []
    bundled = {ref for b in bundles for ref, _ in b.members}
    encoded = {r: e for r, e in encoded.items() if r not in bundled}
    plain = [r for r in lacking if r not in encoded and r not in bundled]
    if not bundles and not worth_encoding(encoded.items(), sum(r.size for r in lacking)):
        encoded, plain = {}, lacking  # plain bytes only: no wire index to publish
    sealed = list(zip(bundles, seal_bundles(odb, bundles), strict=True))
    openers: dict[ObjectRef, Callable[[], AbstractContextManager[BinaryIO]]] = {
        **{e.wire: functools.partial(odb.store.open, e.oid) for e in encoded.values()},
        **{w: functools.partial(open_bundle, odb, b, w) for b, w in sealed},
    }
    entries = [*encoded.values(), *(e for b, w in sealed for e in bundle_entries(b, w))]
    sent: set[ObjectRef] = set()

    def open_wire(w: ObjectRef) -> AbstractContextManager[BinaryIO]:
        sent.add(w)
        return openers[w]()

    wire_stats = remote.upload(list(openers), open_wire, on_bytes)
    sending = {r.oid for r in lacking}
    announce = bool(entries) and all(e.base is None or e.base not in sending for e in entries)
    if early is not None and announce:
        early(tuple(entries))
    announce = announce and early is not None
    stats = remote.upload(plain, lambda ref: _open_logical(odb, ref), on_bytes)
    carried = sum(1 for e in entries if e.wire in sent)
    there = len(refs) - len(lacking) + stats.skipped + len(entries) - carried
    stale = sum(1 for r in lacking if r.oid in view.stale)
    if stale:
        log.warning(
            "%d object(s) listed in the wire index were not on %s; sent as plain bytes",
            stale, remote.url,
        )  # fmt: skip
    return PushReport(
        len(refs), stats.objects + carried, stats.bytes + wire_stats.bytes, there,
        tuple(entries), stale, announce, len(bundles),
    )  # fmt: skip


def _bundled(
    odb: ObjectDB, wanted: Wanted, lacking: Sequence[ObjectRef], view: RemoteView
) -> list[Bundle]:
    """Bundles of the small standalone objects among ``lacking`` (in checkpoint order: a
    file's tensors travel together; none with a stale index entry), or none when fewer than
    ``BUNDLE_MIN_OBJECTS`` qualify."""
    todo = {r for r in lacking if r.size <= BUNDLE_MEMBER_MAX and r.oid not in view.stale}
    candidates = [r for r in wanted.refs if r in todo]
    if len(candidates) < BUNDLE_MIN_OBJECTS:
        return []
    bundles = plan_bundles(odb, candidates)
    return bundles if sum(len(b.members) for b in bundles) >= BUNDLE_MIN_OBJECTS else []


def _check_local(
    odb: ObjectDB, remote: ObjectRemote, wanted: Wanted, lacking: Sequence[ObjectRef]
) -> None:
    have = odb.has_many(r.oid for r in lacking)
    absent = [r for r in lacking if r.oid not in have]
    if absent:
        first = wanted.refs[absent[0]]
        raise MissingObjectError(
            f"cannot push: {len(absent)} object(s) are neither on {remote.url} nor in the local "
            f"store, first {first.describe()} (object {absent[0].oid[:12]}); nothing was uploaded",
            hint="fetch them from a remote that has them (`potluck fetch`), or push from the "
            "clone where the commit was made",
            oids=[r.oid for r in absent],
            places=[wanted.refs[r].describe() for r in absent[:20]],
        )


def _encoded_guesses(
    odb: ObjectDB, refs: Sequence[ObjectRef], index: Mapping[str, WireEntry]
) -> dict[str, WireEntry]:
    """The wire entry of every object that could travel encoded (stored at most
    ``ENCODED_RATIO`` of its size, ``DELTA_RATIO`` for a delta), its delta base not checked
    yet; objects the remote's index already lists are left out (they went encoded before, or
    are stale: plain then), and so are objects missing here (``_check_local`` names them)."""
    guesses: dict[str, WireEntry] = {}
    for r in refs:
        if r.oid not in index and odb.has(r.oid):
            entry = encoded_candidate(odb, r, lambda _base: True)
            if entry is not None:
                guesses[r.oid] = entry
    return guesses


def _outside_bases(
    odb: ObjectDB, refs: Sequence[ObjectRef], guesses: Mapping[str, WireEntry]
) -> list[ObjectRef]:
    """Delta bases of ``guesses`` that this push does not carry: whether the remote has them
    is asked in the same existence check as the objects themselves."""
    carried = {r.oid for r in refs}
    sizes = {r.oid: r.size for r in refs}
    bases: dict[str, ObjectRef] = {}
    for oid, entry in guesses.items():
        base = entry.base
        if base is not None and base not in carried and odb.has(base):
            bases.setdefault(base, ObjectRef(base, sizes[oid]))
    return sorted(bases.values())


def _choose_encoded(
    refs: Sequence[ObjectRef],
    lacking: Sequence[ObjectRef],
    view: RemoteView,
    guesses: Mapping[str, WireEntry],
) -> dict[ObjectRef, WireEntry]:
    """Which lacking objects to send encoded: small enough (``guesses``), with a delta base
    that the remote has (plain, or through a usable index entry) or gets in this push, and no
    stale index entry (a new entry for the same id would compete with the stale one; plain
    bytes are always found)."""
    coming = {r.oid for r in refs} | view.present
    chosen: dict[ObjectRef, WireEntry] = {}
    for r in lacking:
        entry = guesses.get(r.oid)
        if entry is None or r.oid in view.stale:
            continue
        if entry.base is None or entry.base in coming:
            chosen[r] = entry
    return chosen


class _Planning:
    """``remote`` for ``verify_remote`` during a push: where the remote can (``UploadPlanner``)
    the existence check is the upload's own question, so the upload asks no second batch;
    ``extra`` (the wire objects the push may send) ride along in that first check, so their
    upload asks none either."""

    def __init__(self, remote: ObjectRemote, extra: Sequence[ObjectRef] = ()) -> None:
        self._remote = remote
        self._extra = list(extra)
        self.url = remote.url

    def missing(self, refs: Sequence[ObjectRef]) -> list[ObjectRef]:
        if not isinstance(self._remote, UploadPlanner):
            return self._remote.missing(refs)
        asked, self._extra = [*refs, *self._extra], []
        keep = {r.oid for r in refs}
        return [r for r in self._remote.plan_upload(asked) if r.oid in keep]

    def upload(self, refs: Sequence[ObjectRef], opener: Opener, on: OnBytes | None = None) -> Stats:
        return self._remote.upload(refs, opener, on)

    def download(
        self,
        refs: Sequence[ObjectRef],
        sink: Sink,
        tmp: Path,
        on: OnBytes | None = None,
        *,
        sink_checks: Collection[str] = (),
    ) -> Stats:
        return self._remote.download(refs, sink, tmp, on, sink_checks=sink_checks)

    def close(self) -> None:
        self._remote.close()


@contextmanager
def _open_logical(odb: ObjectDB, ref: ObjectRef) -> Iterator[BinaryIO]:
    """A read-only stream of an object's logical bytes. It is not re-hashed here: the remote
    layer hashes what it sends and fails before the last byte when it does not match, so a
    corrupt local object is never uploaded whole."""
    stream = ChunkReader(_named(_logical_chunks(odb, ref.oid), ref.oid))
    try:
        yield stream  # type: ignore[misc]  # read(n) is all the remote layer calls
    finally:
        stream.close()


def _logical_chunks(odb: ObjectDB, oid: str) -> Iterator[bytes]:
    """The logical chunks of a stored object, decoded in the calling thread (uploads already
    run on the remote's workers; a hand-off to the decode pool per chunk only adds waiting).
    A stored raw chunk is its own wire form: it is passed on as read, never copied. A delta
    object decodes through the object database (its base chain)."""
    with odb.store.open(oid) as f:
        if read_header(f).base_oid is None:
            f.seek(0)
            yield from decode_object(f, _no_base, None)
            return
    yield from odb.read_chunks(oid, verify=False)


def _no_base(oid: str) -> Iterator[bytes]:
    raise CorruptObjectError(
        f"an object without a delta base refers to base {oid[:12]}",
        hint="`potluck fsck` names the tensors and commits that use it",
        oid=oid,
    )


def _named(chunks: Iterator[bytes], oid: str) -> Iterator[bytes]:
    """``chunks``, with a decoding failure re-raised naming the object and what to do."""
    try:
        yield from chunks
    except CorruptObjectError as e:
        raise CorruptObjectError(
            f"local object {oid[:12]} is corrupt ({e.message}); it was not uploaded",
            hint="`potluck fsck` names the tensors and commits that use it; restore it from "
            "another clone",
            oid=oid,
        ) from e


def fetch_objects(
    odb: ObjectDB,
    remote: ObjectRemote,
    wanted: Wanted,
    tmp_dir: Path,
    on_bytes: OnBytes | None = None,
    *,
    index: Mapping[str, WireEntry] | None = None,
    fresh: dict[str, Path] | None = None,
) -> TransferStats:
    """Download the wanted objects the local store lacks, verified, into the store.

    Objects in ``index`` come encoded, after their delta bases (fetched too when missing);
    the others as plain bytes. An index entry whose wire object is missing or wrong (damaged,
    not what the entry says, a chain too deep) is dropped with a warning and its object is
    fetched as plain bytes instead. A missing object on the remote raises
    ``MissingObjectError`` (naming every one, and the file and tensor that need the first)
    before anything of that batch is downloaded. With ``fresh``, verified plain objects are
    left as files in ``tmp_dir/fresh`` and listed there instead of being stored (except the
    delta bases of objects fetched encoded: those must be in the store to decode them): the
    caller can use them at once and must then call ``store_fresh``.
    """
    here = odb.has_many(r.oid for r in wanted.refs)
    lacking = [r for r in sorted(wanted.refs) if r.oid not in here]
    stats = TransferStats(skipped=len(wanted.refs) - len(lacking))
    tmp_dir.mkdir(parents=True, exist_ok=True)
    usable = dict(index or {})
    while True:
        here = odb.has_many(r.oid for r in lacking)
        todo = [r for r in lacking if r.oid not in here and r.oid not in (fresh or {})]
        owners = _owners(todo, usable)
        try:
            with _name_missing(wanted, owners):
                _fetch_planned(odb, remote, wanted, todo, usable, tmp_dir, on_bytes, fresh, stats)
            return stats
        except IntegrityError as err:
            bad = _failed_entries(err, usable, owners)
            if not bad:
                raise
            for oid in bad:
                log.warning(
                    "object %s: its wire index entry (wire object %s) cannot be used: %s; "
                    "fetching its plain bytes instead",
                    oid[:12], usable[oid].wire.oid[:12], err.message,
                )  # fmt: skip
                del usable[oid]


def _fetch_planned(
    odb: ObjectDB,
    remote: ObjectRemote,
    wanted: Wanted,
    todo: Sequence[ObjectRef],
    index: Mapping[str, WireEntry],
    tmp_dir: Path,
    on_bytes: OnBytes | None,
    fresh: dict[str, Path] | None,
    stats: TransferStats,
) -> None:
    """One try: plain objects with the encoded ones that need nothing fetched first, then
    the other encoded ones level by level. With ``fresh``, plain objects stay files there,
    except the delta bases the encoded ones decode through."""
    plain, levels = plan_fetch(todo, index, odb.has)
    bases = {entry.base for level in levels for _, entry in level}
    keep = fresh
    if keep is not None:
        (tmp_dir / "fresh").mkdir(exist_ok=True)

    def sink(ref: ObjectRef, path: Path) -> None:
        if keep is not None and ref.oid not in bases:
            dest = tmp_dir / "fresh" / ref.oid
            os.replace(path, dest)
            keep[ref.oid] = dest
            return
        odb.put(
            ref.oid,
            lambda: _file_chunks(path, odb.config.chunk_bytes),
            size=ref.size,
            itemsize=wanted.itemsizes.get(ref.oid, 1),
            quick=True,
        )

    # encoded objects whose base is local (or that have none) come in the plain objects'
    # batches; the others level by level, after their bases
    first = levels[0] if levels else []
    ready = group_by_wire(p for p in first if p[1].base is None or odb.has(p[1].base))
    later = [[p for p in first if p[1].wire not in ready], *levels[1:]]
    store = functools.partial(store_wire, odb, tmp_dir / "fresh", keep, bases)

    def sink_first(ref: ObjectRef, path: Path) -> None:
        if ref in ready:
            store(ready, ref, path)
        else:
            sink(ref, path)

    if plain or ready:
        checks = {w.oid for w in ready}  # the sink checks each object it takes by its own id
        got = remote.download([*plain, *ready], sink_first, tmp_dir, on_bytes, sink_checks=checks)
        _add(stats, got)
    for level in filter(None, later):
        by_wire = group_by_wire(level)
        checks = {w.oid for w in by_wire}
        store_level = functools.partial(store, by_wire)
        got = remote.download(list(by_wire), store_level, tmp_dir, on_bytes, sink_checks=checks)
        _add(stats, got)


def _failed_entries(
    err: IntegrityError, usable: Mapping[str, WireEntry], owners: Mapping[str, str]
) -> set[str]:
    """Logical ids whose index entry ``err`` condemns: an entry whose wire object is missing
    or bad, and a wanted object whose delta base could not be had (it is then fetched as
    plain bytes itself). When one object of a wire object does not decode, only its own
    entry is condemned (the other members of a bundle are still good)."""
    wire, logical = err.data.get("wire"), err.data.get("oid")
    entry = usable.get(str(logical))
    if not isinstance(err, MissingObjectError) and entry is not None and entry.wire.oid == wire:
        return {entry.oid}
    by_wire: dict[str, set[str]] = {}
    for e in usable.values():
        by_wire.setdefault(e.wire.oid, set()).add(e.oid)
    named = [*err.data.get("oids", ()), err.data.get("oid"), err.data.get("wire")]
    bad = set()
    for oid in filter(None, named):
        if oid in by_wire:
            bad |= by_wire[oid]
        elif owners.get(oid, oid) != oid:
            bad.add(owners[oid])
    if not isinstance(err, MissingObjectError) and wire in by_wire:
        bad.add(str(logical))
    return bad & set(usable)


def _owners(todo: Sequence[ObjectRef], index: Mapping[str, WireEntry]) -> dict[str, str]:
    """For every object a fetch of ``todo`` may download (wire objects and delta bases): the
    wanted object it is downloaded for."""
    owner: dict[str, str] = {}
    for ref in todo:
        cur: str | None = ref.oid
        for _ in range(MAX_CHAIN + 1):
            if cur is None or cur in owner:
                break
            owner[cur] = ref.oid
            entry = index.get(cur)
            if entry is None:
                break
            owner.setdefault(entry.wire.oid, ref.oid)
            cur = entry.base
    return owner


def _add(total: TransferStats, part: TransferStats) -> None:
    total.objects += part.objects
    total.bytes += part.bytes
    total.skipped += part.skipped


@contextmanager
def _name_missing(wanted: Wanted, owners: Mapping[str, str]) -> Iterator[None]:
    """Re-raise a remote's ``MissingObjectError`` with the place the first object is used
    (a wire object or delta base is named through the wanted object it was fetched for)."""
    try:
        yield
    except MissingObjectError as err:
        oids = list(err.data.get("oids", []))
        by_oid = {r.oid: w for r, w in wanted.refs.items()}
        places = [by_oid[owners.get(o, o)].describe() for o in oids if owners.get(o, o) in by_oid]
        if not places or "places" in err.data:
            raise
        data = {**err.data, "places": places[:20]}
        first = owners.get(oids[0], oids[0]) if oids else ""
        what = f" (object {first[:12]})" if oids and first != oids[0] else ""
        raise MissingObjectError(
            f"{err.message}; first needed by {places[0]}{what}", hint=err.hint, **data
        ) from err


def store_fresh(odb: ObjectDB, wanted: Wanted, fresh: Mapping[str, Path]) -> None:
    """Put objects left by ``fetch_objects(fresh=…)`` into the store (their bytes were
    verified on download). The files stay: the caller deletes them when it is done."""
    for oid, path in fresh.items():
        odb.put(
            oid, functools.partial(_file_chunks, path, odb.config.chunk_bytes),
            size=path.stat().st_size, itemsize=wanted.itemsizes.get(oid, 1), quick=True,
        )  # fmt: skip


def _file_chunks(path: Path, size: int) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while True:
            buf = f.read(size)
            if not buf:
                return
            yield buf

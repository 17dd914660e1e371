"""Bundles (issue 19, item 2: a first push at git-lfs speed): a push of many standalone objects
sends their stored files end to end in a few wire objects instead of two requests per tensor;
a fetch stores each member's file as it came, verified, and leaves it decoded for a checkout.
References: the stored files themselves, a greedy packing written out here, sha256."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from conftest import Run, run_in
from potluck.config import RepoConfig
from potluck.errors import FormatError, MissingObjectError
from potluck.ops.vcs import bundle, pushfetch
from potluck.ops.vcs.odb import ObjectDB
from potluck.ops.vcs.pushfetch import Wanted, Where, fetch_objects, push_objects
from potluck.ops.vcs.wire import INDEX_MAGIC, INDEX_MAGIC_V2, WireEntry, dump_index, parse_index
from potluck.remote import ObjectRef, open_remote
from potluck.store.local import LocalStore
from test_sync import FILE, commit_model, sha
from testsupport.servers import LfsServer, lfs_server  # noqa: F401

SMALL_BUNDLE = 64 << 10  # 64 KiB: a few bundles of the objects below
SMALL_MEMBER = 40 << 10  # the 48 KiB object goes alone, as plain bytes


def _db(root: Path) -> ObjectDB:
    return ObjectDB(LocalStore(root), RepoConfig(chunk_bytes=16384), workers=1)


def _blobs(n: int, seed: int = 3) -> list[bytes]:
    """``n`` float32 noise tensors of 1-9 KiB, and one of 48 KiB (over ``SMALL_MEMBER``)."""
    rng = np.random.default_rng(seed)
    out = [rng.standard_normal(256 * (1 + k % 9), dtype=np.float32).tobytes() for k in range(n)]
    out.insert(n // 2, rng.standard_normal(12288, dtype=np.float32).tobytes())
    return out


def _wanted(db: ObjectDB, blobs: list[bytes], base: dict[int, str] | None = None) -> Wanted:
    wanted = Wanted()
    for n, data in enumerate(blobs):
        oid = hashlib.sha256(data).hexdigest()
        b = (base or {}).get(n)
        db.put(oid, lambda d=data: [d], size=len(data), itemsize=4, base_oid=b)
        wanted.refs[ObjectRef(oid, len(data))] = Where(FILE, f"t{n}")
        wanted.itemsizes[oid] = 4
    return wanted


def _greedy(sizes: list[int], limit: int) -> list[list[int]]:
    """The packing a reader expects: in order, a new bundle when the next file would overflow."""
    groups: list[list[int]] = []
    cur: list[int] = []
    for i, s in enumerate(sizes):
        if cur and sum(sizes[j] for j in cur) + s > limit:
            groups.append(cur)
            cur = []
        cur.append(i)
    return [*groups, cur] if cur else groups


@pytest.fixture
def small_bundles(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bundle, "BUNDLE_BYTES", SMALL_BUNDLE)
    monkeypatch.setattr(pushfetch, "BUNDLE_MEMBER_MAX", SMALL_MEMBER)


def _push(tmp_path: Path, blobs: list[bytes]) -> tuple[ObjectDB, Wanted, dict[str, WireEntry]]:
    db = _db(tmp_path / "sender")
    wanted = _wanted(db, blobs)
    remote = open_remote((tmp_path / "remote").as_uri())
    try:
        report = push_objects(db, remote, wanted, encode=True)
    finally:
        remote.close()
    assert report.uploaded == len(blobs) and report.already_there == 0
    return db, wanted, {e.oid: e for e in report.encoded}


def _remote_file(tmp_path: Path, oid: str) -> bytes:
    return next((tmp_path / "remote").rglob(oid)).read_bytes()


def test_a_push_lays_the_stored_files_end_to_end_in_checkpoint_order(
    tmp_path: Path, small_bundles: None
) -> None:
    blobs = _blobs(60)
    db, wanted, index = _push(tmp_path, blobs)
    big = next(r for r in wanted.refs if r.size > SMALL_MEMBER)
    assert big.oid not in index and _remote_file(tmp_path, big.oid) == blobs[30]  # plain, alone
    order = [r.oid for r in wanted.refs if r != big]
    stored = [db.store.open(o).read() for o in order]
    expected = _greedy([len(s) for s in stored], SMALL_BUNDLE)
    assert len(expected) > 3
    wires: list[str] = []
    for group in expected:
        data = b"".join(stored[i] for i in group)
        wire = hashlib.sha256(data).hexdigest()
        wires.append(wire)
        assert _remote_file(tmp_path, wire) == data  # a genuine LFS object: named by its sha256
        offset = 0
        for i in group:
            entry = index[order[i]]
            assert entry.wire == ObjectRef(wire, len(data)) and entry.base is None
            assert entry.span == (None if len(group) == 1 else (offset, len(stored[i])))
            offset += len(stored[i])
    assert sorted(wires) == sorted({e.wire.oid for e in index.values()})
    # no bundled object went under its own (logical) id
    assert not any((tmp_path / "remote").rglob(order[0]))


def test_a_fetch_from_bundles_is_bit_exact_and_keeps_the_encoded_files(
    tmp_path: Path, small_bundles: None
) -> None:
    blobs = _blobs(50)
    db, wanted, index = _push(tmp_path, blobs)
    receiver = _db(tmp_path / "receiver")
    fresh: dict[str, Path] = {}
    remote = open_remote((tmp_path / "remote").as_uri())
    try:
        stats = fetch_objects(receiver, remote, wanted, tmp_path / "tmp", index=index, fresh=fresh)
    finally:
        remote.close()
    assert stats.objects == len({e.wire for e in index.values()}) + 1  # and the big one
    for ref in wanted.refs:
        data = blobs[[r.oid for r in wanted.refs].index(ref.oid)]
        assert fresh[ref.oid].read_bytes() == data
        if ref.oid in index:  # stored as the sender stored it (not encoded again)
            assert receiver.store.open(ref.oid).read() == db.store.open(ref.oid).read()
            assert receiver.read_bytes(ref.oid) == data


def test_a_partial_fetch_stores_only_the_wanted_members(
    tmp_path: Path, small_bundles: None
) -> None:
    blobs = _blobs(40)
    _, wanted, index = _push(tmp_path, blobs)
    some = Wanted({r: w for n, (r, w) in enumerate(wanted.refs.items()) if n % 7 == 0})
    receiver = _db(tmp_path / "receiver")
    remote = open_remote((tmp_path / "remote").as_uri())
    try:
        fetch_objects(receiver, remote, some, tmp_path / "tmp", index=index)
    finally:
        remote.close()
    assert [receiver.has(r.oid) for r in wanted.refs] == [r in some.refs for r in wanted.refs]


def test_delta_objects_and_small_pushes_travel_plain(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    base = [rng.standard_normal(2048, dtype=np.float32) for _ in range(40)]
    db = _db(tmp_path / "sender")
    v1 = _wanted(db, [b.tobytes() for b in base])
    dense = [(b + rng.standard_normal(b.size, dtype=np.float32)).tobytes() for b in base]
    v2 = _wanted(db, dense, base={n: r.oid for n, r in enumerate(v1.refs)})
    assert all(db.header(r.oid).base_oid is not None for r in v2.refs)
    few = _wanted(db, [rng.standard_normal(512, dtype=np.float32).tobytes() for _ in range(5)])
    remote = open_remote((tmp_path / "remote").as_uri())
    try:
        for wanted in (few, v2):  # fewer than BUNDLE_MIN_OBJECTS; deltas (their base not sent)
            report = push_objects(db, remote, wanted, encode=True)
            assert report.bundles == 0 and report.encoded == ()
            assert report.uploaded == len(wanted.refs)
            for r in wanted.refs:  # each under its own id, as plain bytes
                assert _remote_file(tmp_path, r.oid) == db.read_bytes(r.oid)
    finally:
        remote.close()


def test_a_member_that_does_not_decode_is_the_only_one_refused(
    tmp_path: Path, small_bundles: None
) -> None:
    """An index entry whose span holds another member's file (same size, other bytes): that
    object alone falls back to plain bytes, which the remote lacks, and the error names it
    and its tensor; the other members of its bundle stay fetchable through the same index."""
    blobs = _blobs(40)
    _, wanted, index = _push(tmp_path, blobs)
    refs = list(wanted.refs)
    victim, donor = next(
        (a, b)
        for a in refs
        for b in refs
        if a != b and a.size == b.size and index[a.oid].wire == index[b.oid].wire
    )
    index[victim.oid] = WireEntry(victim.oid, index[donor.oid].wire, None, index[donor.oid].span)
    err, receiver = _fetch_all_then_all_but(tmp_path, wanted, index, victim)
    name = wanted.refs[victim].tensor
    assert err.data["oids"] == [victim.oid] and f"tensor {name!r}" in err.message
    assert [r for r in refs if not receiver.has(r.oid)] == [victim]


def _fetch_all_then_all_but(
    tmp_path: Path, wanted: Wanted, index: dict[str, WireEntry], victim: ObjectRef
) -> tuple[MissingObjectError, ObjectDB]:
    """Fetch everything into a new store (which must fail, ``victim`` absent), then all the
    other objects; the error and the store."""
    receiver = _db(tmp_path / "receiver")
    rest = Wanted({r: w for r, w in wanted.refs.items() if r != victim})
    remote = open_remote((tmp_path / "remote").as_uri())
    try:
        with pytest.raises(MissingObjectError) as err:
            fetch_objects(receiver, remote, wanted, tmp_path / "tmp", index=index)
        assert not receiver.has(victim.oid)
        fetch_objects(receiver, remote, rest, tmp_path / "tmp", index=index)
    finally:
        remote.close()
    return err.value, receiver


def test_index_v2_round_trips_and_spans_are_checked() -> None:
    a, b, w = (hashlib.sha256(bytes([n])).hexdigest() for n in range(3))
    wire = ObjectRef(w, 500)
    entries = [WireEntry(a, wire, None, (0, 200)), WireEntry(b, wire, None, (200, 300))]
    text = dump_index(entries)
    assert text.startswith(INDEX_MAGIC_V2) and parse_index(text) == {e.oid: e for e in entries}
    alone = dump_index([WireEntry(a, wire, None)])  # no bundle member: v1, as before
    assert alone == INDEX_MAGIC + f"{a} {w} 500 -\n".encode()
    for bad in (f"{a} {w} 500 - 400 200", f"{a} {w} 500 - -1 200", f"{a} {w} 500 - 0 3"):
        with pytest.raises(FormatError, match="malformed"):
            parse_index(INDEX_MAGIC_V2 + bad.encode() + b"\n")
    with pytest.raises(FormatError, match="malformed"):  # a span needs the v2 header
        parse_index(INDEX_MAGIC + f"{a} {w} 500 - 0 200\n".encode())


def test_git_push_to_lfs_sends_few_requests_and_clones_bit_exact(
    repo: Path,
    git: Run,
    hub: Path,
    lfs_server: LfsServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Real git, giftless on loopback: 60 tensors and the file's structure go in one bundle
    (one upload batch, PUT and verify besides the existence check); a clone is bit-exact."""
    lfs_server.reset()
    (repo / ".lfsconfig").write_text(f'[lfs]\n\turl = "{lfs_server.url}"\n')
    git("git", "add", ".lfsconfig")
    git("git", "commit", "-q", "-m", "lfs endpoint")
    rng = np.random.default_rng(11)
    tensors = {f"t{n:02d}": rng.standard_normal((16, 32), dtype=np.float32) for n in range(60)}
    commit_model(git, repo, tensors, "v1")
    lfs_server.reset_counters()
    git("git", "push", "-q", "origin", "main")
    kinds = [m for m, p, _ in lfs_server.requests if "batch" not in p and "verify" not in p]
    assert kinds == ["PUT"]
    assert sum(1 for _, p, _ in lfs_server.requests if "verify" in p) == 1
    clone = tmp_path / "clone"
    lfs_server.reset_counters()
    run_in(tmp_path)("potluck", "clone", str(hub), str(clone))
    assert sha(clone / FILE) == sha(repo / FILE)
    assert [m for m, p, _ in lfs_server.requests if "batch" not in p] == ["GET"]
    run_in(clone)("potluck", "fsck")


def test_a_damaged_bundle_refuses_only_the_members_it_damages(
    tmp_path: Path, small_bundles: None
) -> None:
    """A flipped byte inside one member of a bundle on the remote: the bundle is not hashed
    on the way in (each member is checked by its own id), so the damaged member alone is
    refused and named, and the bundle's other members are stored."""
    blobs = _blobs(40)
    _, wanted, index = _push(tmp_path, blobs)
    refs = list(wanted.refs)
    victim = next(r for r in refs if index[r.oid].span and index[r.oid].span[0] > 0)
    offset, length = index[victim.oid].span or (0, 0)
    path = next((tmp_path / "remote").rglob(index[victim.oid].wire.oid))
    data = bytearray(path.read_bytes())
    data[offset + length - 5] ^= 0x10  # inside the member's last chunk
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    err, receiver = _fetch_all_then_all_but(tmp_path, wanted, index, victim)
    assert err.data["oids"] == [victim.oid]
    assert [r for r in refs if not receiver.has(r.oid)] == [victim]


def test_an_upload_trusts_a_bundle_hash_but_checks_its_length() -> None:
    """``read_exact`` skips the sha256 of a stream marked as hashed by its maker (a bundle
    just sealed from immutable stored files) and still refuses a short one."""
    import io

    from potluck.errors import IntegrityError
    from potluck.remote.transfer import read_exact

    data = b"x" * 100
    ref = ObjectRef(hashlib.sha256(b"something else").hexdigest(), 100)
    stream = io.BytesIO(data)
    stream.hashed = ref.oid  # type: ignore[attr-defined]
    assert b"".join(read_exact(stream, ref)) == data
    with pytest.raises(IntegrityError, match="hash"):
        list(read_exact(io.BytesIO(data), ref))
    short = io.BytesIO(data[:60])
    short.hashed = ref.oid  # type: ignore[attr-defined]
    with pytest.raises(IntegrityError, match="ended after 60 bytes"):
        list(read_exact(short, ref))


def test_a_host_refusing_the_index_ref_gets_the_bundled_objects_plain(
    repo: Path, git: Run, hub: Path, tmp_path: Path
) -> None:
    """Bundles need the wire index; a host whose hook refuses ``refs/potluck/wire`` gets every
    object as its own plain LFS object instead, and a clone is bit-exact."""
    from test_sync import remote_objects, wire_index

    hook = hub / "hooks" / "update"
    hook.write_text('#!/bin/sh\ncase "$1" in refs/potluck/*) echo "no, thanks"; exit 1;; esac\n')
    hook.chmod(0o755)
    rng = np.random.default_rng(12)
    tensors = {f"t{n:02d}": rng.standard_normal((8, 32), dtype=np.float32) for n in range(40)}
    commit_model(git, repo, tensors, "v1")
    out = git("git", "push", "origin", "main", check=False)
    assert "refused refs/potluck/wire" in out
    assert wire_index(hub) == {}
    from potluck.objects.manifest import parse

    m = parse(run_in(hub)("git", "cat-file", "blob", f"main:{FILE}").encode())
    stored = remote_objects(hub)
    assert all(stored[e.oid] == e.size for e in m.entries)  # every object there, plain
    fresh = tmp_path / "fresh"
    run_in(tmp_path)("potluck", "clone", str(hub), str(fresh))
    assert sha(fresh / FILE) == sha(repo / FILE)

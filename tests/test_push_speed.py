"""A first push asks the Git LFS server one batch per 100 objects and sends each object's
stored chunks without the decode pool; request counts are asserted, never wall time."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from potluck.config import RepoConfig
from potluck.errors import IntegrityError
from potluck.ops.vcs.odb import ObjectDB
from potluck.ops.vcs.pushfetch import Wanted, push_objects
from potluck.remote import ObjectRef, RemoteOptions
from potluck.remote.lfs import LfsRemote
from potluck.store.local import LocalStore
from testsupport.servers import LfsServer

N = 150  # two batches of 100


def _kinds(server: LfsServer) -> Counter[str]:
    return Counter(
        "batch" if "batch" in path else "verify" if "verify" in path else method
        for method, path, _ in server.requests
    )


def _wanted(db: ObjectDB, blobs: list[bytes]) -> Wanted:
    wanted = Wanted()
    for n, data in enumerate(blobs):
        oid = db.put_bytes(data, itemsize=4).oid
        wanted.refs[ObjectRef(oid, len(data))] = _where(n)
        wanted.itemsizes[oid] = 4
    return wanted


def _where(n: int) -> object:
    from potluck.ops.vcs.pushfetch import Where

    return Where("model.safetensors", f"t{n}")


@pytest.fixture
def db(tmp_path: Path) -> ObjectDB:
    return ObjectDB(LocalStore(tmp_path / "objects"), RepoConfig(chunk_bytes=4096), workers=2)


def _blobs(seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)  # float32 noise: stored byte-grouped + zstd
    return [rng.standard_normal(1500 + n, dtype=np.float32).tobytes() for n in range(N)]


def test_first_push_asks_one_batch_per_100_objects(server: LfsServer, db: ObjectDB) -> None:
    server.reset()
    blobs = _blobs(1)
    wanted = _wanted(db, blobs)
    remote = LfsRemote(server.url, RemoteOptions(workers=4))
    server.reset_counters()
    try:
        report = push_objects(db, remote, wanted)
    finally:
        remote.close()
    assert (report.checked, report.uploaded, report.already_there) == (N, N, 0)
    assert _kinds(server) == {"batch": 2, "PUT": N, "verify": N}
    assert server.bytes_received == sum(len(b) for b in blobs)
    stored = {p.name: p.read_bytes() for p in server.storage.rglob("*") if p.is_file()}
    assert {hashlib.sha256(b).hexdigest(): b for b in blobs} == {
        k: v for k, v in stored.items() if k in {hashlib.sha256(b).hexdigest() for b in blobs}
    }
    # a second push: the same single batch round finds everything there, nothing is sent
    again = LfsRemote(server.url, RemoteOptions(workers=4))
    server.reset_counters()
    try:
        second = push_objects(db, again, wanted)
    finally:
        again.close()
    assert (second.uploaded, second.already_there) == (0, N)
    assert _kinds(server) == {"batch": 2}


def test_push_streams_in_the_uploading_thread_without_the_decode_pool(
    server: LfsServer, db: ObjectDB
) -> None:
    server.reset()
    wanted = _wanted(db, _blobs(2)[:3])
    remote = LfsRemote(server.url, RemoteOptions(workers=1))
    calls: list[str] = []
    real = db.read_chunks
    db.read_chunks = lambda oid, **kw: calls.append(oid) or real(oid, **kw)  # type: ignore[method-assign]
    try:
        report = push_objects(db, remote, wanted)
    finally:
        remote.close()
    assert (report.uploaded, calls) == (3, [])  # standalone objects: never through read_chunks


def test_corrupt_raw_chunk_is_not_uploaded(server: LfsServer, db: ObjectDB) -> None:
    server.reset()
    wanted = _wanted(db, [np.random.default_rng(3).bytes(20000)])  # incompressible: raw chunks
    (ref,) = wanted.refs
    path = db.store.path(ref.oid)  # type: ignore[attr-defined]
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF  # the last byte of the last raw chunk: no zstd checksum guards it
    path.chmod(0o644)
    path.write_bytes(bytes(raw))
    remote = LfsRemote(server.url, RemoteOptions(workers=1))
    try:
        with pytest.raises(IntegrityError, match=f"local object {ref.oid} cannot be uploaded"):
            push_objects(db, remote, wanted)
    finally:
        remote.close()
    # giftless keeps what it got of a broken PUT: never the whole object
    sizes = [p.stat().st_size for p in server.storage.rglob(ref.oid)]
    assert all(size < ref.size for size in sizes)


def test_the_pre_push_hook_imports_neither_lineage_nor_httpx_cli() -> None:
    """What git's pre-push hook imports (the hook command, push, the records push) leaves out
    the lineage digests (only computing a digest needs them) and httpx's command-line tool."""
    from test_cli_lazy import loaded_after

    imports = (
        "from potluck.cli import drivers\n"
        "from potluck.git import evalsync, sync\n"
        "from potluck.remote.lfs import LfsRemote"
    )
    assert loaded_after(imports, ("potluck.ops.lineage", "httpx._main", "rich")) == []


def test_encoded_objects_ride_in_the_same_batches(server: LfsServer, db: ObjectDB) -> None:
    """Objects that could travel encoded on their own (here: 10 that compress to far under
    half) are asked for in the push's one existence check together with the others: 160
    objects, 2 batches; then all 150 stored files travel as one bundle (one batch, PUT and
    verify)."""
    server.reset()
    blobs = _blobs(4)
    for n in range(10):  # compressible: a few bytes of noise in zeros
        blobs[n] = bytes(6000) + blobs[n][:8]
    wanted = _wanted(db, blobs)
    remote = LfsRemote(server.url, RemoteOptions(workers=4))
    server.reset_counters()
    try:
        report = push_objects(db, remote, wanted, encode=True)
    finally:
        remote.close()
    assert len(report.encoded) == N and report.uploaded == N and report.bundles == 1
    assert _kinds(server) == {"batch": 3, "PUT": 1, "verify": 1}
    stored = {p.name: p.read_bytes() for p in server.storage.rglob("*") if p.is_file()}
    for entry in report.encoded:  # each object's stored file, under its wire object's sha256
        wire = stored[entry.wire.oid]
        assert hashlib.sha256(wire).hexdigest() == entry.wire.oid
        start, length = entry.span or (0, len(wire))
        assert db.store.open(entry.oid).read() == wire[start : start + length]
    assert len({e.wire for e in report.encoded}) == 1


def test_a_fetch_asks_encoded_objects_without_bases_with_the_plain_ones(
    server: LfsServer, db: ObjectDB, tmp_path: Path
) -> None:
    """A fetch of 150 objects in one bundle asks 1 download batch and 1 GET and stores exactly
    the pushed bytes."""
    from potluck.ops.vcs.pushfetch import fetch_objects

    server.reset()
    blobs = _blobs(5)
    for n in range(10):
        blobs[n] = bytes(6000) + blobs[n][:8]
    wanted = _wanted(db, blobs)
    remote = LfsRemote(server.url, RemoteOptions(workers=4))
    try:
        index = {e.oid: e for e in push_objects(db, remote, wanted, encode=True).encoded}
        assert len(index) == N and len({e.wire for e in index.values()}) == 1
        other = ObjectDB(LocalStore(tmp_path / "other"), RepoConfig(chunk_bytes=4096), workers=2)
        server.reset_counters()
        stats = fetch_objects(other, remote, wanted, tmp_path / "tmp", index=index)
    finally:
        remote.close()
    assert stats.objects == 1 and _kinds(server) == {"batch": 1, "GET": 1}
    assert {hashlib.sha256(b).hexdigest(): b for b in blobs} == {
        r.oid: other.read_bytes(r.oid) for r in wanted.refs
    }

"""Push paths that decide how much work a push (and a later clone) does besides moving bytes:
encoded transfer only when it pays for its wire index, and deltas only when small enough that a
fresh clone fetching their bases too stays near the plain size. Request counts and bytes are
asserted, never wall time."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from potluck.config import RepoConfig
from potluck.ops.vcs.odb import ObjectDB
from potluck.ops.vcs.pushfetch import push_objects
from potluck.ops.vcs.wire import (
    DELTA_RATIO,
    ENCODED_MIN_GAIN,
    ENCODED_RATIO,
    WireEntry,
    encoded_candidate,
    worth_encoding,
)
from potluck.remote import ObjectRef, RemoteOptions
from potluck.remote.lfs import LfsRemote
from potluck.store.local import LocalStore
from test_fetch_fresh import _put, _wanted
from testsupport.servers import LfsServer


@pytest.fixture
def db(tmp_path: Path) -> ObjectDB:
    return ObjectDB(LocalStore(tmp_path / "objects"), RepoConfig(chunk_bytes=16384), workers=1)


def _versions(db: ObjectDB, every: int) -> tuple[ObjectRef, ObjectRef]:
    """v1 (noise) and v2 with every ``every``-th element redrawn, stored as a delta on v1."""
    rng = np.random.default_rng(7)
    v1 = rng.normal(size=16384).astype(np.float32)
    v2 = v1.copy()
    v2[::every] = rng.normal(size=v2[::every].shape).astype(np.float32)
    base = _put(db, v1.tobytes())
    return base, _put(db, v2.tobytes(), base=base.oid)


def _push(server: LfsServer, db: ObjectDB, refs: list[ObjectRef]) -> tuple[object, list[object]]:
    announced: list[object] = []
    remote = LfsRemote(server.url, RemoteOptions(workers=2))
    server.reset_counters()
    try:
        report = push_objects(db, remote, _wanted(refs), encode=True, early=announced.append)
    finally:
        remote.close()
    return report, announced


def _puts(server: LfsServer) -> list[str]:
    return [path.rsplit("/", 1)[-1] for method, path, _ in server.requests if method == "PUT"]


def test_a_few_kib_of_compressible_objects_go_plain_without_an_index(
    server: LfsServer, db: ObjectDB
) -> None:
    """A first push whose only compressible object saves well under 1 % of its bytes (a
    checkpoint's zero biases beside its weights) sends everything plain: no wire object, no
    wire index to publish, and a receiver has nothing to decode."""
    server.reset()
    rng = np.random.default_rng(5)
    noise = [_put(db, rng.normal(size=64 * 1024).astype(np.float32).tobytes()) for _ in range(2)]
    zeros = _put(db, bytes(2048))
    report, announced = _push(server, db, [*noise, zeros])
    assert report.encoded == () and not report.early and announced == []
    assert (report.uploaded, report.already_there) == (3, 0)
    assert sorted(_puts(server)) == sorted(r.oid for r in [*noise, zeros])
    assert server.bytes_received == sum(r.size for r in [*noise, zeros])
    for ref in [*noise, zeros]:  # the remote holds genuine LFS objects of the plain bytes
        data = server.object_path(ref.oid).read_bytes()
        assert hashlib.sha256(data).hexdigest() == ref.oid


def test_compressible_objects_that_save_enough_still_go_encoded(
    server: LfsServer, db: ObjectDB
) -> None:
    server.reset()
    rng = np.random.default_rng(6)
    noise = _put(db, rng.normal(size=16 * 1024).astype(np.float32).tobytes())
    zeros = _put(db, bytes(16 * 1024))  # saves ~16 KiB of ~80 KiB
    report, announced = _push(server, db, [noise, zeros])
    assert [e.oid for e in report.encoded] == [zeros.oid] and report.early
    assert announced == [report.encoded]
    assert sorted(_puts(server)) == sorted([report.encoded[0].wire.oid, noise.oid])


def test_worth_encoding_needs_the_minimum_gain() -> None:
    ref = ObjectRef("a" * 64, 1000)
    entry = WireEntry(ref.oid, ObjectRef("b" * 64, 100), None)  # saves 900 bytes
    plain = int(900 / ENCODED_MIN_GAIN)
    assert worth_encoding([(ref, entry)], plain)
    assert not worth_encoding([(ref, entry)], plain + 1)
    assert not worth_encoding([], 0)


def test_a_dense_delta_goes_plain_a_sparse_one_encoded(db: ObjectDB) -> None:
    """A delta that is over DELTA_RATIO of its object (a dense fine-tuning step) is sent
    plain: a fresh clone would otherwise download its base as well (up to 1.5 times the
    plain bytes) and decode the chain. A small delta still travels encoded."""
    _, dense = _versions(db, 3)
    ratio = db.store.stored_size(dense.oid) / dense.size
    assert DELTA_RATIO < ratio <= ENCODED_RATIO
    assert encoded_candidate(db, dense, lambda _b: True) is None
    base, sparse = _versions(db, 10)
    assert db.store.stored_size(sparse.oid) <= DELTA_RATIO * sparse.size
    entry = encoded_candidate(db, sparse, lambda _b: True)
    assert entry is not None and entry.base == base.oid


def test_a_push_sends_a_dense_delta_as_plain_bytes(server: LfsServer, db: ObjectDB) -> None:
    server.reset()
    base, dense = _versions(db, 3)
    report, announced = _push(server, db, [base, dense])
    assert report.encoded == () and announced == []
    assert sorted(_puts(server)) == sorted([base.oid, dense.oid])
    assert server.bytes_received == base.size + dense.size

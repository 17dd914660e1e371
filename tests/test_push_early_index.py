"""Encoded objects are uploaded first; when their delta bases were already on the remote the
wire index can be published (``early``) while the plain objects upload, against a real
giftless server. A base sent in the same push holds the index back until the end."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from potluck.config import RepoConfig
from potluck.ops.vcs.odb import ObjectDB
from potluck.ops.vcs.pushfetch import PushReport, push_objects
from potluck.ops.vcs.wire import WireEntry
from potluck.remote import ObjectRef, RemoteOptions
from potluck.remote.lfs import LfsRemote
from potluck.store.local import LocalStore
from test_fetch_fresh import _put, _wanted
from testsupport.servers import LfsServer

Calls = list[tuple[tuple[WireEntry, ...], list[str]]]


def _push(server: LfsServer, db: ObjectDB, refs: list[ObjectRef]) -> tuple[PushReport, Calls]:
    calls: Calls = []

    def early(entries: tuple[WireEntry, ...]) -> None:
        puts = [path.rsplit("/", 1)[-1] for method, path, _ in server.requests if method == "PUT"]
        calls.append((entries, puts))

    remote = LfsRemote(server.url, RemoteOptions(workers=2))
    try:
        return push_objects(db, remote, _wanted(refs), encode=True, early=early), calls
    finally:
        remote.close()


def test_index_goes_early_when_no_base_is_in_the_push(server: LfsServer, tmp_path: Path) -> None:
    server.reset()
    rng = np.random.default_rng(3)
    db = ObjectDB(LocalStore(tmp_path / "objects"), RepoConfig(chunk_bytes=16384), workers=1)
    noise = [_put(db, rng.normal(size=4096).astype(np.float32).tobytes()) for _ in range(3)]
    zeros = _put(db, bytes(4 * 4096))
    report, calls = _push(server, db, [*noise, zeros])
    assert report.early and [e.oid for e in report.encoded] == [zeros.oid]
    ((entries, puts_before),) = calls
    assert entries == report.encoded
    assert puts_before == [report.encoded[0].wire.oid]  # the wire object only, no plain one
    puts = [path.rsplit("/", 1)[-1] for method, path, _ in server.requests if method == "PUT"]
    assert sorted(puts[1:]) == sorted(r.oid for r in noise)


def test_index_waits_when_a_base_comes_in_the_same_push(server: LfsServer, tmp_path: Path) -> None:
    server.reset()
    rng = np.random.default_rng(4)
    db = ObjectDB(LocalStore(tmp_path / "objects"), RepoConfig(chunk_bytes=16384), workers=1)
    v1 = rng.normal(size=8192).astype(np.float32)
    v2 = v1.copy()
    v2[::97] += 1
    base = _put(db, v1.tobytes())
    delta = _put(db, v2.tobytes(), base=base.oid)
    report, calls = _push(server, db, [base, delta])
    assert [(e.oid, e.base) for e in report.encoded] == [(delta.oid, base.oid)]
    assert (report.early, calls) == (False, [])

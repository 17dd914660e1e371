"""A checkout's fetch leaves plain objects as verified files ("fresh") even when some objects
come encoded through the wire index: only the encoded objects and their delta bases go into
the store during the download (issue 19: one tiny encoded bias sent every plain object of a
clone through the store's encoder). A standalone encoded object is left decoded too (its
encoded file also goes into the store as it came), so the checkout does not decode it again."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from potluck.config import RepoConfig
from potluck.ops.vcs.odb import ObjectDB
from potluck.ops.vcs.pushfetch import Wanted, Where, fetch_objects, push_objects
from potluck.remote import ObjectRef, open_remote
from potluck.store.local import LocalStore


def _db(root: Path) -> ObjectDB:
    return ObjectDB(LocalStore(root), RepoConfig(chunk_bytes=16384), workers=1)


def _put(db: ObjectDB, data: bytes, base: str | None = None) -> ObjectRef:
    oid = hashlib.sha256(data).hexdigest()
    db.put(oid, lambda: [data], size=len(data), itemsize=4, base_oid=base)
    return ObjectRef(oid, len(data))


def _wanted(refs: list[ObjectRef]) -> Wanted:
    wanted = Wanted()
    for n, ref in enumerate(refs):
        wanted.refs[ref] = Where("model.safetensors", f"t{n}")
        wanted.itemsizes[ref.oid] = 4
    return wanted


def test_plain_objects_stay_fresh_beside_encoded_ones(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    v1 = rng.normal(size=8192).astype(np.float32)
    v2 = v1.copy()
    v2[::97] += 1  # a sparse update: its XOR delta against v1 travels encoded
    other = rng.normal(size=8192).astype(np.float32).tobytes()  # noise: plain
    zeros = bytes(4 * 8192)  # compresses to nothing: encoded, no base
    sender = _db(tmp_path / "sender")
    base = _put(sender, v1.tobytes())
    refs = [
        base,
        _put(sender, v2.tobytes(), base=base.oid),
        _put(sender, other),
        _put(sender, zeros),
    ]
    remote = open_remote((tmp_path / "remote").as_uri())
    try:
        report = push_objects(sender, remote, _wanted(refs), encode=True)
        index = {e.oid: e for e in report.encoded}
        assert set(index) == {refs[1].oid, refs[3].oid}
        receiver = _db(tmp_path / "receiver")
        fresh: dict[str, Path] = {}
        fetch_objects(receiver, remote, _wanted(refs), tmp_path / "tmp", index=index, fresh=fresh)
    finally:
        remote.close()
    # the base v1 went to the store only: v2 decodes through it
    assert set(fresh) == {refs[2].oid, refs[3].oid}
    assert fresh[refs[2].oid].read_bytes() == other
    assert fresh[refs[3].oid].read_bytes() == zeros
    assert [receiver.has(r.oid) for r in refs] == [True, True, False, True]
    assert receiver.read_bytes(refs[1].oid) == v2.tobytes()
    assert receiver.read_bytes(refs[3].oid) == zeros

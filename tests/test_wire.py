"""The wire index and encoded transfer: canonical text, fetch planning against a naive
reference, header checks, and the git-side index (concurrent publishers, refusing hosts)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from conftest import Run, model, run_in, save_st
from potluck.config import RepoConfig
from potluck.errors import CorruptObjectError, FormatError
from potluck.ops.vcs.odb import ObjectDB
from potluck.ops.vcs.wire import (
    INDEX_MAGIC,
    WireEntry,
    dump_index,
    encoded_candidate,
    parse_index,
    plan_fetch,
    store_encoded,
)
from potluck.remote import ObjectRef
from potluck.store.memory import MemoryStore
from test_sync import FILE, commit_model, on_remote, remote_objects, sha, wire_index


def oid(n: int) -> str:
    return hashlib.sha256(str(n).encode()).hexdigest()


def test_index_text_is_canonical_and_round_trips() -> None:
    a = WireEntry(oid(1), ObjectRef(oid(2), 10), oid(3))
    b = WireEntry(oid(4), ObjectRef(oid(5), 7), None)
    text = dump_index([b, a, a])
    first, second = sorted([a, b], key=lambda e: e.oid)
    assert text == INDEX_MAGIC + (first.line() + "\n" + second.line() + "\n").encode()
    assert dump_index([a, b]) == text  # order of input does not matter
    assert parse_index(text) == {a.oid: a, b.oid: b}
    assert b.line() == f"{oid(4)} {oid(5)} 7 -"


@pytest.mark.parametrize(
    "bad",
    [b"nope\n", INDEX_MAGIC + b"abc def 1 -\n", INDEX_MAGIC + f"{oid(1)} {oid(2)} x -\n".encode()],
)
def test_malformed_index_is_refused(bad: bytes) -> None:
    with pytest.raises(FormatError):
        parse_index(bad)


def test_plan_fetch_orders_chains_and_adds_missing_bases() -> None:
    # chain: o3 -> o2 -> o1 (plain on the remote); o5 -> o4 where o4 is already local
    index = {
        oid(3): WireEntry(oid(3), ObjectRef(oid(103), 5), oid(2)),
        oid(2): WireEntry(oid(2), ObjectRef(oid(102), 5), oid(1)),
        oid(5): WireEntry(oid(5), ObjectRef(oid(105), 5), oid(4)),
        oid(6): WireEntry(oid(6), ObjectRef(oid(106), 5), None),
    }
    local = {oid(4)}
    wanted = [ObjectRef(oid(n), 100) for n in (3, 5, 6, 7)]
    plain, levels = plan_fetch(wanted, index, local.__contains__)
    assert plain == [ObjectRef(oid(1), 100), ObjectRef(oid(7), 100)]
    names = [sorted(e.oid for _, e in level) for level in levels]
    assert names == [sorted([oid(2), oid(5), oid(6)]), [oid(3)]]
    # naive reference: every encoded object's base is plain, local or in an earlier level
    ready = set(local) | {r.oid for r in plain}
    for level in levels:
        for _, e in level:
            assert e.base is None or e.base in ready
        ready |= {e.oid for _, e in level}


def _db() -> ObjectDB:
    return ObjectDB(MemoryStore(), RepoConfig(), workers=1)


def _put(db: ObjectDB, data: bytes, base: str | None = None) -> str:
    o = hashlib.sha256(data).hexdigest()
    db.put(o, lambda: [data], size=len(data), itemsize=4, base_oid=base)
    return o


def test_encoded_candidate_and_store_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    v1 = rng.normal(size=4096).astype(np.float32)
    v2 = v1.copy()
    v2[::100] += 1
    sender = _db()
    o1 = _put(sender, v1.tobytes())
    o2 = _put(sender, v2.tobytes(), base=o1)
    ref2 = ObjectRef(o2, v2.nbytes)
    assert encoded_candidate(sender, ref2, lambda b: False) is None  # base not on the remote
    entry = encoded_candidate(sender, ref2, lambda b: b == o1)
    assert entry is not None and entry.base == o1 and entry.wire.size < v2.nbytes // 4
    wire = tmp_path / "wire"
    with sender.store.open(o2) as f:
        wire.write_bytes(f.read())
    assert hashlib.sha256(wire.read_bytes()).hexdigest() == entry.wire.oid
    receiver = _db()
    _put(receiver, v1.tobytes())
    store_encoded(receiver, entry, v2.nbytes, wire)
    assert receiver.read_bytes(o2) == v2.tobytes()
    assert encoded_candidate(sender, ObjectRef(o1, v1.nbytes), lambda b: True) is None  # noise


def test_store_encoded_refuses_a_mismatch_and_keeps_nothing(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    v1 = rng.normal(size=2048).astype(np.float32)
    v2 = v1.copy()
    v2[:10] = 0
    sender = _db()
    o1 = _put(sender, v1.tobytes())
    o2 = _put(sender, v2.tobytes(), base=o1)
    wire = tmp_path / "wire"
    with sender.store.open(o2) as f:
        wire.write_bytes(f.read())
    receiver = _db()
    _put(receiver, v1.tobytes())
    lying = WireEntry(o2, ObjectRef(oid(9), 1), None)  # says standalone; the file has a base
    with pytest.raises(CorruptObjectError, match="does not match the wire index"):
        store_encoded(receiver, lying, v2.nbytes, wire)
    other = oid(8)  # an index entry naming the wrong logical id: decoding disproves it
    with pytest.raises(CorruptObjectError):
        store_encoded(receiver, WireEntry(other, ObjectRef(oid(9), 1), o1), v2.nbytes, wire)
    assert not receiver.has(other) and not receiver.has(o2)


# -- the index in git ---------------------------------------------------------------------------


def sparse_edit(tensors: dict[str, np.ndarray], name: str, seed: int) -> dict[str, np.ndarray]:
    out = {k: v.copy() for k, v in tensors.items()}
    rng = np.random.default_rng(seed)
    flat = out[name].reshape(-1)
    idx = rng.choice(flat.size, max(1, flat.size // 100), replace=False)
    flat[idx] = rng.normal(0, 0.02, idx.size).astype(flat.dtype)
    return out


def test_concurrent_publishers_merge_their_index_entries(
    repo: Path, git: Run, hub: Path, rng, tmp_path: Path
) -> None:
    m1 = model(rng, d=128)
    commit_model(git, repo, m1, "v1")
    git("git", "push", "-q", "origin", "main")
    other = tmp_path / "other"
    run_in(tmp_path)("potluck", "clone", str(hub), str(other))
    o = run_in(other)
    # both clones make a sparse edit on their own branch and push; the second publisher finds
    # the index ref moved and must add its blob on top (fast-forward), not replace the first
    commit_model(git, repo, sparse_edit(m1, "embed", 1), "edit a")
    git("git", "push", "-q", "origin", "main:a")
    o("git", "switch", "-q", "-c", "b")
    commit_model(o, other, sparse_edit(m1, "layers.0.w", 2), "edit b")
    o("git", "push", "-q", "origin", "b")
    index = wire_index(hub)
    for branch in ("a", "b"):
        m = parse_blob(hub, branch)
        carriers = on_remote(hub, m.entries)
        assert any(oid in index and index[oid].base for oid in carriers)  # a delta travelled
    tree = run_in(hub)("git", "ls-tree", "refs/potluck/wire").splitlines()
    # one index blob per push that sent encoded objects: v1's zero biases and header save
    # under 1 % (ENCODED_MIN_GAIN), so it sent everything plain
    assert len(tree) == 2
    for branch in ("a", "b"):
        fresh = tmp_path / f"fresh-{branch}"
        run_in(tmp_path)("potluck", "clone", "-b", branch, str(hub), str(fresh))
        src = repo if branch == "a" else other
        assert sha(fresh / FILE) == sha(src / FILE)


def parse_blob(bare: Path, rev: str):  # type: ignore[no-untyped-def]
    from potluck.objects.manifest import parse

    return parse(run_in(bare)("git", "cat-file", "blob", f"{rev}:{FILE}").encode())


def test_host_refusing_the_index_ref_gets_plain_objects(
    repo: Path, git: Run, hub: Path, rng, tmp_path: Path
) -> None:
    hook = hub / "hooks" / "update"
    hook.write_text('#!/bin/sh\ncase "$1" in refs/potluck/*) echo "no, thanks"; exit 1;; esac\n')
    hook.chmod(0o755)
    m1 = dict(model(rng, d=128), mask=np.zeros(8192, np.float32))  # worth sending encoded
    commit_model(git, repo, m1, "v1")
    out = git("git", "push", "origin", "main", check=False)
    assert "refused refs/potluck/wire" in out
    assert wire_index(hub) == {}
    m = parse_blob(hub, "main")
    stored = remote_objects(hub)
    assert all(stored[e.oid] == e.size for e in m.entries)  # every object there, plain
    commit_model(git, repo, sparse_edit(m1, "embed", 3), "v2")
    git("git", "push", "-q", "origin", "main")
    fresh = tmp_path / "fresh"
    run_in(tmp_path)("potluck", "clone", str(hub), str(fresh))
    assert sha(fresh / FILE) == sha(repo / FILE)
    save_st(tmp_path / "v1.safetensors", m1)
    run_in(fresh)("git", "checkout", "-q", "HEAD~1")
    assert sha(fresh / FILE) == sha(tmp_path / "v1.safetensors")


def test_clone_reads_the_wire_index_its_own_fetch_brought(
    repo: Path, git: Run, hub: Path, rng, tmp_path: Path
) -> None:
    """``potluck clone`` fetches the wire index (and the evaluation records) with the commits:
    its checkout starts no ``git fetch``, yet decodes the objects that only travelled encoded;
    afterwards ``git fetch`` moves the records, not the index."""
    import os
    import subprocess

    m1 = model(rng, d=128)
    commit_model(git, repo, m1, "v1")
    git("git", "push", "-q", "origin", "main")
    commit_model(git, repo, sparse_edit(m1, "embed", 4), "v2")
    git("git", "push", "-q", "origin", "main")
    index = wire_index(hub)
    encoded_only = [o for o in parse_blob(hub, "main").oids() if o in index]
    assert encoded_only and not set(encoded_only) & set(remote_objects(hub))  # no plain copy
    trace = tmp_path / "trace"
    fresh = tmp_path / "fresh"
    env = dict(os.environ, GIT_TRACE=str(trace))
    subprocess.run(["potluck", "clone", str(hub), str(fresh)], cwd=tmp_path, env=env, check=True)
    assert sha(fresh / FILE) == sha(repo / FILE)
    runs = [ln for ln in trace.read_text().splitlines() if "built-in: git " in ln]
    assert sum(" git clone " in ln for ln in runs) == 1
    assert not [ln for ln in runs if " git fetch " in ln]
    refspecs = run_in(fresh)("git", "config", "--get-all", "remote.origin.fetch").split()
    assert refspecs == [
        "+refs/potluck/evals*:refs/potluck/remotes/origin/evals*",
        "+refs/heads/*:refs/remotes/origin/*",
    ]
    assert run_in(fresh)("git", "rev-parse", "refs/potluck/remotes/origin/wire").strip() == (
        run_in(hub)("git", "rev-parse", "refs/potluck/wire").strip()
    )

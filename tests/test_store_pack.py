"""Pack files for small objects (issue 14, item 18): the first add of a file with many small
tensors writes one pack (one fsync) instead of a file per object; every store operation keeps
working on packed objects (the store contract, gc, fsck and its repair, a crash mid-add)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pytest

import test_store_contract as contract
from conftest import Run, save_st
from potluck.errors import UserError
from potluck.objects.manifest import parse
from potluck.store import LocalStore, ObjectStore, validate_oid
from potluck.store.base import raw_oids
from potluck.store.local import PACK_MIN
from potluck.store.pack import ENTRY_SIZE, TAIL_SIZE, Pack, PackWriter

FILE = "m.safetensors"
N = PACK_MIN + 20  # tensors in a file: enough for its add to make a pack


class PackPerWrite(LocalStore):
    """A LocalStore whose every write goes into a pack of its own (the contract, packed)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, pack_min=1)

    @contextmanager
    def _one(self, oid: str) -> Iterator[BinaryIO]:
        with self.batch(), LocalStore.writer(self, oid, durable=False) as f:
            yield f

    def writer(self, oid: str, durable: bool = True) -> AbstractContextManager[BinaryIO]:
        return self._one(validate_oid(oid))


class TestPackedStoreContract(contract.TestStoreContract):
    @pytest.fixture
    def store(self, tmp_path: Path) -> ObjectStore:
        return PackPerWrite(tmp_path / "objects")


def oid_of(i: int) -> tuple[str, bytes]:
    data = f"object {i}".encode() * (i % 7 + 1)
    return contract.oid_of(data), data


def packs(root: Path) -> list[Path]:
    return sorted((root / "pack").glob("*.pack"))


def loose(root: Path) -> set[str]:
    return {p.parent.name + p.name for p in root.glob("??/*") if len(p.name) == 62}


def test_a_batch_is_one_pack_readable_before_it_ends_and_by_other_stores(tmp_path: Path) -> None:
    root = tmp_path / "objects"
    store, other = LocalStore(root), LocalStore(root)
    objs = dict(oid_of(i) for i in range(PACK_MIN))
    assert not other.has(next(iter(objs)))  # ``other`` has read the (absent) pack directory
    with store.batch():
        for oid, data in objs.items():
            with store.writer(oid, durable=False) as f:
                f.write(data)
            assert store.has(oid) and contract.read(store, oid) == data
        assert packs(root) == [] and not other.has(oid)
    assert len(packs(root)) == 1 and loose(root) == set()
    assert list((root / "tmp").iterdir()) == []
    for oid, data in objs.items():  # a pack that appeared since ``other`` last looked
        assert contract.read(other, oid) == data and other.has(oid)
        assert other.stored_size(oid) == len(data)
    assert sorted(other.iter_oids()) == sorted(objs)
    with store.batch():  # a second pack, published in the same clock tick as the first
        for i in range(PACK_MIN, 2 * PACK_MIN):
            oid, data = oid_of(i)
            with store.writer(oid, durable=False) as f:
                f.write(data)
    assert len(packs(root)) == 2 and contract.read(other, oid) == data and other.has(oid)


def test_add_many_keeps_the_first_of_each_id_and_indexes_what_add_would(tmp_path: Path) -> None:
    """``PackWriter.add_many`` (records built in bulk) writes the pack ``add`` one by one
    writes: the first bytes of an id win, within one call and against earlier ones, and the
    finished pack's index finds every object at its bytes."""
    objs = [oid_of(i) for i in range(40)]
    raw = [(bytes.fromhex(oid), data) for oid, data in objs]
    bulk, single = PackWriter(tmp_path / "a"), PackWriter(tmp_path / "b")
    calls = [raw[:5], [*raw[5:20], (raw[7][0], b"not these"), raw[2]], [], raw[20:]]
    for call in calls:
        bulk.add_many(call)
        for digest, data in call:
            single.add(digest, data)
    assert bulk.objects() == single.objects() and len(bulk) == len(objs)
    done = [w.finish(tmp_path / f"pack-{i}") for i, w in enumerate((bulk, single))]
    assert done[0] is not None and done[1] is not None
    assert done[0].read_bytes() == done[1].read_bytes()
    pack = Pack.load(done[0])
    assert pack.problem is None
    for digest, data in raw:
        at = pack.find(digest)
        assert at is not None and pack.read(*at) == data


def test_a_forgotten_object_is_left_out_of_the_index(tmp_path: Path) -> None:
    """The index is the sorted entries of what was added (packed as it is added); after
    ``forget`` it is rebuilt from what is left: the same bytes as a pack that never had it."""
    objs = [(bytes.fromhex(oid), data) for oid, data in (oid_of(i) for i in range(30))]
    kept, gone = [*objs[:10], *objs[11:]], objs[10]
    forgetting, reference = PackWriter(tmp_path / "a"), PackWriter(tmp_path / "b")
    forgetting.add_many(objs)
    assert forgetting.forget(gone[0]) and not forgetting.forget(gone[0])
    for digest, data in objs:
        reference.add(digest, data)
    reference.forget(gone[0])
    done = [w.finish(tmp_path / f"pack-{i}") for i, w in enumerate((forgetting, reference))]
    assert done[0] is not None and done[1] is not None
    pack = Pack.load(done[0])
    assert pack.problem is None and pack.find(gone[0]) is None
    assert [pack.read(*at) for at in map(pack.find, (d for d, _ in kept)) if at] == [
        data for _, data in kept
    ]
    ids = sorted(d for d, _ in kept)
    index = done[0].read_bytes()[-(len(ids) * ENTRY_SIZE + TAIL_SIZE) : -TAIL_SIZE]
    assert [index[i : i + 32] for i in range(0, len(index), ENTRY_SIZE)] == ids


def test_raw_oids_are_the_digests_of_valid_ids_and_name_the_first_bad_one() -> None:
    oids = [oid_of(i)[0] for i in range(5)]
    assert raw_oids(oids) == (oids, [bytes.fromhex(o) for o in oids])
    assert raw_oids([]) == ([], [])
    for bad in ("0" * 62 + "  ", oids[0].upper(), "0" * 63 + "g"):
        with pytest.raises(UserError, match=f"invalid object id {bad!r}"):
            raw_oids([*oids, bad, "also bad"])


def test_a_small_batch_is_written_as_loose_files(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    objs = dict(oid_of(i) for i in range(PACK_MIN - 1))
    with store.batch():
        for oid, data in objs.items():
            with store.writer(oid, durable=False) as f:
                f.write(data)
    assert packs(tmp_path) == [] and loose(tmp_path) == set(objs)


def test_a_batch_that_raises_leaves_nothing(tmp_path: Path) -> None:
    store = LocalStore(tmp_path, pack_min=1)
    oid, data = oid_of(1)
    with pytest.raises(RuntimeError, match="boom"), store.batch():
        with store.writer(oid, durable=False) as f:
            f.write(data)
        raise RuntimeError("boom")
    assert not store.has(oid) and packs(tmp_path) == []
    assert list((tmp_path / "tmp").iterdir()) == []


def test_delete_many_rewrites_a_pack_once_keeping_its_time_and_the_rest(tmp_path: Path) -> None:
    store = LocalStore(tmp_path, pack_min=1)
    objs = dict(oid_of(i) for i in range(10))
    with store.batch():
        for oid, data in objs.items():
            with store.writer(oid, durable=False) as f:
                f.write(data)
    (old,) = packs(tmp_path)
    then = time.time() - 3600
    os.utime(old, (then, then))
    doomed = sorted(objs)[:4]
    assert store.delete_many(doomed, keep_newer_than=then - 1) == []  # written after: kept
    assert store.delete_many(doomed, keep_newer_than=then + 1) == doomed
    (new,) = packs(tmp_path)
    assert new != old and new.stat().st_mtime == pytest.approx(then)
    assert sorted(store.iter_oids()) == sorted(set(objs) - set(doomed))
    for oid in set(objs) - set(doomed):
        assert contract.read(LocalStore(tmp_path), oid) == objs[oid]
    assert store.delete_many(sorted(objs)) == sorted(set(objs) - set(doomed))
    assert packs(tmp_path) == [] and list(store.iter_oids()) == []


# --- in a repository ----------------------------------------------------------------------------


def many(rng: np.random.Generator, n: int, width: int = 64) -> dict[str, np.ndarray]:
    return {f"layers.{i:05d}.w": rng.normal(size=width).astype(np.float32) for i in range(n)}


def store_root(repo: Path) -> Path:
    return repo / ".git" / "potluck" / "objects"


def allocated(root: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in root.rglob("*") if p.is_file())


def staged_oids(git: Run) -> set[str]:
    return set(parse(git("git", "cat-file", "blob", f":{FILE}").encode()).oids())


def packed_oids(repo: Path) -> set[str]:
    return {oid for p in packs(store_root(repo)) for oid, _, _ in Pack.load(p).entries()}


def test_first_add_of_many_small_tensors_makes_one_pack_near_the_data_size(
    repo: Path, git: Run, rng: np.random.Generator
) -> None:
    """Before: one file per object, a 4 KiB block each: 3.47x the data on disk (1100-byte
    tensors). Now one pack: the data plus ~100 bytes per object."""
    data = save_st(repo / FILE, many(rng, 1000, width=275))
    git("git", "add", FILE)
    root = store_root(repo)
    assert len(packs(root)) == 1 and loose(root) == set()
    assert packed_oids(repo) == staged_oids(git)
    assert allocated(root) <= 1.2 * len(data) + (64 << 10), (allocated(root), len(data))
    git("git", "commit", "-q", "-m", "v1")
    (repo / FILE).unlink()
    git("git", "checkout", "--", FILE)
    assert (repo / FILE).read_bytes() == data
    assert git("potluck", "fsck") == "ok: all objects verified\n"


def test_gc_drops_dead_packed_objects_after_the_grace_period_and_keeps_live_ones(
    repo: Path, git: Run, rng: np.random.Generator
) -> None:
    t = many(rng, N)
    save_st(repo / FILE, t)
    git("git", "add", FILE)
    v1 = staged_oids(git)
    changed = sorted(t)[: N // 2]
    t.update({name: rng.normal(size=64).astype(np.float32) for name in changed})
    data = save_st(repo / FILE, t)
    git("git", "add", FILE)  # v1's objects of the changed tensors are now unreferenced
    v2 = staged_oids(git)
    dead = v1 - v2
    assert len(dead) == N // 2 and len(packs(store_root(repo))) == 1  # v2's 60: written loose
    rep = json.loads(git("potluck", "gc", "--json"))
    assert (rep["removed"], rep["recent"]) == (0, len(dead))  # within the grace period
    rep = json.loads(git("potluck", "gc", "--prune=now", "--json"))
    assert (rep["removed"], rep["kept"]) == (len(dead), len(v2))
    assert packed_oids(repo) == v1 - dead and loose(store_root(repo)) == v2 - v1
    assert git("potluck", "fsck") == "ok: all objects verified\n"
    git("git", "commit", "-q", "-m", "v2")
    (repo / FILE).unlink()
    git("git", "checkout", "--", FILE)
    assert (repo / FILE).read_bytes() == data


def committed_many(repo: Path, git: Run, rng: np.random.Generator) -> tuple[bytes, list[str]]:
    """A file of N small tensors committed and pushed; its bytes and its objects in the order
    of the pack's records (the header, then the tensors)."""
    data = save_st(repo / FILE, many(rng, N))
    git("git", "add", FILE)
    git("git", "commit", "-q", "-m", "v1")
    git("git", "push", "-q", "origin", "main")
    m = parse(git("git", "cat-file", "blob", f"HEAD:{FILE}").encode())
    return data, [e.oid for e in m.entries]


def test_a_flipped_byte_and_a_torn_tail_of_a_pack_are_found_and_repaired(
    repo: Path, git: Run, hub: Path, rng: np.random.Generator
) -> None:
    """A pack cut short (its index, its tail and half its last object gone) is read from its
    records: only the cut object is missing. A flipped byte in a packed object fails its hash.
    ``fsck --repair`` rebuilds the pack, quarantines the corrupt object and fetches both."""
    data, oids = committed_many(repo, git, rng)
    (pack_path,) = packs(store_root(repo))
    pack = Pack.load(pack_path)
    victim, last = oids[7], oids[-1]
    v_off, v_len = pack.find(bytes.fromhex(victim)) or (0, 0)
    l_off, l_len = pack.find(bytes.fromhex(last)) or (0, 0)
    raw = bytearray(pack_path.read_bytes()[: l_off + l_len // 2])
    raw[v_off + v_len - 10] ^= 0xFF
    pack_path.chmod(0o644)
    pack_path.write_bytes(bytes(raw))
    r = subprocess.run(["potluck", "fsck"], cwd=repo, capture_output=True, text=True)
    assert f"corrupt object {victim[:12]}: object {victim[:12]} is corrupt: its content" in r.stdout
    assert f"missing object {last[:12]}: object is not in the store" in r.stdout
    assert r.stdout.endswith("2 problems; `potluck fsck --repair` fixes what can be fixed here\n")
    assert r.stderr == (
        f"potluck: pack {pack_path.name} is damaged (the index is missing or cut short): "
        "read from its records\n"
    )
    r = subprocess.run(["potluck", "fsck", "--repair"], cwd=repo, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == (
        f"repacked pack {pack_path.name}: the index is missing or cut short; rewritten with the "
        f"{N} whole objects it held, moved to quarantine"
    )
    assert lines[1].startswith(f"quarantined {victim[:12]}: object {victim[:12]} is corrupt")
    assert lines[2:] == [f"fetched: 1 objects from file://{hub}/lfs"] * 2 + [
        "1 damaged objects are kept in .git/potluck/objects/quarantine (delete them when you no "
        "longer need them)",
        "ok: repository healthy",
    ]
    qdir = store_root(repo) / "quarantine"
    q = {p.name.split(".")[0]: p.read_bytes() for p in qdir.iterdir() if p.suffix != ".why"}
    assert q == {victim: raw[v_off : v_off + v_len], pack_path.stem: bytes(raw)}
    assert packed_oids(repo) == set(oids) - {victim, last}
    assert loose(store_root(repo)) == {victim, last}
    assert all(Pack.load(p).problem is None for p in packs(store_root(repo)))
    assert git("potluck", "fsck") == "ok: all objects verified\n"
    (repo / FILE).unlink()
    git("git", "checkout", "--", FILE)
    assert (repo / FILE).read_bytes() == data


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def filter_pid(git_pid: int) -> int | None:
    """The pid of the potluck filter process under git (git runs it through ``sh -c``)."""
    todo = children(git_pid)
    while todo:
        pid = todo.pop()
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"filter-process" in argv and not argv[0].endswith(b"sh"):
            return pid
        todo += children(pid)
    return None


def kill_filter_mid_pack(repo: Path) -> bool:
    """Run ``git add`` and kill -9 its filter once the pack is being written; return whether
    the kill came before the add finished."""
    tmp = store_root(repo) / "tmp"
    proc = subprocess.Popen(["git", "add", FILE], cwd=repo, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        partial = [p for p in tmp.glob("pack-*.tmp") if p.stat().st_size > 64 << 10]
        pid = filter_pid(proc.pid)
        if partial and pid is not None:
            os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.communicate(timeout=120)
    return proc.returncode != 0


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc")
@pytest.mark.parametrize(
    "n", [1500, pytest.param(20000, marks=pytest.mark.heavy)], ids=["1.5k", "20k"]
)
def test_kill_9_during_a_many_tensor_add_leaves_no_trusted_partial_pack(
    repo: Path, git: Run, rng: np.random.Generator, n: int
) -> None:
    data = save_st(repo / FILE, many(rng, n, width=275))
    killed = kill_filter_mid_pack(repo)
    root = store_root(repo)
    assert killed and packs(root) == [] and loose(root) == set()  # nothing published
    assert len(list((root / "tmp").glob("pack-*.tmp"))) == 1  # the leftover, for clean_tmp
    assert git("potluck", "fsck") == "ok: all objects verified\n"
    git("git", "add", FILE)
    git("git", "commit", "-q", "-m", "v1")
    assert len(packs(root)) == 1 and all(Pack.load(p).problem is None for p in packs(root))
    (repo / FILE).unlink()
    git("git", "checkout", "--", FILE)
    assert (repo / FILE).read_bytes() == data
    assert git("potluck", "fsck") == "ok: all objects verified\n"


def open_packs() -> int:
    """How many pack files this process has open."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").endswith(".pack")
        except OSError:
            continue
    return count


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_open_pack_files_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A store with thousands of packs must not run out of file descriptors: at most
    ``MAX_OPEN_PACKS`` stay open (3 here); packs another store removed meanwhile do not
    disturb reading the others."""
    from potluck.store import pack as pack_mod

    monkeypatch.setattr(pack_mod._OPEN, "limit", 3)
    store = LocalStore(tmp_path, pack_min=1)
    objs = dict(oid_of(i) for i in range(6))
    for oid, data in objs.items():  # six packs of one object each
        with store.batch(), store.writer(oid, durable=False) as f:
            f.write(data)
    before = open_packs()
    reader = LocalStore(tmp_path)
    for oid, data in objs.items():
        assert contract.read(reader, oid) == data
        assert open_packs() - before <= 3
    gone = sorted(objs)[-1]
    assert LocalStore(tmp_path).delete_many([gone]) == [gone]
    assert not reader.has(gone) and len(packs(tmp_path)) == 5
    for oid, data in objs.items():
        if oid != gone:
            assert contract.read(reader, oid) == data


def test_merge_packs_makes_one_with_the_newest_time(tmp_path: Path) -> None:
    """Every lookup searches every pack: gc merges them once there are ``PACK_MERGE_AT``."""
    from potluck.store.local import PACK_MERGE_AT

    store = LocalStore(tmp_path, pack_min=1)
    objs = dict(oid_of(i) for i in range(PACK_MERGE_AT))
    for i, (oid, data) in enumerate(objs.items()):
        before = set(packs(tmp_path))
        with store.batch(), store.writer(oid, durable=False) as f:
            f.write(data)
        (new,) = set(packs(tmp_path)) - before
        os.utime(new, (1_000_000_000 + i,) * 2)
    assert store.merge_packs(PACK_MERGE_AT + 1) == 0 and len(packs(tmp_path)) == PACK_MERGE_AT
    assert store.merge_packs() == PACK_MERGE_AT
    (merged,) = packs(tmp_path)
    assert merged.stat().st_mtime == 1_000_000_000 + PACK_MERGE_AT - 1
    reader = LocalStore(tmp_path)
    assert sorted(reader.iter_oids()) == sorted(objs)
    for oid, data in objs.items():
        assert contract.read(reader, oid) == data and contract.read(store, oid) == data


def test_records_are_synced_ahead_and_finish_still_syncs_the_whole_pack(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every ``SYNC_AHEAD`` bytes of records a background ``fdatasync`` starts (never two at
    once); ``finish`` waits for it and fsyncs the whole file before the rename."""
    import os

    import potluck.store.pack as pack_mod

    calls: list[str] = []
    real_datasync, real_fsync = os.fdatasync, os.fsync
    monkeypatch.setattr(pack_mod, "SYNC_AHEAD", 5000)
    monkeypatch.setattr(os, "fdatasync", lambda fd: calls.append("ahead") or real_datasync(fd))
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append("fsync") or real_fsync(fd))
    objs = [(bytes.fromhex(oid), data * 100) for oid, data in (oid_of(i) for i in range(40))]
    writer = PackWriter(tmp_path / "tmp")
    for k in range(0, 40, 4):
        writer.add_many(objs[k : k + 4])
    done = writer.finish(tmp_path / "pack")
    assert done is not None and calls[-1] == "fsync" and calls.count("fsync") == 1
    assert 1 <= calls.count("ahead") <= sum(len(d) for _, d in objs) // 5000
    pack = Pack.load(done)
    assert pack.problem is None
    assert all(pack.read(*at) == data for d, data in objs if (at := pack.find(d)))


def test_a_failed_background_sync_fails_the_durable_finish(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno
    import os

    import potluck.store.pack as pack_mod

    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(pack_mod, "SYNC_AHEAD", 100)
    monkeypatch.setattr(os, "fdatasync", broken)
    writer = PackWriter(tmp_path / "tmp")
    writer.add_many([(bytes.fromhex(oid), data * 10) for oid, data in map(oid_of, range(5))])
    with pytest.raises(OSError, match="Input/output error"):
        writer.finish(tmp_path / "pack")
    writer.discard()
    assert not list((tmp_path / "tmp").iterdir()) and not (tmp_path / "pack").exists()

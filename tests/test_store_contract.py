"""One contract, every object store: LocalStore and MemoryStore must behave the same."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from potluck.errors import MissingObjectError, UserError
from potluck.store import LocalStore, MemoryStore, ObjectStore

SRC = Path(__file__).resolve().parents[1] / "src"


def oid_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def put(store: ObjectStore, oid: str, data: bytes) -> None:
    with store.writer(oid) as f:
        f.write(data)


def read(store: ObjectStore, oid: str) -> bytes:
    with store.open(oid) as f:
        return f.read()


def files_outside_tmp(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and "tmp" not in p.relative_to(root).parts]


@pytest.fixture(params=["local", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    if request.param == "local":
        yield LocalStore(tmp_path / "objects")
    else:
        yield MemoryStore()


class TestStoreContract:
    def test_put_has_open_size(self, store: ObjectStore) -> None:
        data = b"hello object" * 100
        oid = oid_of(data)
        assert not store.has(oid)
        put(store, oid, data)
        assert store.has(oid)
        assert read(store, oid) == data
        assert store.stored_size(oid) == len(data)

    @pytest.mark.parametrize("batched", [False, True])
    def test_write_many_and_has_many(self, store: ObjectStore, batched: bool) -> None:
        """``write_many`` is ``writer`` of each (first write wins, also within one call) and
        ``has_many`` is ``has`` of each; inside ``batch()`` the objects are readable at once."""
        first = b"kept" * 9
        put(store, oid_of(first), first)
        blobs = [(oid_of(bytes([i]) * 50), bytes([i]) * 50) for i in range(150)]
        again = [(oid_of(first), b"not these bytes"), blobs[3], (blobs[3][0], b"nor these")]
        with store.batch() if batched else contextlib.nullcontext():
            store.write_many([*blobs, *again], durable=not batched)
            assert store.has_many([o for o, _ in blobs]) == {o for o, _ in blobs}
        wanted = [oid_of(first), blobs[0][0], oid_of(b"absent"), blobs[149][0]]
        assert (
            store.has_many(wanted)
            == {w for w in wanted if store.has(w)}
            == set(wanted) - {oid_of(b"absent")}
        )
        assert read(store, oid_of(first)) == first
        assert all(read(store, o) == data for o, data in blobs)

    def test_iter_and_delete(self, store: ObjectStore) -> None:
        blobs = {oid_of(bytes([i])): bytes([i]) * (i + 1) for i in range(5)}
        for oid, data in blobs.items():
            put(store, oid, data)
        assert sorted(store.iter_oids()) == sorted(blobs)
        victim = next(iter(blobs))
        assert store.delete(victim) is True
        assert store.delete(victim) is False
        assert not store.has(victim)
        assert sorted(store.iter_oids()) == sorted(set(blobs) - {victim})
        for oid in list(store.iter_oids()):
            store.delete(oid)
        assert list(store.iter_oids()) == []

    def test_empty_object(self, store: ObjectStore) -> None:
        oid = oid_of(b"")
        put(store, oid, b"")
        assert store.has(oid) and read(store, oid) == b"" and store.stored_size(oid) == 0

    def test_duplicate_put_keeps_first(self, store: ObjectStore) -> None:
        oid = oid_of(b"first")
        put(store, oid, b"first")
        put(store, oid, b"second, longer")
        assert read(store, oid) == b"first"
        assert list(store.iter_oids()) == [oid]

    def test_exception_in_writer_leaves_nothing(self, store: ObjectStore, tmp_path: Path) -> None:
        oid = oid_of(b"doomed")
        with pytest.raises(RuntimeError, match="boom"), store.writer(oid) as f:
            f.write(b"half of it")
            raise RuntimeError("boom")
        assert not store.has(oid)
        assert list(store.iter_oids()) == []
        assert files_outside_tmp(tmp_path) == []
        if isinstance(store, LocalStore):
            assert list((store.root / "tmp").iterdir()) == []
        put(store, oid, b"doomed")
        assert read(store, oid) == b"doomed"

    def test_writer_is_seekable(self, store: ObjectStore) -> None:
        oid = oid_of(b"HEADbody")
        with store.writer(oid) as f:
            start = f.tell()
            f.write(b"xxxxbody")
            f.seek(start)
            f.write(b"HEAD")
            f.seek(0, os.SEEK_END)
        assert read(store, oid) == b"HEADbody"

    @pytest.mark.parametrize(
        "bad", ["", "abc", "A" * 64, "g" * 64, "0" * 63, "0" * 65, "0" * 62 + "  ", None]
    )
    def test_invalid_oid(self, store: ObjectStore, bad: object) -> None:
        for call in (store.has, store.open, store.stored_size, store.delete, store.writer):
            with pytest.raises(UserError, match="invalid object id"):
                call(bad)  # type: ignore[arg-type]
        good = oid_of(b"fine")
        for many in (
            lambda: store.has_many([good, bad]),  # type: ignore[list-item]
            lambda: store.write_many([(good, b"fine"), (bad, b"x")]),  # type: ignore[list-item]
        ):
            with pytest.raises(UserError, match=f"invalid object id {bad!r}"):
                many()

    def test_missing_oid(self, store: ObjectStore) -> None:
        oid = oid_of(b"nowhere")
        with pytest.raises(MissingObjectError, match=f"object {oid} is missing") as e:
            store.open(oid)
        assert e.value.data["oid"] == oid and e.value.hint
        with pytest.raises(MissingObjectError, match=oid):
            store.stored_size(oid)

    def test_satisfies_protocol(self, store: ObjectStore) -> None:
        assert isinstance(store, ObjectStore)


# --- LocalStore specifics -----------------------------------------------------------------------


def test_local_layout(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    oid = oid_of(b"x")
    put(store, oid, b"x")
    assert (tmp_path / oid[:2] / oid[2:]).read_bytes() == b"x"
    (tmp_path / "zz").mkdir()
    (tmp_path / oid[:2] / "stray.txt").write_text("not an object")
    assert list(store.iter_oids()) == [oid]


def test_local_missing_root(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "absent")
    assert list(store.iter_oids()) == []
    assert store.clean_tmp(0) == 0
    assert not store.has(oid_of(b""))


KILL_MID_WRITE = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from potluck.store.local import LocalStore
    store = LocalStore(Path(sys.argv[1]))
    cm = store.writer(sys.argv[2])  # keep a reference: collecting it would close the writer
    f = cm.__enter__()
    f.write(b"half an object")
    f.flush()
    os._exit(1)
    """
)


def test_local_kill_mid_write(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    data = b"a whole object"
    oid = oid_of(data)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, "-c", KILL_MID_WRITE, str(tmp_path), oid], env=env, check=False
    )
    assert proc.returncode == 1
    assert not store.has(oid)
    assert list(store.iter_oids()) == []
    assert files_outside_tmp(tmp_path) == []
    leftovers = list((tmp_path / "tmp").iterdir())
    assert len(leftovers) == 1 and leftovers[0].read_bytes() == b"half an object"
    put(store, oid, data)
    assert read(store, oid) == data
    assert store.clean_tmp(older_than_s=3600) == 0
    assert store.clean_tmp(older_than_s=0) == 1
    assert list((tmp_path / "tmp").iterdir()) == []
    assert read(store, oid) == data

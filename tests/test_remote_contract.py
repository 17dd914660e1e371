"""One contract, every object remote: file://, s3:// (moto), memory:// and Git LFS (giftless).

Every backend talks to a real server on loopback (or a real directory); nothing is mocked.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import fsspec
import pytest

from potluck.errors import IntegrityError, MissingObjectError, UserError
from potluck.remote import (
    REMOTES,
    ObjectRef,
    ObjectRemote,
    RemoteOptions,
    TransferStats,
    open_remote,
)
from potluck.remote.transfer import CHUNK
from testsupport.servers import LfsServer, MotoS3, lfs_server, moto_s3  # noqa: F401

FAST = RemoteOptions(workers=4, batch_size=100, retries=3, backoff=0.01, timeout=30)
_memory_roots = itertools.count(1)


def ref_of(data: bytes) -> ObjectRef:
    return ObjectRef(hashlib.sha256(data).hexdigest(), len(data))


def blobs(*sizes: int, seed: int = 0) -> dict[ObjectRef, bytes]:
    """Distinct pseudo-random objects of the given sizes."""
    out = {}
    for i, size in enumerate(sizes):
        data = hashlib.sha256(f"{seed}/{i}".encode()).digest() * (size // 32 + 1)
        out[ref_of(data[:size])] = data[:size]
    return out


def opener(
    objects: dict[ObjectRef, bytes],
) -> Callable[[ObjectRef], AbstractContextManager[BinaryIO]]:
    return lambda ref: closing(io.BytesIO(objects[ref]))


@dataclass
class Collector:
    """A sink that copies what it is given and checks where it came from."""

    tmp_dir: Path
    got: dict[ObjectRef, bytes] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, ref: ObjectRef, path: Path) -> None:
        assert path.parent == self.tmp_dir and path.name == f"{ref.oid}.part"
        data = path.read_bytes()
        with self.lock:
            assert ref not in self.got
            self.got[ref] = data


@dataclass
class Backend:
    """A remote URL plus a way to tamper with what the server stores."""

    name: str
    url: str
    storage_options: dict[str, Any] | None
    overwrite: Callable[[str, bytes], None]  # replace the stored bytes of an oid
    lfs: LfsServer | None = None

    def open(self, options: RemoteOptions = FAST) -> ObjectRemote:
        return open_remote(self.url, options=options, storage_options=self.storage_options)


def fsspec_key(root: str, oid: str) -> str:
    return f"{root}/objects/{oid[:2]}/{oid[2:4]}/{oid}"


@pytest.fixture(params=["file", "memory", "s3", "lfs"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    kind = request.param
    if kind == "file":
        root = tmp_path / "remote"

        def overwrite_file(oid: str, data: bytes) -> None:
            Path(fsspec_key(str(root), oid)).write_bytes(data)

        yield Backend(kind, root.as_uri(), None, overwrite_file)
    elif kind == "memory":
        root_m = f"/contract{next(_memory_roots)}"
        fs = fsspec.filesystem("memory")
        yield Backend(
            kind, f"memory://{root_m}", None, lambda o, d: fs.pipe_file(fsspec_key(root_m, o), d)
        )
        fs.rm(root_m, recursive=True) if fs.exists(root_m) else None
    elif kind == "s3":
        s3: MotoS3 = request.getfixturevalue("moto_s3")
        bucket = s3.create_bucket()
        client = s3.client()

        def overwrite_s3(oid: str, data: bytes) -> None:
            client.put_object(Bucket=bucket, Key=fsspec_key("pre/fix", oid), Body=data)

        yield Backend(kind, f"s3://{bucket}/pre/fix", s3.storage_options(), overwrite_s3)
    else:
        server: LfsServer = request.getfixturevalue("lfs_server")
        server.reset()

        def overwrite_lfs(oid: str, data: bytes) -> None:
            server.object_path(oid).write_bytes(data)

        yield Backend(kind, server.url, None, overwrite_lfs, lfs=server)


@pytest.fixture
def remote(backend: Backend) -> Iterator[ObjectRemote]:
    r = backend.open()
    yield r
    r.close()


def stray_files(tmp_dir: Path) -> list[Path]:
    return sorted(tmp_dir.rglob("*")) if tmp_dir.exists() else []


class TestRemoteContract:
    def test_satisfies_protocol(self, remote: ObjectRemote, backend: Backend) -> None:
        assert isinstance(remote, ObjectRemote)
        assert remote.url == backend.url

    def test_missing_on_empty_remote_returns_all_in_order(self, remote: ObjectRemote) -> None:
        refs = list(blobs(5, 0, 70))
        assert remote.missing(refs) == refs
        assert remote.missing(list(reversed(refs))) == list(reversed(refs))
        assert remote.missing([]) == []

    def test_upload_then_nothing_missing_and_second_upload_skips(
        self, remote: ObjectRemote, backend: Backend
    ) -> None:
        objects = blobs(0, 1, 1000, 2 * CHUNK + 3)
        total = sum(len(b) for b in objects.values())
        stats = remote.upload(list(objects), opener(objects))
        assert stats == TransferStats(objects=4, bytes=total, skipped=0)
        assert remote.missing(list(objects)) == []
        again = remote.upload(list(objects), opener(objects))
        assert again == TransferStats(objects=0, bytes=0, skipped=4)
        if backend.lfs is not None:
            assert backend.lfs.bytes_received == total  # the second upload sent nothing
            assert all(backend.lfs.object_path(r.oid).read_bytes() == objects[r] for r in objects)

    def test_upload_only_what_is_missing(self, remote: ObjectRemote) -> None:
        objects = blobs(10, 20, 30)
        first = list(objects)[:1]
        remote.upload(first, opener(objects))
        stats = remote.upload(list(objects), opener(objects))
        assert (stats.objects, stats.skipped, stats.bytes) == (2, 1, 50)
        assert remote.missing(list(objects)) == []

    @pytest.mark.parametrize("sizes", [(0,), (1,), (CHUNK,), (0, 1, 3 * CHUNK + 123, 5 * CHUNK)])
    def test_download_round_trips_bit_for_bit(
        self, remote: ObjectRemote, tmp_path: Path, sizes: tuple[int, ...]
    ) -> None:
        objects = blobs(*sizes, seed=len(sizes))
        remote.upload(list(objects), opener(objects))
        tmp_dir = tmp_path / "dl"
        sink = Collector(tmp_dir)
        stats = remote.download(list(objects), sink, tmp_dir)
        assert sink.got == objects
        assert stats == TransferStats(objects=len(objects), bytes=sum(sizes), skipped=0)
        assert stray_files(tmp_dir) == []

    def test_duplicate_refs_are_transferred_once(
        self, remote: ObjectRemote, tmp_path: Path
    ) -> None:
        objects = blobs(100, 200)
        refs = list(objects) * 3
        assert remote.upload(refs, opener(objects)).objects == 2
        assert remote.missing(refs) == []
        sink = Collector(tmp_path / "dl")
        assert remote.download(refs, sink, tmp_path / "dl").objects == 2
        assert sink.got == objects

    @pytest.mark.parametrize("present", [0, 2])
    def test_download_of_absent_objects_lists_all_and_sinks_nothing(
        self, remote: ObjectRemote, tmp_path: Path, present: int
    ) -> None:
        objects = blobs(10, 20, 30, 40, 50, seed=present)
        refs = list(objects)
        remote.upload(refs[:present], opener(objects))
        absent = [r.oid for r in refs[present:]]
        sink = Collector(tmp_path / "dl")
        with pytest.raises(MissingObjectError, match=f"{len(absent)} object") as e:
            remote.download(refs, sink, tmp_path / "dl")
        assert sorted(e.value.data["oids"]) == sorted(absent)
        assert all(oid in str(e.value) for oid in absent)
        assert remote.url in str(e.value) and e.value.hint
        assert sink.got == {}
        assert stray_files(tmp_path / "dl") == []

    @pytest.mark.parametrize("how", ["same-size", "longer", "shorter"])
    def test_corrupt_object_raises_integrity_error(
        self, remote: ObjectRemote, backend: Backend, tmp_path: Path, how: str
    ) -> None:
        objects = blobs(CHUNK + 10, 300, seed=7)
        good, bad = list(objects)
        remote.upload([good, bad], opener(objects))
        damaged = {
            "same-size": b"X" * bad.size,
            "longer": objects[bad] + b"!",
            "shorter": objects[bad][:-1],
        }[how]
        backend.overwrite(bad.oid, damaged)
        tmp_dir = tmp_path / "dl"
        sink = Collector(tmp_dir)
        with pytest.raises(IntegrityError) as e:
            remote.download([bad], sink, tmp_dir)
        assert not isinstance(e.value, MissingObjectError)
        assert bad.oid in str(e.value) and backend.url in str(e.value)
        assert sink.got == {}
        assert stray_files(tmp_dir) == []
        # the good object still downloads; the damaged one counts as missing only if its size is off
        remote.download([good], sink, tmp_dir)
        assert sink.got == {good: objects[good]}
        assert remote.missing([good, bad]) == ([] if how == "same-size" else [bad])

    def test_sink_checks_hands_same_size_bytes_to_the_sink_and_still_checks_sizes(
        self, remote: ObjectRemote, backend: Backend, tmp_path: Path
    ) -> None:
        """A ref listed in ``sink_checks`` (a bundle, whose members the sink checks one by
        one) is not hashed: bytes of the right size reach the sink as they are; a wrong size
        is still refused. Refs not listed are hashed as always."""
        objects = blobs(CHUNK + 10, 300, seed=8)
        listed, other = list(objects)
        remote.upload([listed, other], opener(objects))
        backend.overwrite(listed.oid, b"Y" * listed.size)
        backend.overwrite(other.oid, b"Z" * other.size)
        tmp_dir = tmp_path / "dl"
        sink = Collector(tmp_dir)
        remote.download([listed], sink, tmp_dir, sink_checks={listed.oid})
        assert sink.got == {listed: b"Y" * listed.size}
        with pytest.raises(IntegrityError, match=other.oid):
            remote.download([other], Collector(tmp_dir), tmp_dir, sink_checks={listed.oid})
        backend.overwrite(listed.oid, b"Y" * (listed.size - 1))
        with pytest.raises(IntegrityError, match=listed.oid):
            remote.download([listed], Collector(tmp_dir), tmp_dir, sink_checks={listed.oid})
        assert stray_files(tmp_dir) == []

    def test_absent_and_wrong_size_objects_together(
        self, remote: ObjectRemote, backend: Backend, tmp_path: Path
    ) -> None:
        objects = blobs(40, 50, seed=21)
        absent, damaged = list(objects)
        remote.upload([damaged], opener(objects))
        backend.overwrite(damaged.oid, b"short")
        assert remote.missing([absent, damaged]) == [absent, damaged]
        with pytest.raises(MissingObjectError) as e:
            remote.download([absent, damaged], Collector(tmp_path / "dl"), tmp_path / "dl")
        assert e.value.data["oids"] == [absent.oid]
        with pytest.raises(IntegrityError, match=damaged.oid):
            remote.download([damaged], Collector(tmp_path / "dl"), tmp_path / "dl")

    def test_wrong_size_object_is_reuploaded(
        self, remote: ObjectRemote, backend: Backend, tmp_path: Path
    ) -> None:
        objects = blobs(5000, seed=9)
        (ref,) = objects
        remote.upload([ref], opener(objects))
        backend.overwrite(ref.oid, objects[ref][:100])
        assert remote.missing([ref]) == [ref]
        assert remote.upload([ref], opener(objects)).objects == 1
        sink = Collector(tmp_path / "dl")
        remote.download([ref], sink, tmp_path / "dl")
        assert sink.got == objects

    def test_many_objects_in_several_batches(self, backend: Backend, tmp_path: Path) -> None:
        n = 100 if backend.name == "s3" else 250  # moto answers ~100 requests/s: keep it short
        objects = blobs(*[i * 7 for i in range(n)], seed=11)
        refs = list(objects)
        options = RemoteOptions(workers=8, batch_size=100, retries=3, backoff=0.01)
        remote = backend.open(options)
        try:
            stats = remote.upload(refs, opener(objects))
            assert (stats.objects, stats.bytes) == (n, sum(len(b) for b in objects.values()))
            assert remote.missing(refs) == []
            sink = Collector(tmp_path / "dl")
            assert remote.download(refs, sink, tmp_path / "dl").objects == n
            assert sink.got == objects
        finally:
            remote.close()
        if backend.lfs is not None:
            batches = [p for p in backend.lfs.paths("POST") if p.endswith("/objects/batch")]
            assert len(batches) == 3 * 3  # upload, missing, download: 100 + 100 + 50 each

    def test_on_bytes_totals_equal_payload(self, remote: ObjectRemote, tmp_path: Path) -> None:
        objects = blobs(0, 1, CHUNK - 1, 2 * CHUNK + 5, seed=3)
        total = sum(len(b) for b in objects.values())
        seen: list[int] = []
        stats = remote.upload(list(objects), opener(objects), seen.append)
        assert sum(seen) == total == stats.bytes and all(n > 0 for n in seen)
        seen.clear()
        stats = remote.download(
            list(objects), Collector(tmp_path / "dl"), tmp_path / "dl", seen.append
        )
        assert sum(seen) == total == stats.bytes

    def test_bad_local_object_is_not_published(self, remote: ObjectRemote, tmp_path: Path) -> None:
        objects = blobs(2 * CHUNK + 1, 64, seed=5)
        lying = {ref: b"Y" * ref.size for ref in objects}  # right sizes, wrong bytes
        with pytest.raises(IntegrityError, match=r"local object .* cannot be uploaded"):
            remote.upload(list(objects), opener(lying))
        assert remote.missing(list(objects)) == list(objects)
        short = {ref: data[:-1] for ref, data in objects.items()}
        with pytest.raises(IntegrityError, match="stream ended"):
            remote.upload(list(objects), opener(short))
        assert remote.missing(list(objects)) == list(objects)

    def test_resumes_from_a_part_file_of_an_earlier_run(
        self, remote: ObjectRemote, backend: Backend, tmp_path: Path
    ) -> None:
        objects = blobs(3 * CHUNK + 11, seed=13)
        (ref,) = objects
        remote.upload([ref], opener(objects))
        tmp_dir = tmp_path / "dl"
        tmp_dir.mkdir()
        half = ref.size // 2
        (tmp_dir / f"{ref.oid}.part").write_bytes(objects[ref][:half])
        sink = Collector(tmp_dir)
        stats = remote.download([ref], sink, tmp_dir)
        assert sink.got == objects
        # giftless ignores Range and sends everything again; the others resume
        assert stats.bytes == (ref.size if backend.name == "lfs" else ref.size - half)

    def test_bad_part_file_is_replaced(self, remote: ObjectRemote, tmp_path: Path) -> None:
        objects = blobs(CHUNK + 3, 50, seed=17)
        big, small = list(objects)
        remote.upload([big, small], opener(objects))
        tmp_dir = tmp_path / "dl"
        tmp_dir.mkdir()
        (tmp_dir / f"{big.oid}.part").write_bytes(b"garbage" * 10)  # wrong prefix
        (tmp_dir / f"{small.oid}.part").write_bytes(b"z" * 500)  # longer than the object
        sink = Collector(tmp_dir)
        remote.download([big, small], sink, tmp_dir)
        assert sink.got == objects
        assert stray_files(tmp_dir) == []

    def test_close_twice(self, backend: Backend) -> None:
        r = backend.open()
        r.close()
        r.close()


class TestRefsAndUrls:
    @pytest.mark.parametrize("bad", ["", "abc", "A" * 64, "g" * 64, "0" * 63, None])
    def test_invalid_oid_refused(self, bad: object) -> None:
        with pytest.raises(UserError, match="invalid object id"):
            ObjectRef(bad, 1)  # type: ignore[arg-type]

    @pytest.mark.parametrize("size", [-1, 1.5, True, "3"])
    def test_invalid_size_refused(self, size: object) -> None:
        with pytest.raises(UserError, match="invalid object size"):
            ObjectRef("0" * 64, size)  # type: ignore[arg-type]

    def test_refs_order_and_hash(self) -> None:
        a, b = ObjectRef("0" * 64, 5), ObjectRef("1" * 64, 1)
        assert sorted([b, a]) == [a, b] and {a, ObjectRef("0" * 64, 5)} == {a}

    def test_one_oid_with_two_sizes_refused(self, tmp_path: Path) -> None:
        remote = open_remote(tmp_path.as_uri())
        with pytest.raises(UserError, match="two sizes"):
            remote.missing([ObjectRef("0" * 64, 5), ObjectRef("0" * 64, 6)])
        remote.close()

    @pytest.mark.parametrize("url", ["ftp2://host/x", "nosuch://bucket"])
    def test_unknown_scheme(self, url: str) -> None:
        with pytest.raises(UserError, match="no backend for scheme") as e:
            open_remote(url)
        for known in ("http", "https", "file", "s3", "memory"):
            assert known in e.value.hint  # type: ignore[operator]
        assert e.value.data["known"] == REMOTES.names()

    def test_url_without_scheme(self, tmp_path: Path) -> None:
        with pytest.raises(UserError, match="has no scheme"):
            open_remote(str(tmp_path))

    def test_registry_picks_backends(self, tmp_path: Path) -> None:
        for url, cls in [
            ("http://127.0.0.1:9/o/r.git/info/lfs", "LfsRemote"),
            ("https://example.invalid/o/r.git/info/lfs", "LfsRemote"),
            (tmp_path.as_uri(), "FsspecRemote"),
            ("memory://x", "FsspecRemote"),
        ]:
            r = open_remote(url)
            assert type(r).__name__ == cls
            r.close()

    def test_lfs_url_credentials_are_hidden(self) -> None:
        r = open_remote("https://user:secret@example.invalid/o/r.git/info/lfs/")
        assert r.url == "https://example.invalid/o/r.git/info/lfs"
        r.close()

    def test_lfs_refuses_storage_options(self) -> None:
        with pytest.raises(UserError, match="do not apply"):
            open_remote("https://example.invalid/x", storage_options={"key": "k"})

    def test_bad_options_refused(self) -> None:
        with pytest.raises(UserError, match="workers"):
            RemoteOptions(workers=0)


def test_no_worker_threads_left(tmp_path: Path) -> None:
    before = threading.active_count()
    r = open_remote(tmp_path.as_uri(), options=FAST)
    objects = blobs(*range(20))
    r.upload(list(objects), opener(objects))
    r.close()
    assert threading.active_count() <= before
    assert not any(t.name.startswith("potluck-remote") for t in threading.enumerate())

"""The LFS remote under failure: giftless on loopback behind a fault-injecting middleware."""

from __future__ import annotations

import hashlib
import io
import socket
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from potluck.errors import IntegrityError, PotluckError, UserError
from potluck.remote import ObjectRef, ObjectRemote, RemoteOptions, open_remote
from potluck.remote.lfs import Action, LfsRemote
from potluck.remote.transfer import CHUNK
from testsupport.servers import LfsServer, lfs, lfs_server  # noqa: F401

OPTIONS = RemoteOptions(workers=4, batch_size=100, retries=3, backoff=0.01, timeout=20)


def make(size: int, seed: int = 0) -> tuple[ObjectRef, bytes]:
    data = (hashlib.sha256(f"{seed}".encode()).digest() * (size // 32 + 1))[:size]
    return ObjectRef(hashlib.sha256(data).hexdigest(), size), data


class Store:
    """Objects by ref, an opener for uploads and a sink recording downloads."""

    def __init__(self, *objects: tuple[ObjectRef, bytes]) -> None:
        self.data = dict(objects)
        self.got: dict[ObjectRef, bytes] = {}

    @property
    def refs(self) -> list[ObjectRef]:
        return list(self.data)

    def open(self, ref: ObjectRef) -> closing[io.BytesIO]:
        return closing(io.BytesIO(self.data[ref]))

    def sink(self, ref: ObjectRef, path: Path) -> None:
        self.got[ref] = path.read_bytes()


class FakeCredentials:
    """What the git layer would do with ``git credential fill/approve/reject``."""

    def __init__(self, answer: tuple[str, str] | None) -> None:
        self.answer = answer
        self.calls: list[tuple[str, ...]] = []

    def fill(self, url: str) -> tuple[str, str] | None:
        self.calls.append(("fill", url))
        return self.answer

    def approve(self, url: str, username: str, password: str) -> None:
        self.calls.append(("approve", url, username, password))

    def reject(self, url: str, username: str, password: str) -> None:
        self.calls.append(("reject", url, username, password))


@pytest.fixture
def remote(lfs: LfsServer) -> Iterator[ObjectRemote]:  # noqa: F811
    r = open_remote(lfs.url, options=OPTIONS)
    yield r
    r.close()


def statuses(server: LfsServer, method: str, fragment: str = "") -> list[int]:
    return [s for m, p, s in server.requests if m == method and fragment in p]


def files(tmp_dir: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in tmp_dir.iterdir()} if tmp_dir.exists() else {}


def seeded(remote: ObjectRemote, server: LfsServer, *objects: tuple[ObjectRef, bytes]) -> Store:
    """Upload ``objects`` without faults, then zero the server's counters."""
    store = Store(*objects)
    remote.upload(store.refs, store.open)
    server.reset_counters()
    return store


class TestRetries:
    def test_batch_500s_are_retried(self, remote: ObjectRemote, lfs: LfsServer) -> None:  # noqa: F811
        store = Store(make(1000), make(CHUNK + 1, 1))
        lfs.fail_next(2, 500, method="POST", path_contains="/objects/batch")
        stats = remote.upload(store.refs, store.open)
        assert stats.objects == 2
        assert statuses(lfs, "POST", "/objects/batch") == [500, 500, 200]
        assert remote.missing(store.refs) == []

    def test_429_and_503_on_object_requests_are_retried(
        self,
        remote: ObjectRemote,
        lfs: LfsServer,  # noqa: F811
        tmp_path: Path,
    ) -> None:
        store = Store(make(3 * CHUNK + 7), make(10, 1))
        lfs.fail_next(2, 429, method="PUT")
        lfs.fail_next(1, 503, method="POST", path_contains="/verify")
        remote.upload(store.refs, store.open)
        assert statuses(lfs, "PUT").count(429) == 2 and statuses(lfs, "PUT").count(200) == 2
        assert statuses(lfs, "POST", "/verify").count(503) == 1
        lfs.fail_next(2, 429, method="GET")
        stats = remote.download(store.refs, store.sink, tmp_path / "dl")
        assert store.got == store.data
        assert statuses(lfs, "GET").count(429) == 2 and stats.objects == 2
        assert files(tmp_path / "dl") == {}

    def test_retry_after_is_honoured(self, remote: ObjectRemote, lfs: LfsServer) -> None:  # noqa: F811
        store = Store(make(5))
        lfs.fail_next(1, 429, path_contains="/objects/batch", retry_after="0.5")
        start = time.monotonic()
        remote.upload(store.refs, store.open)
        assert time.monotonic() - start >= 0.5  # backoff alone would be ~0.01 s

    def test_persistent_500_is_a_clear_error(
        self,
        remote: ObjectRemote,
        lfs: LfsServer,  # noqa: F811
        tmp_path: Path,
    ) -> None:
        ref, data = make(2 * CHUNK, 3)
        store = seeded(remote, lfs, (ref, data))
        lfs.fail_next(100, 500, method="GET")
        tmp_dir = tmp_path / "dl"
        with pytest.raises(PotluckError) as e:
            remote.download([ref], store.sink, tmp_dir)
        assert type(e.value) is PotluckError
        message = str(e.value)
        assert "failed after 3 attempt(s)" in message and "HTTP 500" in message
        assert ref.oid in message and lfs.url in message and e.value.hint
        assert e.value.data["status"] == 500 and e.value.data["attempts"] == 3
        assert statuses(lfs, "GET") == [500, 500, 500]
        assert store.got == {}
        assert all(size < ref.size for size in files(tmp_dir).values())

    def test_persistent_batch_500(self, remote: ObjectRemote, lfs: LfsServer) -> None:  # noqa: F811
        ref, _ = make(10)
        lfs.fail_next(100, 502, path_contains="/objects/batch")
        with pytest.raises(PotluckError, match=r"LFS batch request .* failed after 3") as e:
            remote.missing([ref])
        assert e.value.data["status"] == 502
        assert statuses(lfs, "POST") == [502, 502, 502]

    def test_persistent_put_failure_leaves_object_missing(
        self,
        remote: ObjectRemote,
        lfs: LfsServer,  # noqa: F811
    ) -> None:
        store = Store(make(100))
        lfs.fail_next(100, 500, method="PUT")
        with pytest.raises(PotluckError, match=r"upload of object .* failed after 3"):
            remote.upload(store.refs, store.open)
        lfs.reset(new_repo=False)
        assert remote.missing(store.refs) == store.refs

    def test_client_errors_are_not_retried(self, remote: ObjectRemote, lfs: LfsServer) -> None:  # noqa: F811
        lfs.fail_next(1, 403, path_contains="/objects/batch")
        with pytest.raises(UserError, match="HTTP 403") as e:
            remote.missing([make(1)[0]])
        assert e.value.data["status"] == 403 and e.value.hint
        assert statuses(lfs, "POST") == [403]

    def test_failed_verify_is_reported(self, remote: ObjectRemote, lfs: LfsServer) -> None:  # noqa: F811
        store = Store(make(64))
        lfs.fail_next(1, 422, path_contains="/verify")
        with pytest.raises(PotluckError, match=r"does not have object .* after uploading"):
            remote.upload(store.refs, store.open)

    def test_unreachable_server(self, tmp_path: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        r = open_remote(f"http://127.0.0.1:{port}/o/r.git/info/lfs", options=OPTIONS)
        with pytest.raises(PotluckError, match="ConnectError") as e:
            r.missing([make(1)[0]])
        assert "failed after 3 attempt(s)" in str(e.value)
        r.close()


class TestTruncation:
    def test_truncated_download_restarts_when_ranges_are_ignored(
        self,
        remote: ObjectRemote,
        lfs: LfsServer,  # noqa: F811
        tmp_path: Path,
    ) -> None:
        ref, data = make(3 * CHUNK + 7, 4)
        store = seeded(remote, lfs, (ref, data))
        keep = CHUNK + 5
        lfs.truncate_next(1, keep)
        stats = remote.download([ref], store.sink, tmp_path / "dl")
        assert store.got == {ref: data}
        assert statuses(lfs, "GET") == [200, 200]  # giftless answers a Range with everything
        assert lfs.bytes_sent == stats.bytes == keep + ref.size

    def test_truncated_download_resumes_with_range(
        self,
        remote: ObjectRemote,
        lfs: LfsServer,  # noqa: F811
        tmp_path: Path,
    ) -> None:
        ref, data = make(3 * CHUNK + 7, 5)
        store = seeded(remote, lfs, (ref, data))
        lfs.serve_ranges = True
        lfs.truncate_next(1, CHUNK + 5)
        stats = remote.download([ref], store.sink, tmp_path / "dl")
        assert store.got == {ref: data}
        assert statuses(lfs, "GET") == [200, 206]
        assert lfs.bytes_sent == stats.bytes == ref.size  # not one byte twice

    def test_part_file_survives_a_failed_run_and_is_resumed(
        self,
        remote: ObjectRemote,
        lfs: LfsServer,  # noqa: F811
        tmp_path: Path,
    ) -> None:
        ref, data = make(2 * CHUNK + 3, 6)
        store = seeded(remote, lfs, (ref, data))
        lfs.serve_ranges = True
        lfs.truncate_next(3, 1000)  # every attempt of this run breaks after 1000 bytes
        tmp_dir = tmp_path / "dl"
        with pytest.raises(PotluckError, match="failed after 3 attempt") as e:
            remote.download([ref], store.sink, tmp_dir)
        assert "RemoteProtocolError" in str(e.value) and "jwt=" not in str(e.value)
        assert store.got == {} and files(tmp_dir) == {f"{ref.oid}.part": 3000}
        lfs.reset_counters()
        stats = remote.download([ref], store.sink, tmp_dir)
        assert store.got == {ref: data} and files(tmp_dir) == {}
        assert stats.bytes == lfs.bytes_sent == ref.size - 3000
        assert statuses(lfs, "GET") == [206]

    def test_server_sending_wrong_bytes_every_time(
        self,
        remote: ObjectRemote,
        lfs: LfsServer,  # noqa: F811
        tmp_path: Path,
    ) -> None:
        ref, data = make(CHUNK + 9, 7)
        store = seeded(remote, lfs, (ref, data))
        lfs.object_path(ref.oid).write_bytes(bytes(b ^ 1 for b in data))
        tmp_dir = tmp_path / "dl"
        with pytest.raises(IntegrityError, match=f"object {ref.oid} from .* is damaged") as e:
            remote.download([ref], store.sink, tmp_dir)
        assert e.value.data["oid"] == ref.oid and e.value.data["url"] == lfs.url
        assert statuses(lfs, "GET") == [200, 200]  # one retry from scratch, then give up
        assert store.got == {} and files(tmp_dir) == {}


def test_expired_actions_are_renewed(tmp_path: Path) -> None:
    """Actions that expire within seconds are fetched again right before they are used (and
    a second giftless runs beside the module's one)."""
    with LfsServer(tmp_path / "short", action_lifetime=1) as server:
        r = open_remote(server.url, options=OPTIONS)
        store = Store(make(10), make(20, 1))
        try:
            r.upload(store.refs, store.open)
            r.download(store.refs, store.sink, tmp_path / "dl")
        finally:
            r.close()
        assert store.got == store.data
        # per operation: one batch for both objects, then one per object to renew its action
        assert len(statuses(server, "POST", "/objects/batch")) == 2 * (1 + 2)


class TestAuthentication:
    def test_401_fills_and_approves_credentials(self, lfs: LfsServer, tmp_path: Path) -> None:  # noqa: F811
        lfs.requires_auth("alice", "s3cret")
        creds = FakeCredentials(("alice", "s3cret"))
        options = RemoteOptions(workers=4, batch_size=2, retries=3, backoff=0.01)
        r = open_remote(lfs.url, options=options, credentials=creds)
        store = Store(*(make(100 + i, i) for i in range(7)))  # 4 batches, in parallel
        try:
            assert r.upload(store.refs, store.open).objects == 7
            r.download(store.refs, store.sink, tmp_path / "dl")
        finally:
            r.close()
        assert store.got == store.data
        assert creds.calls == [("fill", lfs.url), ("approve", lfs.url, "alice", "s3cret")]
        assert statuses(lfs, "POST", "/objects/batch")[0] == 401
        assert statuses(lfs, "GET") == [200] * 7  # Basic auth went along to the downloads

    def test_wrong_password_is_rejected(self, lfs: LfsServer) -> None:  # noqa: F811
        lfs.requires_auth("alice", "s3cret")
        creds = FakeCredentials(("alice", "wrong"))
        r = open_remote(lfs.url, options=OPTIONS, credentials=creds)
        with pytest.raises(UserError, match=f"authentication failed for {lfs.url}") as e:
            r.missing([make(1)[0]])
        r.close()
        assert "credential" in (e.value.hint or "")
        assert creds.calls == [("fill", lfs.url), ("reject", lfs.url, "alice", "wrong")]

    def test_no_credentials(self, lfs: LfsServer) -> None:  # noqa: F811
        lfs.requires_auth("alice", "s3cret")
        for creds in (None, FakeCredentials(None)):
            r = open_remote(lfs.url, options=OPTIONS, credentials=creds)
            with pytest.raises(UserError, match="requires authentication"):
                r.missing([make(1)[0]])
            r.close()

    def test_credentials_in_the_url(self, lfs: LfsServer) -> None:  # noqa: F811
        lfs.requires_auth("alice", "s3cret")
        url = lfs.url.replace("http://", "http://alice:s3cret@")
        r = open_remote(url, options=OPTIONS)
        assert r.url == lfs.url and "s3cret" not in r.url
        store = Store(make(10))
        assert r.upload(store.refs, store.open).objects == 1
        r.close()

    def test_basic_auth_only_goes_to_the_same_origin(self) -> None:
        r = LfsRemote("http://user:pw@127.0.0.1:8080/o/r.git/info/lfs", OPTIONS)
        same = Action("http://127.0.0.1:8080/o/r.git/info/lfs/objects/x", {})
        assert r._action_auth(same) is not None
        for href, header in [
            ("http://127.0.0.1:9090/x", {}),
            ("https://127.0.0.1:8080/x", {}),
            ("http://storage.example.invalid/x", {}),
            ("http://127.0.0.1:8080/x", {"Authorization": "Bearer t"}),
        ]:
            assert r._action_auth(Action(href, header)) is None
        r.close()

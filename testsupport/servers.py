"""Real servers on loopback for tests: Git LFS (giftless, in-process), S3 (moto), PostgreSQL.

``PostgresServer`` runs Debian's PostgreSQL 15 (the hub's index tests).
``LfsServer`` serves giftless through a WSGI middleware that counts bytes and requests and
injects faults (error statuses, truncated downloads, a Basic-auth wall, optional Range
support). ``MotoS3`` runs moto's S3 in server mode. Both are context managers; the pytest
fixtures at the bottom give one server per test module and reset it before each test::

    from testsupport.servers import LfsServer, MotoS3, lfs, lfs_server, moto_s3, s3  # noqa: F401
"""

from __future__ import annotations

import base64
import itertools
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

LFS_JSON = "application/vnd.git-lfs+json"
BATCH = "/objects/batch"
StartResponse = Callable[..., Any]
_GIFTLESS_LOCK = threading.Lock()  # giftless keeps its transfer adapters in a module global
_repo_numbers = itertools.count(1)


class _QuietHandler(WSGIRequestHandler):
    disable_nagle_algorithm = True  # werkzeug writes small pieces: avoid 40 ms delayed-ACK stalls

    def log_request(self, *args: Any, **kwargs: Any) -> None:
        pass


@dataclass
class _Fault:
    left: int
    status: int = 500
    method: str | None = None
    path_contains: str | None = None
    keep_bytes: int | None = None  # set: truncate a download instead of failing it
    retry_after: str | None = None

    def matches(self, method: str, path: str) -> bool:
        if self.keep_bytes is not None:
            return method == "GET" and BATCH not in path
        return (self.method is None or self.method == method) and (
            self.path_contains is None or self.path_contains in path
        )


class _CountingInput:
    """``wsgi.input`` wrapper counting the request body bytes the app reads."""

    def __init__(self, stream: Any, server: LfsServer) -> None:
        self._stream = stream
        self._server = server

    def read(self, *args: Any) -> bytes:
        data: bytes = self._stream.read(*args)
        self._server._count(received=len(data))
        return data

    def readline(self, *args: Any) -> bytes:
        data: bytes = self._stream.readline(*args)
        self._server._count(received=len(data))
        return data


class LfsServer:
    """In-process giftless (anonymous read-write, local storage) on ``127.0.0.1:<free port>``.

    ``url`` is the LFS endpoint of the current repository (``reset()`` switches to a fresh one),
    ``base`` the server root, ``storage`` giftless' storage directory. Counters:
    ``bytes_sent`` (body bytes of object downloads), ``bytes_received`` (body bytes of PUT
    uploads), ``requests`` (``(method, path, status)``). Faults: ``fail_next``,
    ``truncate_next``, ``requires_auth``, ``chaos`` (random faults, reordered batch answers),
    ``redirect_loop = True`` (object downloads answer 302 to themselves);
    ``serve_ranges = True`` makes object downloads honour ``Range: bytes=N-`` with 206
    (giftless itself always answers 200).

    Object downloads get a ``Content-Length`` (giftless sends none), so a truncated one looks
    like a dropped connection; their body goes out in ``send_block`` pieces (giftless iterates
    the stored file by *line*, ~256 bytes for binary data; ``None`` keeps that).
    """

    def __init__(
        self, root: Path, org: str = "org", repo: str = "repo", action_lifetime: int = 900
    ) -> None:
        self.storage = Path(root) / "lfs-storage"
        self.action_lifetime = action_lifetime
        self.org, self.repo = org, repo
        self.base = ""
        self.serve_ranges = False
        self.redirect_loop = False  # True: every object download redirects to itself
        self._chaos: tuple[random.Random, float, float] | None = None
        self.send_block: int | None = 256 * 1024  # None: send giftless' (line-sized) pieces
        self._lock = threading.Lock()
        self._faults: list[_Fault] = []
        self._auth: str | None = None
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None
        self._adapters: dict[str, Any] = {}
        self.reset_counters()

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> LfsServer:
        import giftless.app
        import giftless.auth
        import giftless.transfer

        (self.storage / self.org / self.repo).mkdir(parents=True, exist_ok=True)
        config = {
            "AUTH_PROVIDERS": ["giftless.auth.allow_anon:read_write"],
            "LEGACY_ENDPOINTS": False,
            "TRANSFER_ADAPTERS": {
                "basic": {
                    "factory": "giftless.transfer.basic_streaming:factory",
                    "options": {
                        "storage_options": {"path": str(self.storage)},
                        "action_lifetime": self.action_lifetime,
                    },
                }
            },
        }
        with _GIFTLESS_LOCK:
            giftless.auth.authentication._authenticators = None  # re-read from our config
            giftless.auth.authentication.preauth_handler = None
            app = giftless.app.init_app(additional_config=config)
            self._adapters = dict(giftless.transfer._registered_adapters)
        app.wsgi_app = self._middleware(app.wsgi_app)
        self._server = make_server(
            "127.0.0.1", 0, app, threaded=True, request_handler=_QuietHandler
        )
        self.base = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # -- addresses and storage ---------------------------------------------------------------

    @property
    def url(self) -> str:
        """LFS endpoint of the current repository."""
        return self.url_for(self.org, self.repo)

    def url_for(self, org: str, repo: str) -> str:
        """LFS endpoint of any repository on this server."""
        return f"{self.base}/{org}/{repo}.git/info/lfs"

    def object_path(self, oid: str) -> Path:
        """Where giftless keeps ``oid`` of the current repository."""
        return self.storage / self.org / self.repo / oid

    # -- counters and faults -----------------------------------------------------------------

    def reset_counters(self) -> None:
        """Zero ``bytes_sent`` and ``bytes_received``; empty ``requests``."""
        with self._lock:
            self.bytes_sent = 0
            self.bytes_received = 0
            self.requests: list[tuple[str, str, int]] = []

    def reset(self, new_repo: bool = True) -> None:
        """Counters, faults, auth and ranges back to normal; by default a fresh repository."""
        self.reset_counters()
        with self._lock:
            self._faults.clear()
            self._auth = None
            self.serve_ranges = False
            self.redirect_loop = False
            self._chaos = None
        if new_repo:
            self.repo = f"repo{next(_repo_numbers)}"
        # giftless creates a repository's directory on the first PUT, racily: parallel first
        # uploads can fail with 500 (FileExistsError). Create it up front.
        (self.storage / self.org / self.repo).mkdir(parents=True, exist_ok=True)

    def fail_next(
        self,
        n: int,
        status: int = 500,
        method: str | None = None,
        path_contains: str | None = None,
        retry_after: str | None = "0",
    ) -> None:
        """The next ``n`` matching requests get ``status`` without reaching giftless (a 429 or
        503 carries ``Retry-After: retry_after``)."""
        with self._lock:
            self._faults.append(_Fault(n, status, method, path_contains, None, retry_after))

    def truncate_next(self, n: int, keep_bytes: int) -> None:
        """The next ``n`` object downloads send only ``keep_bytes`` body bytes, then hang up."""
        with self._lock:
            self._faults.append(_Fault(n, 200, keep_bytes=keep_bytes))

    def chaos(self, seed: int | None, rate: float = 0.0, delay: float = 0.0) -> None:
        """Random faults (``None``: off): each request fails with probability ``rate`` with a
        500 or a 503, or (an object download) is cut off after a few bytes; every request
        waits ``delay`` seconds; batch responses list their objects in reverse order."""
        with self._lock:
            self._chaos = None if seed is None else (random.Random(seed), rate, delay)

    def _chaos_fault(self, method: str, path: str) -> _Fault | None:
        with self._lock:
            if self._chaos is None:
                return None
            rng, rate, delay = self._chaos
            roll, pick, keep = rng.random(), rng.random(), rng.randrange(0, 4096)
        if delay:
            time.sleep(delay)
        if roll >= rate:
            return None
        if method == "GET" and BATCH not in path and pick < 0.5:
            return _Fault(1, 200, keep_bytes=keep)
        return _Fault(1, 503 if pick < 0.75 else 500, retry_after="0")

    def requires_auth(self, username: str | None, password: str = "") -> None:
        """Demand HTTP Basic ``username:password`` (``None``: anonymous again). Requests that
        carry giftless' own ``Bearer`` action tokens pass (giftless checks those)."""
        token = base64.b64encode(f"{username}:{password}".encode()).decode()
        with self._lock:
            self._auth = None if username is None else f"Basic {token}"

    def paths(self, method: str | None = None) -> list[str]:
        """Paths of the recorded requests (optionally of one method)."""
        with self._lock:
            return [p for m, p, _ in self.requests if method is None or m == method]

    def _count(self, sent: int = 0, received: int = 0) -> None:
        with self._lock:
            self.bytes_sent += sent
            self.bytes_received += received

    def _record(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self.requests.append((method, path, status))

    def _take_fault(self, method: str, path: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.left > 0 and fault.matches(method, path):
                    fault.left -= 1
                    return fault
        return None

    # -- the middleware ----------------------------------------------------------------------

    def _middleware(self, app: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
        def middleware(environ: dict[str, Any], start_response: StartResponse) -> Any:
            method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
            given = environ.get("HTTP_AUTHORIZATION", "")
            if self._auth is not None and given != self._auth and not given.startswith("Bearer "):
                return self._reply(method, path, start_response, 401, "authentication required")
            fault = self._take_fault(method, path) or self._chaos_fault(method, path)
            if fault is not None and fault.keep_bytes is None:
                return self._reply(
                    method, path, start_response, fault.status, "injected fault", fault.retry_after
                )
            if method == "PUT":
                environ["wsgi.input"] = _CountingInput(environ["wsgi.input"], self)
            if BATCH in path:
                with _GIFTLESS_LOCK:
                    import giftless.transfer

                    giftless.transfer._registered_adapters.clear()
                    giftless.transfer._registered_adapters.update(self._adapters)
                    if self._chaos is not None:
                        return self._reordered(app, environ, start_response)
                    return self._plain(app, environ, start_response)
            if method == "GET" and self.redirect_loop:
                return self._redirect(path, environ, start_response)
            if method == "GET":
                keep = fault.keep_bytes if fault is not None else None
                return self._download(app, environ, start_response, keep)
            return self._plain(app, environ, start_response)

        return middleware

    def _reply(
        self,
        method: str,
        path: str,
        start_response: StartResponse,
        status: int,
        message: str,
        retry_after: str | None = None,
    ) -> list[bytes]:
        body = json.dumps({"message": message}).encode()
        headers = [("Content-Type", LFS_JSON), ("Content-Length", str(len(body)))]
        if status == 401:
            headers.append(("WWW-Authenticate", 'Basic realm="test"'))
        if retry_after is not None and status in (429, 503):
            headers.append(("Retry-After", retry_after))
        start_response(f"{status} {HTTPStatus(status).phrase}", headers)
        self._record(method, path, status)
        return [body]

    def _redirect(
        self, path: str, environ: dict[str, Any], start_response: StartResponse
    ) -> list[bytes]:
        """A 302 back to the same URL (a redirect loop, as a misconfigured storage front)."""
        query = environ.get("QUERY_STRING", "")
        location = f"{self.base}{path}" + (f"?{query}" if query else "")
        start_response("302 Found", [("Location", location), ("Content-Length", "0")])
        self._record("GET", path, 302)
        return [b""]

    def _reordered(
        self,
        app: Callable[..., Iterable[bytes]],
        environ: dict[str, Any],
        start_response: StartResponse,
    ) -> list[bytes]:
        """A batch response with its objects in reverse order (clients must match by oid)."""
        got: list[Any] = []
        body = b"".join(self._plain(app, environ, lambda *a: got.append(a)))
        status, headers = got[0][0], got[0][1]
        try:
            doc = json.loads(body)
            doc["objects"] = list(reversed(doc.get("objects") or []))
            body = json.dumps(doc).encode()
        except (ValueError, AttributeError):
            pass
        headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
        start_response(status, [*headers, ("Content-Length", str(len(body)))])
        return [body]

    def _plain(
        self,
        app: Callable[..., Iterable[bytes]],
        environ: dict[str, Any],
        start_response: StartResponse,
    ) -> list[bytes]:
        def sr(status: str, headers: list[tuple[str, str]], *exc: Any) -> Any:
            self._record(environ["REQUEST_METHOD"], environ["PATH_INFO"], int(status[:3]))
            return start_response(status, headers, *exc)

        result = app(environ, sr)
        try:
            return list(result)
        finally:
            getattr(result, "close", lambda: None)()

    def _download(
        self,
        app: Callable[..., Iterable[bytes]],
        environ: dict[str, Any],
        start_response: StartResponse,
        keep: int | None,
    ) -> Iterator[bytes]:
        """An object download: Content-Length, optional Range, truncation, byte counting."""
        skip = 0
        wanted = environ.get("HTTP_RANGE", "")
        stored = self._stored_size(environ["PATH_INFO"])

        def sr(status: str, headers: list[tuple[str, str]], *exc: Any) -> Any:
            nonlocal skip
            code = int(status[:3])
            if code == 200 and stored is not None:
                headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
                range_ok = self.serve_ranges and wanted.startswith("bytes=") and wanted[-1] == "-"
                skip = min(int(wanted[6:-1]), stored) if range_ok else 0
                headers.append(("Content-Length", str(stored - skip)))
                if range_ok and skip < stored:
                    code, status = 206, "206 Partial Content"
                    headers.append(("Content-Range", f"bytes {skip}-{stored - 1}/{stored}"))
                elif range_ok:
                    code, status = 416, "416 Range Not Satisfiable"
            self._record(environ["REQUEST_METHOD"], environ["PATH_INFO"], code)
            return start_response(status, headers, *exc)

        result = app(environ, sr)  # Flask calls start_response before returning the body
        try:
            chunks = result if self.send_block is None else _coalesce(result, self.send_block)
            yield from self._body(chunks, skip, keep)
        finally:
            getattr(result, "close", lambda: None)()

    def _body(self, chunks: Iterable[bytes], skip: int, keep: int | None) -> Iterator[bytes]:
        """Drop the first ``skip`` bytes, stop after ``keep`` bytes, count what is sent."""
        for chunk in chunks:
            cut = min(skip, len(chunk))
            chunk, skip = chunk[cut:], skip - cut
            if keep is not None:
                chunk, keep = chunk[:keep], keep - min(keep, len(chunk))
            if chunk:
                self._count(sent=len(chunk))
                yield chunk
            if keep == 0:
                return  # hang up early: werkzeug closes the connection after each response

    def _stored_size(self, path: str) -> int | None:
        """Size of the stored object a download path names (giftless sends no length)."""
        prefix, sep, oid = path.partition("/info/lfs/objects/storage/")
        if not sep or not prefix.endswith(".git"):
            return None
        org, _, repo = prefix[1 : -len(".git")].rpartition("/")
        try:
            return (self.storage / org / repo / oid).stat().st_size
        except OSError:
            return None


def _coalesce(chunks: Iterable[bytes], size: int) -> Iterator[bytes]:
    """Join tiny pieces (giftless iterates object files by *line*) into larger writes."""
    buffer = bytearray()
    for chunk in chunks:
        buffer += chunk
        if len(buffer) >= size:
            yield bytes(buffer)
            buffer.clear()
    if buffer:
        yield bytes(buffer)


class MotoS3:
    """moto's S3 in server mode on ``127.0.0.1:<free port>``, with explicit dummy keys."""

    KEY = "testing-key"
    SECRET = "testing-secret"
    REGION = "us-east-1"

    def __init__(self) -> None:
        self.endpoint = ""
        self._server: Any = None
        self._buckets = itertools.count(1)
        self._log_level = logging.NOTSET

    def __enter__(self) -> MotoS3:
        from moto.server import ThreadedMotoServer

        werkzeug_log = logging.getLogger("werkzeug")  # moto's server logs every request
        self._log_level = werkzeug_log.level
        werkzeug_log.setLevel(logging.WARNING)
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.stop()
        logging.getLogger("werkzeug").setLevel(self._log_level)

    def client(self) -> Any:
        """A boto3 S3 client for this server."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.REGION,
            aws_access_key_id=self.KEY,
            aws_secret_access_key=self.SECRET,
        )

    def create_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh unique name by default) and return its name."""
        name = name or f"bucket-{next(self._buckets)}"
        self.client().create_bucket(Bucket=name)
        return name

    def storage_options(self) -> dict[str, Any]:
        """fsspec/s3fs options for this server."""
        return {
            "key": self.KEY,
            "secret": self.SECRET,
            "client_kwargs": {"endpoint_url": self.endpoint, "region_name": self.REGION},
        }


class PostgresServer:
    """A real PostgreSQL (Debian's ``postgresql`` package) on ``127.0.0.1:<free port>``.

    ``initdb`` runs as the ``postgres`` user when this process is root (root cannot run the
    server); trust authentication on loopback only. ``url`` is ``postgresql://hub@HOST:PORT/postgres``.
    ``unavailable()`` says why it cannot start here (None when it can).
    """

    BIN = Path("/usr/lib/postgresql/15/bin")

    def __init__(self) -> None:
        self.url = ""
        self._dir: Path | None = None

    @classmethod
    def unavailable(cls) -> str | None:
        if not (cls.BIN / "initdb").exists():
            return f"PostgreSQL 15 is not installed ({cls.BIN}); apt-get install postgresql"
        return None

    def _run(self, *args: str) -> None:
        import os
        import subprocess

        cmd = list(args)
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)

    def __enter__(self) -> PostgresServer:
        import os
        import shutil
        import socket
        import tempfile

        self._dir = Path(tempfile.mkdtemp(prefix="potluck-pg-"))
        if os.geteuid() == 0:
            shutil.chown(self._dir, "postgres", "postgres")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        data = self._dir / "data"
        self._run(str(self.BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "hub",
                  "--no-sync", "-E", "UTF8")  # fmt: skip
        opts = f"-h 127.0.0.1 -p {port} -k {self._dir} -F -c fsync=off"
        self._run(str(self.BIN / "pg_ctl"), "-D", str(data), "-o", opts, "-l",
                  str(self._dir / "log"), "-w", "start")  # fmt: skip
        self.url = f"postgresql://hub@127.0.0.1:{port}/postgres"
        return self

    def __exit__(self, *exc: object) -> None:
        import shutil

        if self._dir is None:
            return
        if self.url:
            self._run(str(self.BIN / "pg_ctl"), "-D", str(self._dir / "data"), "-m", "immediate",
                      "-w", "stop")  # fmt: skip
        shutil.rmtree(self._dir, ignore_errors=True)


# -- fixtures (import them into a test module) -----------------------------------------------


@pytest.fixture(scope="module")
def lfs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LfsServer]:
    """One giftless server per test module."""
    with LfsServer(tmp_path_factory.mktemp("lfs")) as server:
        yield server


@pytest.fixture
def lfs(lfs_server: LfsServer) -> LfsServer:
    """The module's giftless server, reset: no faults, zero counters, a fresh repository."""
    lfs_server.reset()
    return lfs_server


@pytest.fixture(scope="module")
def moto_s3() -> Iterator[MotoS3]:
    """One moto S3 server per test module."""
    with MotoS3() as server:
        yield server


@pytest.fixture
def s3(moto_s3: MotoS3) -> MotoS3:
    """The module's moto server (make a fresh bucket per test with ``create_bucket()``)."""
    return moto_s3

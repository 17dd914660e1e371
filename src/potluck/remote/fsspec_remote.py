"""Object remote on any fsspec filesystem: ``file:///abs/dir``, ``s3://bucket/prefix``, …

Layout: ``<root>/objects/<oid[:2]>/<oid[2:4]>/<oid>``. A key is published atomically: local
files are written to a temporary sibling and renamed into place; on other filesystems the file
is closed (an S3 PUT, or the completion of a multipart upload: both atomic) only once every
byte is written and hashes right, else discarded, so no half-written object is ever visible.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from potluck.errors import IntegrityError, MissingObjectError, PotluckError, UserError
from potluck.fileio import atomic_writer
from potluck.remote.base import (
    ObjectRef,
    OnBytes,
    Opener,
    RemoteOptions,
    Sink,
    TransferStats,
    unique_refs,
)
from potluck.remote.transfer import (
    CHUNK,
    DAMAGED_HINT,
    Body,
    Engine,
    Meter,
    RetryableError,
    missing_error,
    read_exact,
)

T = TypeVar("T")
_PROGRAMMING_ERRORS = (TypeError, ValueError, AttributeError, KeyError, NotImplementedError)


class FsspecRemote:
    """``ObjectRemote`` on an fsspec filesystem."""

    def __init__(
        self, url: str, options: RemoteOptions, storage_options: Mapping[str, Any] | None = None
    ) -> None:
        try:
            fs, root = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
        except ImportError as e:
            raise UserError(
                f"cannot open remote {url}: {e}",
                hint="install the fsspec package for this scheme (e.g. s3fs for s3://, "
                "gcsfs for gs://)",
                url=url,
            ) from None
        except (ValueError, TypeError) as e:
            raise UserError(
                f"cannot open remote {url}: {e}",
                hint="check the URL and the storage options",
                url=url,
            ) from None
        self.url = url
        self.options = options
        self._fs: Any = fs
        self._root = str(root).rstrip("/")
        self._engine = Engine(options, url)

    def close(self) -> None:
        """Stop the worker threads (the filesystem object is shared by fsspec; left open)."""
        self._engine.close()

    def key(self, oid: str) -> str:
        """Where object ``oid`` lives on the filesystem."""
        return f"{self._root}/objects/{oid[:2]}/{oid[2:4]}/{oid}"

    def missing(self, refs: Sequence[ObjectRef]) -> list[ObjectRef]:
        """Refs whose key is absent or has another size."""
        todo = unique_refs(refs)
        absent = {r.oid for r, size in zip(todo, self._sizes(todo), strict=True) if size != r.size}
        return [r for r in refs if r.oid in absent]

    def upload(
        self, refs: Sequence[ObjectRef], open_object: Opener, on_bytes: OnBytes | None = None
    ) -> TransferStats:
        """Write every object the remote lacks (each write is atomic, so done means present)."""
        todo = unique_refs(refs)
        wanted = [r for r, size in zip(todo, self._sizes(todo), strict=True) if size != r.size]
        meter = Meter(on_bytes)
        meter.skipped(len(todo) - len(wanted))

        def one(ref: ObjectRef) -> None:
            what = f"upload of object {ref.oid} to {self.url}"
            self._engine.retry(lambda: self._put(ref, open_object, meter), what)
            meter.done()

        self._engine.map(one, wanted)  # a completed write is a published object
        return meter.stats

    def download(
        self,
        refs: Sequence[ObjectRef],
        sink: Sink,
        tmp_dir: Path,
        on_bytes: OnBytes | None = None,
        *,
        sink_checks: Collection[str] = (),
    ) -> TransferStats:
        """Fetch, verify and sink every ref; absent objects are reported before any transfer
        (``sink_checks``: see ``ObjectRemote.download``)."""
        todo = unique_refs(refs)
        sizes = self._sizes(todo)
        absent = [r.oid for r, size in zip(todo, sizes, strict=True) if size is None]
        if absent:
            raise missing_error(absent, self.url)
        for ref, size in zip(todo, sizes, strict=True):
            if size != ref.size:
                raise IntegrityError(
                    f"object {ref.oid} on {self.url} is damaged: it has {size} bytes, "
                    f"not {ref.size}",
                    hint=DAMAGED_HINT,
                    oid=ref.oid,
                    url=self.url,
                )
        tmp_dir.mkdir(parents=True, exist_ok=True)
        meter = Meter(on_bytes)

        def one(ref: ObjectRef) -> None:
            def open_body(offset: int) -> AbstractContextManager[Body]:
                return self._open_body(ref, offset)

            hashed = ref.oid not in sink_checks
            self._engine.download(ref, tmp_dir, open_body, sink, meter, hashed=hashed)

        self._engine.map(one, todo)
        return meter.stats

    # -- helpers -----------------------------------------------------------------------------

    def _call(self, fn: Callable[[], T], ref: ObjectRef) -> T:
        """``fn()`` with filesystem errors made clear (and transient ones retryable)."""
        try:
            return fn()
        except FileNotFoundError:
            raise MissingObjectError(
                f"object {ref.oid} vanished from {self.url}",
                hint="someone removed it from the remote; push it from a clone that has it",
                oids=[ref.oid],
                url=self.url,
            ) from None
        except PermissionError as e:
            raise UserError(
                f"access to {self.key(ref.oid)} on {self.url} denied: {e}",
                hint="check the credentials and permissions for this remote",
                url=self.url,
            ) from None
        except (PotluckError, RetryableError, *_PROGRAMMING_ERRORS):
            raise
        except Exception as e:  # network and service errors of the fsspec implementation
            raise RetryableError(f"{type(e).__name__} on {self.url}: {e}") from e

    def _size(self, ref: ObjectRef) -> int | None:
        key = self.key(ref.oid)

        def info() -> int | None:
            self._fs.invalidate_cache(key)
            try:
                found = self._fs.info(key)
            except FileNotFoundError:
                return None
            return int(found["size"]) if found.get("type", "file") == "file" else None

        return self._engine.retry(lambda: self._call(info, ref), f"looking up {key}")

    def _sizes(self, refs: Sequence[ObjectRef]) -> list[int | None]:
        """Stored size of each ref's key (``None``: absent), looked up in parallel."""
        return self._engine.map(self._size, refs)

    def _put(self, ref: ObjectRef, open_object: Opener, meter: Meter) -> None:
        key = self.key(ref.oid)
        with open_object(ref) as stream:
            pieces = _metered(read_exact(stream, ref), meter)
            if isinstance(self._fs, LocalFileSystem):
                self._call(lambda: _put_local(Path(key), pieces), ref)
            elif isinstance(self._fs, MemoryFileSystem):  # in RAM anyway; pipe is atomic
                data = b"".join(pieces)
                self._call(lambda: self._fs.pipe_file(key, data), ref)
            else:
                self._call(lambda: _put_committed(self._fs, key, pieces), ref)

    @contextmanager
    def _open_body(self, ref: ObjectRef, offset: int) -> Iterator[Body]:
        key = self.key(ref.oid)
        f = self._call(lambda: self._open_read(key, ref.size), ref)
        try:
            if offset:
                self._call(lambda: f.seek(offset), ref)
            yield offset, self._chunks(f, ref)
        finally:
            with contextlib.suppress(Exception):
                f.close()

    def _open_read(self, key: str, size: int) -> Any:
        if isinstance(self._fs, (LocalFileSystem, MemoryFileSystem)):
            return self._fs.open(key, "rb")
        try:  # the size is known already: spare the object store a HEAD request
            return self._fs.open(key, "rb", size=size)
        except TypeError:
            return self._fs.open(key, "rb")

    def _chunks(self, f: Any, ref: ObjectRef) -> Iterator[bytes]:
        while piece := self._call(lambda: f.read(CHUNK), ref):
            yield bytes(piece)


def _metered(pieces: Iterator[bytes], meter: Meter) -> Iterator[bytes]:
    for piece in pieces:
        meter.moved(len(piece))
        yield piece


def _put_local(path: Path, pieces: Iterator[bytes]) -> None:
    """Write through a temporary sibling, renamed into place only when complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(path) as f:
        for piece in pieces:
            f.write(piece)


def _put_committed(fs: Any, key: str, pieces: Iterator[bytes]) -> None:
    """Write ``key``; ``close`` publishes it (one PUT, or completes the multipart upload).

    On any failure the file is discarded instead of closed, so nothing is published.
    """
    f = fs.open(key, "wb")
    try:
        for piece in pieces:
            f.write(piece)
    except BaseException:
        with contextlib.suppress(Exception):
            f.discard()
        f.closed = True  # discarded: closing would try to upload the dropped buffer
        raise
    f.close()

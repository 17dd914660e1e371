"""The transfer engine shared by every backend: worker threads, retries, verified downloads.

Backends describe *how* to move one object; the engine decides how often to try, how long to
wait in between, how to resume a broken download and when bytes are trustworthy enough to
hand to the caller's sink.
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import math
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, wait
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, TypeVar

import httpx
import tenacity

from potluck import workers
from potluck.errors import IntegrityError, MissingObjectError, PotluckError
from potluck.remote.base import ObjectRef, OnBytes, RemoteOptions, Sink, TransferStats

T = TypeVar("T")
R = TypeVar("R")

CHUNK = 1 << 20
#: the largest piece an upload reads at once (a store chunk, 4 MiB by default, fits whole)
SEND_PIECE = 8 << 20
MAX_WAIT = 30.0
DAMAGED_HINT = (
    "the remote's copy is damaged (or the transfer corrupts it); upload a good copy from a "
    "clone that has one, or check any proxy between you and the remote"
)
RETRY_HINT = (
    "the remote kept failing; check that it is up and reachable, then run the command again "
    "(finished objects are kept and broken downloads resume)"
)

Body = tuple[int, Iterable[bytes]]
"""Where the body starts (the requested offset, or 0 when the server sent everything) and its
chunks."""
OpenBody = Callable[[int], AbstractContextManager[Body]]
"""Open the object's bytes from an offset (``0``: from the start)."""


class RetryableError(Exception):
    """A failure worth another try: 429 / 5xx, a broken connection, a short or bad body."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        integrity: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.retry_after = retry_after
        self.integrity = integrity


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), MAX_WAIT)


class Meter:
    """Thread-safe counters plus the caller's progress callback (called under a lock)."""

    def __init__(self, on_bytes: OnBytes | None) -> None:
        self._on_bytes = on_bytes
        self._lock = threading.Lock()
        self.stats = TransferStats()

    def moved(self, n: int) -> None:
        """Count ``n`` payload bytes that crossed the wire."""
        if n <= 0:
            return
        with self._lock:
            self.stats.bytes += n
            if self._on_bytes is not None:
                self._on_bytes(n)

    def done(self, objects: int = 1) -> None:
        """Count finished objects."""
        with self._lock:
            self.stats.objects += objects

    def skipped(self, objects: int) -> None:
        """Count objects the other side already had."""
        with self._lock:
            self.stats.skipped += objects


class Engine:
    """A bounded thread pool plus the retry policy of ``options``."""

    def __init__(self, options: RemoteOptions, url: str) -> None:
        self.options = options
        self.url = url
        self._pool = workers.pool(options.workers, "potluck-remote")

    def close(self) -> None:
        """Stop the worker threads (waits for running transfers)."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """``fn`` over ``items`` on the pool, results in order; the first failure is raised
        once every started call has ended (queued ones are cancelled). Never nest calls."""
        if len(items) <= 1 or self.options.workers == 1:
            return [fn(item) for item in items]
        futures: list[Future[R]] = [self._pool.submit(fn, item) for item in items]
        try:
            finished, _ = wait(futures, return_when=FIRST_EXCEPTION)
            failed = [f for f in futures if f in finished and f.exception() is not None]
            if failed:
                for f in futures:
                    f.cancel()
                wait(futures)
                raise failed[0].exception()  # type: ignore[misc]
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            wait(futures)
            raise

    def _wait(self, state: tenacity.RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome is not None else None
        if isinstance(exc, RetryableError) and exc.retry_after is not None:
            return float(exc.retry_after)
        base = self.options.backoff
        exponent = min(state.attempt_number - 1, 30)
        return min(base * 2.0**exponent + random.uniform(0, base), MAX_WAIT)

    def retry(self, fn: Callable[[], T], what: str) -> T:
        """Call ``fn`` up to ``options.retries`` times while it raises ``RetryableError``.

        When every attempt failed, raise ``IntegrityError`` (bad bytes) or ``PotluckError``
        (anything else) saying what was attempted, how often, and the last status.
        """
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.options.retries),
            wait=self._wait,
            retry=tenacity.retry_if_exception_type(RetryableError),
            reraise=True,
        )
        try:
            return retrying(fn)
        except RetryableError as e:
            n = self.options.retries
            if e.integrity:
                raise IntegrityError(
                    f"{what}: {e.message}",
                    hint=DAMAGED_HINT,
                    url=self.url,
                ) from None
            raise PotluckError(
                f"{what} failed after {n} attempt(s): {e.message}",
                hint=RETRY_HINT,
                url=self.url,
                status=e.status,
                attempts=n,
            ) from None

    def download(
        self,
        ref: ObjectRef,
        tmp_dir: Path,
        open_body: OpenBody,
        sink: Sink,
        meter: Meter,
        *,
        hashed: bool = True,
    ) -> None:
        """Fetch ``ref`` into ``tmp_dir/<oid>.part`` (resuming), verify it (its size only
        when not ``hashed``: the sink checks what it uses), then ``sink`` it."""
        part = tmp_dir / f"{ref.oid}.part"
        fetch = _Fetch(ref, part, open_body, meter, self.url, hashed)
        try:
            self.retry(fetch.attempt, f"download of object {ref.oid} from {self.url}")
        except IntegrityError as e:
            part.unlink(missing_ok=True)
            e.data.update(oid=ref.oid)
            raise
        except BaseException:
            with contextlib.suppress(OSError):
                if part.stat().st_size >= ref.size:  # never leave a complete, unverified file
                    part.unlink()
            raise
        try:
            sink(ref, part)
        finally:
            part.unlink(missing_ok=True)
        meter.done()


class _Fetch:
    """One object's download attempts, resuming from what ``part`` already holds."""

    def __init__(
        self,
        ref: ObjectRef,
        part: Path,
        open_body: OpenBody,
        meter: Meter,
        url: str,
        hashed: bool = True,
    ) -> None:
        self.ref = ref
        self.hashed = hashed
        self.url = url
        self.part = part
        self.open_body = open_body
        self.meter = meter
        self.fresh_mismatches = 0

    def _hasher(self) -> Any:
        return hashlib.sha256() if self.hashed else _SizeOnly(self.ref.oid)

    def _prefix(self) -> tuple[int, Any]:
        """Bytes already in ``part`` and their running hash (a longer file is discarded)."""
        hasher = self._hasher()
        try:
            have = self.part.stat().st_size
        except FileNotFoundError:
            return 0, hasher
        if have > self.ref.size:
            self.part.unlink()
            return 0, hasher
        if not self.hashed:
            return have, hasher
        with self.part.open("rb") as f:
            while piece := f.read(CHUNK):
                hasher.update(piece)
        return have, hasher

    def attempt(self) -> None:
        """Fetch what is missing, then check size and sha256."""
        size = self.ref.size
        have, hasher = self._prefix()
        resumed = have > 0
        if have < size:
            try:
                with self.open_body(have) as (start, chunks):
                    if start != have:  # the server ignored the range: start over
                        have, hasher, resumed = 0, self._hasher(), False
                    have = self._write(chunks, have, hasher)
            except RetryableError as e:
                if e.integrity:
                    self.part.unlink(missing_ok=True)
                raise
            if have < size:
                raise RetryableError(f"the body ended early: got {have} of {size} bytes")
        elif not self.part.exists():
            self.part.touch()  # an empty object needs no transfer
        got = hasher.hexdigest()
        if got != self.ref.oid:
            self.part.unlink(missing_ok=True)
            message = f"its bytes hash to {got}, not to the object id"
            if not resumed:
                self.fresh_mismatches += 1
            if self.fresh_mismatches > 1:  # a second full download was bad too: give up
                raise IntegrityError(
                    f"object {self.ref.oid} from {self.url} is damaged: {message}",
                    hint=DAMAGED_HINT,
                    oid=self.ref.oid,
                    url=self.url,
                )
            raise RetryableError(message, integrity=True)

    def _write(self, chunks: Iterable[bytes], have: int, hasher: Any) -> int:
        """Append ``chunks`` to ``part`` (truncating it first when ``have`` is 0); new size."""
        with self.part.open("ab" if have else "wb") as f:
            for chunk in chunks:
                if have + len(chunk) > self.ref.size:
                    message = f"the remote sent more than the expected {self.ref.size} bytes"
                    raise RetryableError(message, integrity=True)
                f.write(chunk)
                hasher.update(chunk)
                have += len(chunk)
                self.meter.moved(len(chunk))
        return have


class _SizeOnly:
    """A stand-in for sha256 where the sink checks the bytes (``Engine.download(hashed=False)``):
    it reports the expected id, so only the size is checked here."""

    def __init__(self, oid: str) -> None:
        self._oid = oid

    def update(self, data: bytes) -> None:
        """Nothing to do."""

    def hexdigest(self) -> str:
        """The id the object is expected to have."""
        return self._oid


def read_exact(stream: Any, ref: ObjectRef) -> Iterator[bytes]:
    """Yield ``ref.size`` bytes of ``stream`` in pieces of what its ``read`` returns (at most
    ``SEND_PIECE`` bytes; bytes pass through uncopied), checking their sha256 on the way.

    The hash is checked before the last piece is yielded, so a bad local object fails the
    upload before it completes. Raises ``IntegrityError`` for a short or mismatching stream.
    A stream whose ``hashed`` attribute is ``ref.oid`` was just hashed by its maker from
    immutable files (a bundle, ``ops.vcs.bundle``): only its length is checked.
    """
    hasher = None if getattr(stream, "hashed", None) == ref.oid else hashlib.sha256()
    left = ref.size
    while left > 0:
        piece = stream.read(min(SEND_PIECE, left))
        if not piece:
            raise _local_bad(ref.oid, f"its stream ended after {ref.size - left} bytes")
        piece = bytes(piece)
        if hasher is not None:
            hasher.update(piece)
        left -= len(piece)
        if left == 0:
            break
        yield piece
    else:
        piece = b""
    if hasher is not None and hasher.hexdigest() != ref.oid:
        raise _local_bad(ref.oid, f"its bytes hash to {hasher.hexdigest()}")
    if piece:
        yield piece


def _local_bad(oid: str, why: str) -> IntegrityError:
    return IntegrityError(
        f"local object {oid} cannot be uploaded: {why}",
        hint="the local copy is damaged; run `potluck fsck` and restore the object",
        oid=oid,
    )


# -- HTTP: which answers deserve another try, and how to talk about them ---------------------


def safe_url(url: str | httpx.URL) -> str:
    """``url`` for messages: no query (signatures, tokens) and no user info."""
    return str(httpx.URL(url).copy_with(query=None, fragment=None, username=None, password=None))


def error_message(resp: httpx.Response) -> str:
    """The server's explanation: a JSON ``message`` (as LFS servers send), else the body start."""
    try:
        body = resp.json()
        if isinstance(body, dict) and body.get("message"):
            return str(body["message"])
    except (ValueError, httpx.ResponseNotRead):
        pass
    try:
        return resp.text[:200].strip() or resp.reason_phrase
    except httpx.ResponseNotRead:
        return resp.reason_phrase


def raise_if_retryable(resp: httpx.Response, url: str | httpx.URL) -> None:
    """Raise ``RetryableError`` for a 429 or 5xx answer, honouring ``Retry-After``."""
    status = resp.status_code
    if status == 429 or status >= 500:
        resp.read()
        raise RetryableError(
            f"HTTP {status} from {safe_url(url)}: {error_message(resp)}",
            status=status,
            retry_after=parse_retry_after(resp.headers.get("Retry-After")),
        )


def transport_error(e: httpx.TransportError, url: str | httpx.URL) -> RetryableError:
    """A connection failure, timeout or broken body, as a ``RetryableError``."""
    return RetryableError(f"{type(e).__name__} talking to {safe_url(url)}: {e}")


def missing_error(oids: Sequence[str], url: str) -> MissingObjectError:
    """The error for objects absent on a remote: all oids in ``data["oids"]``."""
    shown = ", ".join(oids[:10]) + (f" and {len(oids) - 10} more" if len(oids) > 10 else "")
    return MissingObjectError(
        f"{len(oids)} object(s) missing on {url}: {shown}",
        hint="push them from a clone that has them, or check that this is the right remote",
        oids=list(oids),
        url=url,
    )

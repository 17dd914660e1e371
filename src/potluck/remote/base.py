"""The object-remote interface: content-addressed objects moved to and from a remote.

An object is an immutable byte string whose id (``oid``) is the lowercase hex sha256 of its
bytes, so every object is also a genuine Git LFS object. Backends live in ``lfs`` (Git LFS
Batch API over HTTP) and ``fsspec_remote`` (any fsspec filesystem: file, s3, memory, …).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable

from potluck.errors import UserError
from potluck.store.base import validate_oid


@dataclass(frozen=True, order=True)
class ObjectRef:
    """One object: its id (64 lowercase hex digits, the sha256 of its bytes) and its size."""

    oid: str
    size: int

    def __post_init__(self) -> None:
        validate_oid(self.oid)
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 0:
            raise UserError(
                f"invalid object size {self.size!r} for {self.oid}",
                hint="an object size is a whole number of bytes, 0 or more",
                oid=self.oid,
                size=self.size,
            )


@dataclass(frozen=True)
class RemoteOptions:
    """Tuning for transfers.

    ``workers`` threads move objects in parallel; ``batch_size`` objects go in one LFS batch
    request; each request is tried ``retries`` times on 429 / 5xx / connection errors /
    truncated bodies, waiting ``backoff`` seconds first, then exponentially longer (with jitter,
    capped at 30 s; a server's ``Retry-After`` wins); ``timeout`` bounds each request.
    """

    workers: int = 8
    batch_size: int = 100
    retries: int = 5
    backoff: float = 0.5
    timeout: float = 60.0

    def __post_init__(self) -> None:
        for name in ("workers", "batch_size", "retries"):
            if getattr(self, name) < 1:
                raise UserError(f"RemoteOptions.{name} must be at least 1", hint="use 1 or more")
        if self.backoff < 0 or self.timeout <= 0:
            raise UserError(
                "RemoteOptions.backoff must be >= 0 and timeout > 0",
                hint="pass seconds, e.g. backoff=0.5, timeout=60",
            )


@dataclass
class TransferStats:
    """What a transfer did.

    ``bytes`` counts payload bytes that crossed the wire in this run (a retried or restarted
    transfer counts again; a resumed download counts only the new bytes). ``skipped`` counts
    objects not transferred because the other side already had them.
    """

    objects: int = 0
    bytes: int = 0
    skipped: int = 0


Opener = Callable[[ObjectRef], AbstractContextManager[BinaryIO]]
"""A fresh stream of exactly ``ref.size`` bytes; may be called again when a transfer is retried."""

Sink = Callable[[ObjectRef, Path], None]
"""Receives a temp file holding verified bytes; must consume (copy or move) it before returning."""

OnBytes = Callable[[int], None]
"""Progress: bytes moved since the last call. Calls are serialised, never concurrent."""


@runtime_checkable
class Credentials(Protocol):
    """Username/password lookup, supplied by the git layer (``git credential fill`` & co)."""

    def fill(self, url: str) -> tuple[str, str] | None:
        """``(username, password)`` for ``url``, or ``None`` when none is known."""
        ...

    def approve(self, url: str, username: str, password: str) -> None:
        """The credentials worked: remember them."""
        ...

    def reject(self, url: str, username: str, password: str) -> None:
        """The credentials were refused: forget them."""
        ...


@runtime_checkable
class ObjectRemote(Protocol):
    """A place objects are pushed to and fetched from."""

    url: str

    def missing(self, refs: Sequence[ObjectRef]) -> list[ObjectRef]:
        """The refs the remote does not have (an object of another size counts as missing)."""
        ...

    def upload(
        self, refs: Sequence[ObjectRef], open_object: Opener, on_bytes: OnBytes | None = None
    ) -> TransferStats:
        """Upload the refs the remote lacks; the others are counted in ``skipped``."""
        ...

    def download(
        self,
        refs: Sequence[ObjectRef],
        sink: Sink,
        tmp_dir: Path,
        on_bytes: OnBytes | None = None,
        *,
        sink_checks: Collection[str] = (),
    ) -> TransferStats:
        """Fetch every ref into ``tmp_dir/<oid>.part``, verify it, then hand it to ``sink``.

        Raises ``MissingObjectError`` (``data["oids"]``: all absent oids) before downloading
        anything, and ``IntegrityError`` when the remote's bytes do not match the ref. Refs
        whose oid is in ``sink_checks`` are checked for size only: the sink checks what it
        uses of them (a bundle: each member it takes against the member's own id).
        """
        ...

    def close(self) -> None:
        """Release connections and worker threads."""
        ...


@runtime_checkable
class UploadPlanner(Protocol):
    """An ``ObjectRemote`` that can answer "which of these do you lack?" the way an upload
    asks it, and keep that answer for the ``upload`` that follows (Git LFS: one upload batch
    per 100 objects instead of a download batch and then an upload batch)."""

    def plan_upload(self, refs: Sequence[ObjectRef]) -> list[ObjectRef]:
        """The refs the remote lacks (as ``missing``); what it said about them is kept for
        the next ``upload`` of those refs."""
        ...


def unique_refs(refs: Sequence[ObjectRef]) -> list[ObjectRef]:
    """``refs`` without repeats, in first-seen order; one oid with two sizes is refused."""
    seen: dict[str, ObjectRef] = {}
    for ref in refs:
        if not isinstance(ref, ObjectRef):
            raise UserError(f"not an ObjectRef: {ref!r}", hint="pass ObjectRef(oid, size) values")
        other = seen.setdefault(ref.oid, ref)
        if other.size != ref.size:
            raise UserError(
                f"object {ref.oid} is listed with two sizes ({other.size} and {ref.size})",
                hint="an object id determines its size; fix the manifest that lists it",
                oid=ref.oid,
            )
    return list(seen.values())

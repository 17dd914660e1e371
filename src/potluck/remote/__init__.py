"""Object remotes: move content-addressed objects to and from a Git LFS server or any fsspec
filesystem. Persistence layer: never imports ``potluck.ops``, ``git``, ``cli`` or ``objects``.

``open_remote(url)`` picks the backend by URL scheme from ``REMOTES`` (entry-point group
``potluck.remotes``): ``http``/``https`` speak the Git LFS Batch API, ``file``, ``s3``,
``memory`` and every other protocol fsspec knows go through fsspec.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from potluck.errors import UserError
from potluck.registry import Registry
from potluck.remote.base import (
    Credentials,
    ObjectRef,
    ObjectRemote,
    OnBytes,
    Opener,
    RemoteOptions,
    Sink,
    TransferStats,
)
from potluck.remote.memory import reuse_freed_memory

#: httpx imports its command-line tool (``httpx._main``: rich, pygments, click) unless that
#: import fails, and then only loses ``httpx.main``, which potluck never calls: blocked before
#: the first import of httpx (both backends import it through this package), it saves a
#: fifth of a second of every process that pushes or fetches (git's hook, the filter).
if "httpx" not in sys.modules:
    sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]

if TYPE_CHECKING:  # the backends (httpx, fsspec) load on first use: every git command
    from potluck.remote.fsspec_remote import FsspecRemote  # starts potluck, few need them
    from potluck.remote.lfs import LfsRemote

RemoteFactory = Callable[
    [str, RemoteOptions, "Credentials | None", "Mapping[str, Any] | None"], ObjectRemote
]
"""``(url, options, credentials, storage_options) -> ObjectRemote``, registered per scheme."""


def make_lfs_remote(
    url: str,
    options: RemoteOptions,
    credentials: Credentials | None,
    storage_options: Mapping[str, Any] | None,
) -> ObjectRemote:
    """Factory for ``http``/``https``: the URL is a Git LFS endpoint."""
    if storage_options:
        raise UserError(
            f"storage options {sorted(storage_options)} do not apply to the LFS remote {url}",
            hint="storage options are for fsspec remotes (s3://, gs://, file://, …)",
        )
    from potluck.remote.lfs import LfsRemote

    return LfsRemote(url, options, credentials)


def make_fsspec_remote(
    url: str,
    options: RemoteOptions,
    credentials: Credentials | None,
    storage_options: Mapping[str, Any] | None,
) -> ObjectRemote:
    """Factory for fsspec schemes (their credentials come in ``storage_options``)."""
    from potluck.remote.fsspec_remote import FsspecRemote

    return FsspecRemote(url, options, storage_options)


REMOTES: Registry[RemoteFactory] = Registry("remote URL scheme", "potluck.remotes")
REMOTES.register("http", make_lfs_remote)
REMOTES.register("https", make_lfs_remote)
for _scheme in ("file", "memory", "s3", "s3a", "gs", "gcs", "az", "abfs"):
    REMOTES.register(_scheme, make_fsspec_remote)

DEFAULT_OPTIONS = RemoteOptions()
URL_EXAMPLES = "e.g. https://host/org/repo.git/info/lfs, file:///abs/dir, s3://bucket/prefix"


def open_remote(
    url: str,
    *,
    options: RemoteOptions = DEFAULT_OPTIONS,
    credentials: Credentials | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> ObjectRemote:
    """Open the object remote at ``url``, choosing the backend by its scheme.

    Raises ``UserError`` for a URL without a scheme or with one no backend handles.
    """
    scheme = urlsplit(url).scheme.lower() if isinstance(url, str) else ""
    reuse_freed_memory()  # a transfer churns through multi-MiB buffers
    if scheme and scheme in REMOTES:
        return REMOTES.get(scheme)(url, options, credentials, storage_options)
    import fsspec

    if scheme and scheme in fsspec.available_protocols():
        return make_fsspec_remote(url, options, credentials, storage_options)
    known = REMOTES.names()
    raise UserError(
        f"unsupported remote URL {url!r}: "
        + (f"no backend for scheme {scheme!r}" if scheme else "it has no scheme"),
        hint=f"known schemes: {', '.join(known)} (and other fsspec protocols); {URL_EXAMPLES}",
        url=url,
        scheme=scheme,
        known=known,
    )


def __getattr__(name: str) -> Any:
    """The backend classes, imported when first asked for."""
    if name == "LfsRemote":
        from potluck.remote.lfs import LfsRemote

        return LfsRemote
    if name == "FsspecRemote":
        from potluck.remote.fsspec_remote import FsspecRemote

        return FsspecRemote
    raise AttributeError(name)


__all__ = [
    "REMOTES",
    "Credentials",
    "FsspecRemote",
    "LfsRemote",
    "ObjectRef",
    "ObjectRemote",
    "OnBytes",
    "Opener",
    "RemoteFactory",
    "RemoteOptions",
    "Sink",
    "TransferStats",
    "open_remote",
]

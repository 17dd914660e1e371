"""git's clean/smudge for potluck: bytes in, bytes out (the protocol lives in filter_process)."""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol

from potluck.errors import FormatError, PotluckError
from potluck.objects.manifest import MAGIC, Manifest, dumps, is_manifest, parse

if TYPE_CHECKING:  # ops.vcs (numpy, zstandard) loads with the first clean or smudge
    from potluck.git.plumbing import CatFileBatch
    from potluck.git.repo import Repo

COPY = 1 << 20
PULL_HINT = "`potluck pull` fetches them and checks the file out"
log = logging.getLogger("potluck")


class Fetcher(Protocol):
    """Where smudge gets missing objects: ``__call__`` fetches a file's objects and returns
    verified plain files for some of them (used as they are); ``settle`` is called once the
    file is written (they are then in the store)."""

    def __call__(self, m: Manifest, path: str) -> Mapping[str, Path]: ...

    def settle(self) -> None: ...

    def pull_hint(self) -> str: ...


class FetcherOnFirstUse:
    """A ``Fetcher`` made by ``make`` when a smudge first needs one: git's filter process
    answers the handshake (and cleans) without the remote-transfer code or its config reads."""

    def __init__(self, make: Callable[[], Fetcher]) -> None:
        self._make = make
        self._fetcher: Fetcher | None = None

    def _get(self) -> Fetcher:
        if self._fetcher is None:
            self._fetcher = self._make()
        return self._fetcher

    def __call__(self, m: Manifest, path: str) -> Mapping[str, Path]:
        return self._get()(m, path)

    def settle(self) -> None:
        if self._fetcher is not None:
            self._fetcher.settle()

    def pull_hint(self) -> str:
        return self._get().pull_hint()

    def close(self) -> None:
        """Close the fetcher if one was made (one that has a ``close``)."""
        close = getattr(self._fetcher, "close", None)
        if close is not None:
            close()


class PotluckFilter:
    """Clean (checkpoint → manifest, objects stored) and smudge (manifest → checkpoint).

    Each method reads all of ``src`` before its first write to ``dst`` (the filter protocol
    streams the answer back only after git has sent the whole content).
    """

    def __init__(
        self, repo: Repo, batch: CatFileBatch | None = None, fetch: Fetcher | None = None
    ) -> None:
        self.repo = repo
        self.batch = batch
        self.fetch = fetch

    def _previous(self, pathname: str) -> Manifest | None:
        """The manifest last staged for this path: its tensors are the delta bases."""
        if self.batch is None:
            return None
        blob = self.batch.get(f":{pathname}") or self.batch.get(f"HEAD:{pathname}")
        if blob is None or not is_manifest(blob):
            return None
        try:
            return parse(blob)
        except FormatError:
            return None

    def clean(self, pathname: str, src: BinaryIO, dst: BinaryIO) -> None:
        """Store the checkpoint read from ``src`` and write its manifest to ``dst``."""
        from potluck.ops.vcs import Chain, snapshot_stream

        head = src.read(len(MAGIC))
        if is_manifest(head):  # already clean (e.g. a file left as a manifest): keep it
            dst.write(head + src.read())
            return
        manifest, _ = snapshot_stream(
            Chain(head, src),
            self.repo.odb,
            self._previous(pathname),
            name=pathname,
            spill_dir=self.repo.tmp_dir,
        )
        dst.write(dumps(manifest))

    def smudge(self, pathname: str, src: BinaryIO, dst: BinaryIO) -> None:
        """Write the checkpoint whose manifest is read from ``src`` to ``dst``."""
        from potluck.ops.vcs import missing_objects, write_file

        head = src.read(len(MAGIC))
        if not is_manifest(head):  # committed before it was tracked: pass through
            with tempfile.SpooledTemporaryFile(
                max_size=64 << 20, dir=str(self.repo.tmp_dir)
            ) as spool:
                spool.write(head)
                shutil.copyfileobj(src, spool, COPY)  # all input first, then answer
                spool.seek(0)
                shutil.copyfileobj(spool, dst, COPY)
            return
        data = head + src.read()
        manifest = parse(data, pathname)
        missing = missing_objects(manifest, self.repo.odb)
        fresh: Mapping[str, Path] = {}
        if missing and self.fetch is not None:
            try:
                fresh = self.fetch(manifest, pathname)
            except PotluckError as e:
                log.warning("%s: fetching its tensors failed: %s", pathname, e)
            missing = [o for o in missing_objects(manifest, self.repo.odb) if o not in fresh]
        try:
            if missing:  # leave the manifest: never a broken checkpoint
                hint = self.fetch.pull_hint() if self.fetch is not None else PULL_HINT
                log.warning(
                    "%s left as a manifest: %d of %d objects are not in the local store; %s",
                    pathname, len(missing), len(set(manifest.oids())), hint,
                )  # fmt: skip
                dst.write(data)
                return
            write_file(manifest, self.repo.odb, dst, path=pathname, fresh=fresh)
        finally:
            if fresh and self.fetch is not None:
                self.fetch.settle()

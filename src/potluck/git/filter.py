"""git's clean/smudge for potluck: bytes in, bytes out (the protocol lives in filter_process)."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol, cast

from potluck.errors import FormatError, IntegrityError, PotluckError
from potluck.objects.manifest import MAGIC, Manifest, dumps, is_manifest, parse

if TYPE_CHECKING:  # ops.vcs (numpy, zstandard) loads with the first clean or smudge
    from potluck.git.plumbing import CatFileBatch
    from potluck.git.repo import Repo
    from potluck.git.textconv_cache import TextconvCache

COPY = 1 << 20
PULL_HINT = "`potluck pull` fetches them and checks the file out"
#: git config: ``false`` makes the filter process fetch each file's objects when git asks for
#: the file (one download batch per file) instead of delaying them into one batch.
DELAY_CHECKOUT = "potluck.delayCheckout"
log = logging.getLogger("potluck")
#: git commands that smudge a blob only to show it (textconv, the external diff driver, blame)
#: and never write it to the work tree.
SHOW_ONLY = frozenset(
    {"log", "show", "diff", "whatchanged", "format-patch", "range-diff", "blame", "annotate"}
)
#: git's options before the command name that take the next argument as their value.
_VALUE_OPTIONS = frozenset(
    {"-C", "-c", "--git-dir", "--work-tree", "--namespace", "--super-prefix", "--config-env"}
)
_SHELLS = frozenset({"sh", "dash", "bash"})


def git_command(argv: list[str]) -> str | None:
    """The command name of a git command line (``git -C x --no-pager log -p`` → ``log``);
    None when ``argv`` is not git's."""
    if not argv or os.path.basename(argv[0]) not in ("git", "git.exe"):
        return None
    args = iter(argv[1:])
    for arg in args:
        if arg in _VALUE_OPTIONS:
            next(args, None)
        elif not arg.startswith("-"):
            return arg
    return None


def _proc_cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return []
    return [os.fsdecode(a) for a in raw.split(b"\0")[:-1]]


def _proc_parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[1])  # after "pid (comm) state"
    except (OSError, IndexError, ValueError):
        return 0


def started_to_show() -> bool:
    """True when the git that started this process runs a command that only shows blobs
    (``git log -p``, ``git show``, ``git diff``): its smudges feed textconv or potluck's diff
    driver, which read a manifest as it is, so no checkpoint needs rebuilding. Looks through a
    ``sh -c`` git may put between; False whenever unsure (no ``/proc``, an alias, a
    ``GIT_EXTERNAL_DIFF`` tool that wants the real files)."""
    if "GIT_EXTERNAL_DIFF" in os.environ:
        return False
    pid = os.getppid()
    for _ in range(3):
        argv = _proc_cmdline(pid)
        if argv and os.path.basename(argv[0]) in _SHELLS:
            pid = _proc_parent(pid)
            continue
        return git_command(argv) in SHOW_ONLY
    return False


class Fetcher(Protocol):
    """Where smudge gets missing objects: ``__call__`` fetches a file's objects and returns
    verified plain files for some of them (used as they are); ``settle`` is called once the
    file is written, at the latest before the next request or when the process ends (the
    objects are then in the store)."""

    def __call__(self, m: Manifest, path: str) -> Mapping[str, Path]: ...

    def settle(self) -> None: ...

    def pull_hint(self) -> str: ...


class BatchFetcher(Fetcher, Protocol):
    """A ``Fetcher`` that also fetches the objects of several files in one batch."""

    def fetch_many(self, files: Sequence[tuple[str, Manifest]]) -> Mapping[str, Path]: ...


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

    def fetch_many(self, files: Sequence[tuple[str, Manifest]]) -> Mapping[str, Path]:
        """One fetch for all of ``files`` when the fetcher can, else one per file."""
        fetcher = self._get()
        if getattr(fetcher, "fetch_many", None) is not None:
            return cast(BatchFetcher, fetcher).fetch_many(files)
        for path, m in files:  # fresh files are gone after settle: the objects are stored
            try:
                fetcher(m, path)
            finally:
                fetcher.settle()
        return {}

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
        self,
        repo: Repo,
        batch: CatFileBatch | None = None,
        fetch: Fetcher | None = None,
        show_only: bool = False,
        textconv: TextconvCache | None = None,
    ) -> None:
        self.repo = repo
        self.batch = batch
        self.fetch = fetch
        #: where the manifests cleaned and smudged are noted for git's textconv cache
        self.textconv = textconv
        #: smudge passes manifests through (``started_to_show``: git only shows the blobs)
        self.show_only = show_only
        #: delayed smudges waiting for the batch download, and those ready to be answered
        self._delayed: dict[str, tuple[bytes, Manifest]] = {}
        self._ready: dict[str, tuple[bytes, Manifest]] = {}
        self._fresh: dict[str, Path] = {}
        self._delay_ok: bool | None = None
        #: fresh files written out whose settle (storing them) still runs: waited for before
        #: the next request, so git has a file's status without waiting for the store
        self._unsettled = False

    def _settle(self) -> None:
        """Wait until the fresh files of the files already answered are in the store."""
        if self._unsettled and self.fetch is not None:
            self._unsettled = False
            self.fetch.settle()

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
        from potluck.ops.vcs.snapshot import Chain, cycles_uncollected, snapshot_stream
        from potluck.workers import release_free_memory

        self._settle()  # objects fetched for an earlier smudge may be its delta bases
        head = src.read(len(MAGIC))
        if is_manifest(head):  # already clean (e.g. a file left as a manifest): keep it
            dst.write(head + src.read())
            return
        with cycles_uncollected():
            manifest, _ = snapshot_stream(
                Chain(head, src),
                self.repo.odb,
                self._previous(pathname),
                name=pathname,
                spill_dir=self.repo.tmp_dir,
            )
            text = dumps(manifest)
        dst.write(text)
        release_free_memory()  # the chunk buffers' pages (git has its answer) before the notes
        if self.textconv is not None:
            self.textconv.note(text, manifest)

    def smudge(self, pathname: str, src: BinaryIO, dst: BinaryIO) -> None:
        """Write the checkpoint whose manifest is read from ``src`` to ``dst`` (for a path
        delayed earlier, ``src`` is empty and the kept manifest is used)."""
        self.smudge_or_delay(pathname, src, dst, can_delay=False)

    def smudge_or_delay(
        self, pathname: str, src: BinaryIO, dst: BinaryIO, can_delay: bool = True
    ) -> bool:
        """Smudge as ``smudge`` does, except that a manifest whose objects are not all local
        is kept for one batch download (``available_blobs``): return True, nothing written."""
        from potluck.ops.vcs import missing_objects

        if pathname in self._ready:  # delayed: git sends it again with no content
            src.read()
            self._serve_ready(pathname, dst)
            return False
        self._settle()
        head = src.read(len(MAGIC))
        if not is_manifest(head):  # committed before it was tracked: pass through
            self._pass_through(head, src, dst)
            return False
        data = head + src.read()
        if self.show_only:  # for textconv or the diff driver, which read manifests themselves
            dst.write(data)
            return False
        manifest = parse(data, pathname)
        if self.textconv is not None:
            self.textconv.note(data, manifest)
        if (
            can_delay
            and self.fetch is not None
            and missing_objects(manifest, self.repo.odb)
            and self._may_delay()
        ):
            self._delayed[pathname] = (data, manifest)
            return True
        self._smudge_manifest(pathname, data, manifest, dst)
        return False

    def _may_delay(self) -> bool:
        """``potluck.delayCheckout`` (default true), read once."""
        if self._delay_ok is None:
            value = (self.repo.git.config_get(DELAY_CHECKOUT) or "true").strip().lower()
            self._delay_ok = value not in ("false", "no", "off", "0")
        return self._delay_ok

    def available_blobs(self) -> list[str]:
        """Fetch the objects of every delayed file in one batch and name those files (git
        then asks for each); an empty list when none is delayed. A failed fetch is logged:
        the files are then answered as their manifests, as ``smudge`` does."""
        if not self._delayed:
            return []
        self._settle()  # one background store at a time
        batch, self._delayed = self._delayed, {}
        files = [(path, m) for path, (_, m) in batch.items()]
        try:
            fresh = dict(self._fetch_many(files))
        except IntegrityError as e:  # about some objects only: the other files may still come
            log.warning("fetching the tensors of %d files at once failed: %s", len(files), e)
            fresh = self._fetch_each(files)
        except PotluckError as e:
            log.warning("fetching the tensors of %d files failed: %s", len(files), e)
            fresh = {}
        self._fresh.update(fresh)
        self._ready.update(batch)
        return list(batch)

    def _fetch_many(self, files: Sequence[tuple[str, Manifest]]) -> Mapping[str, Path]:
        if getattr(self.fetch, "fetch_many", None) is not None:
            return cast(BatchFetcher, self.fetch).fetch_many(files)
        return self._fetch_each(files)

    def _fetch_each(self, files: Sequence[tuple[str, Manifest]]) -> dict[str, Path]:
        """One fetch per file (``smudge``'s way), each settled at once: the objects that came
        are then in the store, so no fresh files are returned."""
        for path, m in files:
            if self.fetch is None:
                break
            try:
                self.fetch(m, path)
            except PotluckError as e:
                log.warning("%s: fetching its tensors failed: %s", path, e)
            finally:
                self.fetch.settle()
        return {}

    def _serve_ready(self, pathname: str, dst: BinaryIO) -> None:
        """Answer a delayed path; after the last one, the batch's fresh files are settled
        (before the next request: ``_settle``)."""
        data, manifest = self._ready.pop(pathname)
        try:
            self._write(pathname, data, manifest, dst, self._fresh)
        finally:
            if not self._ready and not self._delayed and self._fresh:
                self._fresh = {}
                self._unsettled = True

    def _pass_through(self, head: bytes, src: BinaryIO, dst: BinaryIO) -> None:
        with tempfile.SpooledTemporaryFile(max_size=64 << 20, dir=str(self.repo.tmp_dir)) as spool:
            spool.write(head)
            shutil.copyfileobj(src, spool, COPY)  # all input first, then answer
            spool.seek(0)
            shutil.copyfileobj(spool, dst, COPY)

    def _smudge_manifest(
        self, pathname: str, data: bytes, manifest: Manifest, dst: BinaryIO
    ) -> None:
        """Fetch what this file lacks (one batch for the file), then write it."""
        from potluck.ops.vcs import missing_objects

        fresh: Mapping[str, Path] = {}
        if self.fetch is not None and missing_objects(manifest, self.repo.odb):
            try:
                fresh = self.fetch(manifest, pathname)
            except PotluckError as e:
                log.warning("%s: fetching its tensors failed: %s", pathname, e)
        try:
            self._write(pathname, data, manifest, dst, fresh)
        finally:
            self._unsettled = self._unsettled or bool(fresh)

    def _write(
        self,
        pathname: str,
        data: bytes,
        manifest: Manifest,
        dst: BinaryIO,
        fresh: Mapping[str, Path],
    ) -> None:
        """The checkpoint, or the manifest as it is when objects are missing (never a broken
        checkpoint)."""
        from potluck.ops.vcs import missing_objects, write_file
        from potluck.remote.memory import reuse_freed_memory
        from potluck.workers import release_free_memory

        missing = [o for o in missing_objects(manifest, self.repo.odb) if o not in fresh]
        if missing:
            hint = self.fetch.pull_hint() if self.fetch is not None else PULL_HINT
            log.warning(
                "%s left as a manifest: %d of %d objects are not in the local store; %s",
                pathname, len(missing), len(set(manifest.oids())), hint,
            )  # fmt: skip
            dst.write(data)
            return
        reuse_freed_memory()  # decoding churns through multi-MiB chunk buffers (this process)
        try:
            write_file(manifest, self.repo.odb, dst, path=pathname, fresh=fresh)
        finally:
            release_free_memory()  # kept for reuse within the file only

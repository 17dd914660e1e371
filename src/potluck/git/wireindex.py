"""The wire index (``ops.vcs.wire``) kept in git, next to the commits it serves.

The remote ref ``refs/potluck/wire`` points to a commit whose tree holds one index blob per
push (named by its blob id, so concurrent pushes never collide). A push adds its blob on top of
the remote's current commit and pushes fast-forward only; when someone else got there first
it fetches and tries again. Each clone keeps its copy under
``refs/potluck/remotes/<remote>/wire``.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading

from potluck.errors import FormatError
from potluck.git.plumbing import Git
from potluck.ops.vcs import WireEntry, dump_index, parse_index

log = logging.getLogger("potluck")
REF = "refs/potluck/wire"
ATTEMPTS = 5
_IDENTITY = {
    "GIT_AUTHOR_NAME": "potluck",
    "GIT_AUTHOR_EMAIL": "potluck@localhost",
    "GIT_COMMITTER_NAME": "potluck",
    "GIT_COMMITTER_EMAIL": "potluck@localhost",
}
# a lost race with another publisher (retry), as opposed to a refusal (hook, permissions)
_RACE = ("non-fast-forward", "fetch first", "stale info", "cannot lock ref")


def tracking_ref(remote: str) -> str:
    """Where this clone keeps the remote's index (a URL is replaced by a hash of it)."""
    safe = remote if re.fullmatch(r"[A-Za-z0-9._-]+", remote) else (
        "url-" + hashlib.sha256(remote.encode()).hexdigest()[:16]
    )  # fmt: skip
    return f"refs/potluck/remotes/{safe}/wire"


def _fetch_ref(git: Git, remote: str) -> str | None:
    """Update the tracking ref from ``remote``; return its commit (None when there is none)."""
    tracking = tracking_ref(remote)
    proc = git.run_proc(
        "fetch", "-q", "--no-tags", "--no-write-fetch-head", "--", remote, f"+{REF}:{tracking}"
    )
    if proc.returncode != 0:
        text = proc.stderr.decode("utf-8", "replace").strip()
        if "couldn't find remote ref" in text:  # none there (any more): forget our old copy
            git.run_proc("update-ref", "-d", tracking)
            return None
        log.warning("could not fetch the wire index from %s: %s", remote, text)
    return git.rev_parse(tracking)


def read_index(git: Git, commit: str | None) -> dict[str, WireEntry]:
    """All entries of the index commit ``commit`` (empty for None); damaged blobs are skipped
    with a warning (their objects are then fetched as plain bytes)."""
    if commit is None:
        return {}
    entries: dict[str, WireEntry] = {}
    names = [blob for _, blob in git.list_blobs(commit)]
    with git.batch() as batch:
        for blob in names:
            data = batch.get(blob)
            try:
                entries.update(parse_index(data or b""))
            except FormatError as e:
                log.warning("skipping wire index blob %s: %s", blob[:12], e.message)
    return entries


def fetch_index(git: Git, remote: str) -> dict[str, WireEntry]:
    """The remote's wire index, freshly fetched (the last copy when it cannot be reached; its
    entries are only hints: every use checks the wire objects on the object remote)."""
    return read_index(git, _fetch_ref(git, remote))


def publish(
    git: Git,
    remote: str,
    entries: tuple[WireEntry, ...] | list[WireEntry],
    fetched: bool = False,
) -> bool:
    """Add ``entries`` to the remote's index; False when the remote refuses the ref.

    With ``fetched`` (the tracking ref was just updated) the first attempt builds on it
    without fetching again.
    """
    blob = git.run("hash-object", "-w", "--stdin", input=dump_index(entries)).decode().strip()
    for attempt in range(ATTEMPTS):
        if attempt == 0 and fetched:
            parent = git.rev_parse(tracking_ref(remote))
        else:
            parent = _fetch_ref(git, remote)
        commit = _commit_with(git, parent, blob)
        proc = git.run_proc("push", "-q", "--no-verify", "--", remote, f"{commit}:{REF}")
        if proc.returncode == 0:
            git.run("update-ref", tracking_ref(remote), commit)
            return True
        text = proc.stderr.decode("utf-8", "replace")
        if not any(word in text for word in _RACE):
            log.warning("the remote refused %s: %s", REF, text.strip())
            return False
    log.warning("gave up updating %s after %d attempts (concurrent pushes)", REF, ATTEMPTS)
    return False


def _commit_with(git: Git, parent: str | None, blob: str) -> str:
    """A commit of the parent's tree plus the index blob ``blob``."""
    lines = []
    if parent is not None:
        lines = [ln for ln in git.run("ls-tree", parent).decode().splitlines() if ln]
    lines.append(f"100644 blob {blob}\t{blob}")
    tree_text = "".join(sorted(set(ln + "\n" for ln in lines)))
    tree = git.run("mktree", input=tree_text.encode()).decode().strip()
    parents = ["-p", parent] if parent else []
    out = git.run(
        "commit-tree", tree, *parents, "-m", "potluck wire index", env=_IDENTITY
    )  # fmt: skip
    return out.decode().strip()


class Publisher:
    """Publishes the wire index on a thread while the plain objects upload (``early``)."""

    def __init__(self, git: Git, remote: str, fetched: bool) -> None:
        self.git, self.remote, self.fetched = git, remote, fetched
        self._thread: threading.Thread | None = None
        self._outcome: list[bool | BaseException] = []

    def start(self, entries: tuple[WireEntry, ...]) -> None:
        """Start publishing ``entries`` (their wire objects are on the remote)."""

        def run() -> None:
            try:
                done = publish(self.git, self.remote, entries, fetched=self.fetched)
                self._outcome.append(done)
            except BaseException as e:  # re-raised by result
                self._outcome.append(e)

        self._thread = threading.Thread(target=run, name="potluck-publish-index", daemon=True)
        self._thread.start()

    def join(self) -> None:
        """Wait for the publication, if one was started."""
        if self._thread is not None:
            self._thread.join()

    def result(self) -> bool:
        """Wait for the publication: whether the remote took the index (False when none was
        started); its error, if it raised one."""
        if self._thread is None:
            return False
        self.join()
        outcome = self._outcome[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

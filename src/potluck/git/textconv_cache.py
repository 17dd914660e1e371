"""git's textconv cache for potluck manifests, filled before ``git log -p`` needs it.

``git log -p`` shows a change of a tracked checkpoint through ``diff.potluck.textconv`` (one
line per tensor). With ``diff.potluck.cachetextconv`` git keeps each blob's text in the notes
ref ``refs/notes/textconv/potluck``, but only after it has started one textconv process per
blob, which is what made a first ``git log -p`` hundreds of times slower than git-lfs's.

potluck writes those notes itself wherever it holds a manifest anyway: the filter notes every
manifest it cleans (``git add``) or smudges (checkout); ``potluck textconv --fill-cache`` does
it for the whole history (a clone). The filter renders and stores each note's text on a
background thread as soon as the manifest is noted, while git is still busy with the filter's
answer (hashing it, the next file), and commits the new notes there once nothing more is
queued; the filter's exit waits for that thread, so the notes are there when git ends.

The notes are git's own cache format, which git reads and extends: a notes tree (blob id →
text), committed without parent under the message by which git tells that the cache belongs to
the configured textconv command. Notes of a cache made for another command are
dropped, as git drops them. A failure to write the cache is logged and otherwise ignored: it
is only a cache.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import threading
from collections.abc import Callable, Container, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from potluck.errors import GitError, PotluckError
from potluck.git.plumbing import Git
from potluck.objects.manifest import Manifest

log = logging.getLogger("potluck")

NOTES_REF = "refs/notes/textconv/potluck"
ENABLED_KEY = "diff.potluck.cachetextconv"
COMMAND_KEY = "diff.potluck.textconv"
#: who the cache's commits are by (git's own cache commits use the user's name; this one
#: must not fail where no user name is configured)
_IDENTITY = {
    "GIT_AUTHOR_NAME": "potluck",
    "GIT_AUTHOR_EMAIL": "potluck@localhost",
    "GIT_COMMITTER_NAME": "potluck",
    "GIT_COMMITTER_EMAIL": "potluck@localhost",
}

Render = Callable[[Manifest], bytes]


def blob_id(data: bytes, object_format: str = "sha1") -> str:
    """The id git gives a blob with content ``data`` (``sha1`` or ``sha256`` repositories)."""
    h = hashlib.new(object_format)
    h.update(b"blob %d\0" % len(data))
    h.update(data)
    return h.hexdigest()


class TextconvCache:
    """Notes to add to the cache: ``note`` each manifest blob met, ``flush`` once at the end.

    A noted manifest is prepared on one background thread at once: its blob id computed, its
    text rendered and stored as a blob unless the cache has it (the settings and the cache's
    notes read by the first preparation), and once nothing more is queued the new notes are
    committed. ``flush`` waits for that (and commits what is left).
    """

    def __init__(self, git: Git, render: Render) -> None:
        self.git = git
        self.render = render
        self._lock = threading.Lock()
        self._queue: list[tuple[bytes, Manifest]] = []  # noted, not yet prepared
        self._jobs: list[Future[None]] = []
        self._pool: ThreadPoolExecutor | None = None
        # the worker's own (read by ``flush`` only once every job has ended)
        self._looked = False  # whether ``_target`` is known (None: the cache is off)
        self._target: _Target | None = None
        self._fresh: dict[str, str] = {}  # manifest blob id -> text blob id, not committed
        self._added = 0  # notes committed since the last flush

    def note(self, text: bytes, manifest: Manifest) -> None:
        """Remember the manifest blob ``text`` (parsed: ``manifest``) and start preparing it."""
        with self._lock:
            self._queue.append((text, manifest))
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="potluck-textconv")
            self._jobs.append(self._pool.submit(self._prepare))

    def _prepare(self) -> None:
        """Render and store the text of every manifest queued now (one ``hash-object``)."""
        with self._lock:
            queued, self._queue = self._queue, []
        if not queued:
            return
        if not self._looked:
            self._target, self._looked = _target(self.git), True
        target = self._target
        if target is None:
            return
        texts = _new_texts(target, queued, self.render, self._fresh)
        if texts:
            self._fresh.update(_write_blobs(self.git, texts, target.git_dir))
        with self._lock:
            idle = not self._queue
        if idle:  # else the job of what was queued meanwhile commits it all
            self._commit_fresh()

    def _commit_fresh(self) -> None:
        """Commit the notes stored since the last commit (the worker's, or ``flush``'s)."""
        fresh, target = self._fresh, self._target
        if not fresh or target is None:
            return
        self._fresh = {}
        done = _commit(self.git, target, fresh)
        if done is None:  # another writer moved the cache: read it again for later notes
            self._looked = False
        else:
            self._target, self._added = done, self._added + len(fresh)

    def flush(self) -> int:
        """Write the notes of every manifest noted since the last flush; return how many were
        new (0 when the cache is off or the textconv command is not configured)."""
        with self._lock:
            jobs, self._jobs = self._jobs, []
            pool, self._pool = self._pool, None
        if pool is None:
            return 0
        try:
            for job in jobs:
                job.result()
            self._commit_fresh()
            return self._added
        except (PotluckError, OSError) as e:
            log.warning("potluck: the textconv cache was not updated (%s)", e)
            return 0
        finally:
            pool.shutdown()
            self._fresh, self._target, self._looked, self._added = {}, None, False, 0


@dataclass(frozen=True)
class _Target:
    """Where the notes go: the cache's validity (the textconv command), the object format,
    the git directory, the cache's commit (None: no cache yet) and its notes."""

    validity: str
    fmt: str
    git_dir: Path
    commit: str | None
    notes: dict[str, str]


def _target(git: Git) -> _Target | None:
    """The cache as it is now, None when it is off (one ``git config``, one ``rev-parse``,
    and with a cache ``cat-file`` plus ``ls-tree``)."""
    validity = _settings(git)
    if validity is None:
        return None
    fmt, git_dir, old = _where(git)
    return _Target(validity, fmt, git_dir, old, _existing(git, old, validity))


def _settings(git: Git) -> str | None:
    """The configured textconv command when the cache is on, else None (both keys read by
    one ``git config``; a key set without a value is a true boolean, as git reads it)."""
    values = git.config_matching((ENABLED_KEY, COMMAND_KEY))
    enabled = values.get(ENABLED_KEY.lower(), "")
    if enabled is not None and enabled.lower() not in ("true", "yes", "on", "1"):
        return None
    return values.get(COMMAND_KEY.lower()) or None


def _where(git: Git) -> tuple[str, Path, str | None]:
    """(the object format, the absolute git directory, the cache's commit or None), from one
    ``git rev-parse``: it prints the first two, then the commit when the ref names one."""
    args = (
        "rev-parse", "--show-object-format", "--absolute-git-dir",
        "--verify", "--quiet", "--end-of-options", f"{NOTES_REF}^{{commit}}",
    )  # fmt: skip
    proc = git.run_proc(*args)
    lines = proc.stdout.decode("utf-8", "surrogateescape").rstrip("\n").split("\n")
    if proc.returncode not in (0, 1) or len(lines) < 2 + (proc.returncode == 0):
        raise GitError(f"`git {' '.join(args)}` failed ({proc.returncode})")
    commit = lines.pop() if proc.returncode == 0 else None
    return lines[0].strip() or "sha1", Path("\n".join(lines[1:])), commit


def _existing(git: Git, commit: str | None, validity: str) -> dict[str, str]:
    """The notes {blob id: text blob id} of the cache ``commit``; none when it was made for
    another command (git would not use them either)."""
    if commit is None:
        return {}
    raw = git.run("cat-file", "commit", commit).decode("utf-8", "replace")
    message = raw.split("\n\n", 1)[1] if "\n\n" in raw else ""
    subject = " ".join(message.split("\n\n", 1)[0].split("\n")).strip()
    if subject != validity.strip():
        return {}
    notes: dict[str, str] = {}
    listing = git.run("ls-tree", "-r", "-z", commit).decode("ascii", "replace")
    for line in filter(None, listing.split("\0")):
        meta, path = line.split("\t", 1)
        notes[path.replace("/", "")] = meta.split()[2]
    return notes


def fill(git: Git, manifests: Iterable[tuple[bytes, Manifest]], render: Render) -> int:
    """Add a note for each ``(manifest blob text, parsed manifest)`` that the cache lacks;
    return how many were added. One notes commit for all of them."""
    target = _target(git)
    if target is None:
        return 0
    texts = _new_texts(target, manifests, render)
    if not texts:
        return 0
    done = _commit(git, target, _write_blobs(git, texts, target.git_dir))
    return 0 if done is None else len(texts)


def _new_texts(
    target: _Target,
    manifests: Iterable[tuple[bytes, Manifest]],
    render: Render,
    stored: Container[str] = (),
) -> dict[str, bytes]:
    """{manifest blob id: rendered text} of each manifest that neither the cache nor
    ``stored`` (texts stored already, not yet committed) has a note for, each once."""
    texts: dict[str, bytes] = {}
    for text, manifest in manifests:
        oid = blob_id(text, target.fmt)
        if oid not in target.notes and oid not in stored and oid not in texts:
            texts[oid] = render(manifest)
    return texts


def _commit(git: Git, target: _Target, fresh: dict[str, str]) -> _Target | None:
    """Commit the cache's notes plus ``fresh`` ({manifest blob id: text blob id}) as the new
    cache, unless another writer moved it meanwhile (None); the cache as it is then."""
    notes = {**target.notes, **fresh}
    tree_input = "".join(f"100644 blob {blob}\t{oid}\n" for oid, blob in sorted(notes.items()))
    tree = git.run("mktree", input=tree_input.encode("ascii")).decode().strip()
    commit = git.run("commit-tree", tree, "-m", target.validity, env=_IDENTITY).decode().strip()
    expected = target.commit or "0" * len(commit)  # none yet: the ref must not exist
    proc = git.run_proc("update-ref", "-m", "potluck textconv cache", NOTES_REF, commit, expected)
    if proc.returncode != 0:  # another writer (git log -p, a second filter) came first
        log.info("potluck: the textconv cache changed meanwhile; these notes wait for next time")
        return None
    return replace(target, commit=commit, notes=notes)


def _write_blobs(git: Git, texts: dict[str, bytes], git_dir: Path) -> dict[str, str]:
    """Store each text as a blob (one ``hash-object`` for all: a single text through its
    stdin, several through files in a scratch directory of ``git_dir``); {key: blob id}."""
    if len(texts) == 1:
        out = git.run(
            "hash-object", "-w", "--no-filters", "--stdin", input=next(iter(texts.values()))
        )
    else:
        with tempfile.TemporaryDirectory(prefix="potluck-textconv-", dir=git_dir) as tmp:
            paths = []
            for i, text in enumerate(texts.values()):
                path = Path(tmp) / str(i)
                path.write_bytes(text)
                paths.append(str(path))
            out = git.run(
                "hash-object", "-w", "--no-filters", "--stdin-paths",
                input="\n".join(paths).encode(),
            )  # fmt: skip
    ids = out.decode().split()
    if len(ids) != len(texts):
        raise PotluckError(f"git hash-object stored {len(ids)} of {len(texts)} texts")
    return dict(zip(texts, ids, strict=True))


def fill_history(git: Git, render: Render) -> int:
    """Note every manifest blob reachable from refs, reflogs or the index (the files the
    ``filter=potluck`` attribute selects); return how many notes were added."""
    from potluck.errors import FormatError
    from potluck.objects.manifest import is_manifest, parse

    blobs = list(git.reachable_blobs())
    tracked = _potluck_paths(git, sorted({path for _, path in blobs}))
    wanted = [oid for oid, path in blobs if path in tracked]
    with git.batch() as batch:

        def manifests() -> Iterable[tuple[bytes, Manifest]]:
            for oid in wanted:
                data = batch.get(oid)
                if data is None or not is_manifest(data):
                    continue
                try:
                    yield data, parse(data)
                except FormatError:
                    continue  # a damaged manifest: its textconv says so when git runs it

        return fill(git, manifests(), render)


def _potluck_paths(git: Git, paths: list[str]) -> set[str]:
    """The ``paths`` that HEAD's .gitattributes give ``filter=potluck`` (read from HEAD's tree
    through a scratch index: a clone made with ``--no-checkout`` has no work tree files yet)."""
    if not paths or git.rev_parse("HEAD^{tree}") is None:
        return set()
    with tempfile.TemporaryDirectory(prefix="potluck-attr-", dir=git.git_dir()) as tmp:
        env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
        git.run("read-tree", "HEAD", env=env)
        out = git.run(
            "check-attr", "--cached", "-z", "--stdin", "filter",
            input="\0".join(paths).encode("utf-8", "surrogateescape") + b"\0", env=env,
        )  # fmt: skip
    fields = out.decode("utf-8", "surrogateescape").split("\0")
    return {fields[i] for i in range(0, len(fields) - 2, 3) if fields[i + 2] == "potluck"}

"""Push, fetch, pull and clone: potluck objects travel beside git's own objects.

git moves the manifests (ordinary blobs); this module moves the objects they name, to and from
the object remote of a git remote (``git.remotes``): on ``git push`` through the pre-push hook,
on checkout through the smudge filter, and with explicit commands.
"""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from potluck.errors import GitError, IntegrityError, PotluckError, RemoteError, UserError
from potluck.fileio import atomic_writer
from potluck.git import evalsync, wireindex
from potluck.git.diskspace import check_space, disk_errors
from potluck.git.plumbing import Git
from potluck.git.remotes import RemoteSpec, git_remote_url, open_object_remote
from potluck.git.repo import MAX_MANIFEST_BYTES, Repo, worktree_manifests
from potluck.git.selection import Selection, configured_selection, pull_hint, save_selection
from potluck.objects.manifest import Manifest, is_manifest, parse
from potluck.ops.vcs import (
    OnBytes,
    PushReport,
    Wanted,
    WireEntry,
    fetch_objects,
    missing_objects,
    push_objects,
    store_fresh,
    write_file,
)
from potluck.ops.vcs.wire import verify_remote
from potluck.remote import ObjectRef, ObjectRemote, TransferStats

log = logging.getLogger("potluck")
FETCH_ON_CHECKOUT = "potluck.fetchOnCheckout"
ENCODED_TRANSFER = "potluck.encodedTransfer"
#: set by ``clone`` for its checkout: the git remote whose wire index came with the clone's own
#: fetch, so the filter reads that copy instead of fetching it again
WIRE_FETCHED_ENV = "POTLUCK_WIRE_FETCHED"
CLONE_REMOTE = "origin"
#: objects at the tips of what the git remote has that a push checks on the object remote
TIP_SAMPLE = 100
MAX_TIPS = 32


# -- which manifests ------------------------------------------------------------------------


def _manifest_blobs(repo: Repo, blobs: dict[str, str]) -> dict[str, tuple[str, Manifest]]:
    """blob id → (path, manifest) for those of ``blobs`` (blob → path) that are manifests."""
    sizes = repo.git.object_sizes(list(blobs))
    out: dict[str, tuple[str, Manifest]] = {}
    with repo.git.batch() as batch:
        for blob, path in blobs.items():
            if sizes.get(blob, MAX_MANIFEST_BYTES + 1) > MAX_MANIFEST_BYTES:
                continue
            data = batch.get(blob)
            if data is not None and is_manifest(data):
                out[blob] = (path, parse(data, f"{path} (blob {blob[:12]})"))
    return out


def _introducing_commits(
    git: Git, include: Sequence[str], exclude: Sequence[str]
) -> dict[str, str]:
    """blob id → the oldest commit in the range that wrote it (for error messages)."""
    raw = git.run(
        "log", "--raw", "--no-abbrev", "--no-renames", "--root", "--diff-merges=first-parent",
        "--format=%x00%H", *include, "--not", *exclude, "--",
    )  # fmt: skip
    found: dict[str, str] = {}
    commit = ""
    for line in raw.decode("utf-8", "replace").splitlines():
        if line.startswith("\0"):
            commit = line[1:]
        elif line.startswith(":"):
            fields = line.split("\t", 1)[0].split()
            if len(fields) >= 4:
                found[fields[3]] = commit  # log is newest first: the last seen is the oldest
    return found


def new_manifests(
    repo: Repo, include: Sequence[str], exclude: Sequence[str]
) -> tuple[dict[str, tuple[str, Manifest]], dict[str, str]]:
    """Manifests reachable from ``include`` but not from ``exclude``, and the commit that
    introduced each (by blob id)."""
    if not include:
        return {}, {}
    raw = repo.git.run(
        "rev-list", "--objects", "--filter=object:type=blob", *include, "--not", *exclude,
    )  # fmt: skip
    blobs: dict[str, str] = {}
    for line in raw.decode("utf-8", "surrogateescape").splitlines():
        oid, _, path = line.partition(" ")
        if path:
            blobs.setdefault(oid, path)
    manifests = _manifest_blobs(repo, blobs)
    commits = _introducing_commits(repo.git, include, exclude) if manifests else {}
    return manifests, commits


# -- push -------------------------------------------------------------------------------------


def parse_pre_push(lines: Iterable[str]) -> list[tuple[str, str]]:
    """(local sha, remote sha) for each ref git is about to push (deletions dropped)."""
    updates = []
    for line in lines:
        fields = line.split()
        if len(fields) == 4 and not _is_zero(fields[1]):
            updates.append((fields[1], fields[3]))
    return updates


def _is_zero(sha: str) -> bool:
    """git's all-zero object name (a ref that does not exist), for SHA-1 and SHA-256."""
    return set(sha) == {"0"}


def push_range(
    git: Git, remote: str, updates: Sequence[tuple[str, str]] | None
) -> tuple[list[str], list[str]]:
    """Commits to include / exclude for a push of ``updates`` (None: every local branch and
    tag) to ``remote``: what the remote-tracking refs (and remote shas we know) already have."""
    exclude = _tracking(git, remote)
    if updates is None:
        return ["--branches", "--tags"], exclude
    include = [local for local, _ in updates]
    for _, theirs in updates:
        if not _is_zero(theirs) and git.rev_parse(theirs + "^{commit}"):
            exclude.append(theirs)
    return include, exclude


def push(
    repo: Repo,
    remote: str | None = None,
    updates: Sequence[tuple[str, str]] | None = None,
    *,
    everything: bool = False,
    verify: bool = False,
    on_bytes: OnBytes | None = None,
) -> tuple[RemoteSpec, PushReport]:
    """Upload the objects of the commits being pushed that the object remote lacks.

    ``updates`` come from the pre-push hook; None means every local branch and tag. The range
    is cut at what the git remote is known to have (its remote-tracking refs and branch tips)
    only after a sample of the objects at those commits is found on the object remote: a
    store that was replaced, emptied or re-created gets every commit's objects. With
    ``everything`` the range is not cut at all; ``verify`` also takes in every commit of the
    remote-tracking refs (what git says is pushed), so the remote ends up holding every
    object they need. Whether an object is there is always asked of the object remote (an
    index entry whose wire object is gone counts as missing and is sent as plain bytes).
    """
    spec, obj_remote = open_object_remote(repo.git, remote)
    try:
        include, exclude = push_range(repo.git, spec.name, updates)
        if verify:
            include, exclude = [*include, *_tracking(repo.git, spec.name)], []
        encode = _config_bool(repo.git, ENCODED_TRANSFER, True)
        index = _LazyIndex(repo.git, spec.name, encode)
        if everything or (exclude and not _remote_has_tips(repo, obj_remote, exclude, index)):
            exclude = []
        manifests, commits = new_manifests(repo, include, exclude)
        wanted = Wanted()
        for blob, (path, m) in manifests.items():
            wanted.add_manifest(m, path, commits.get(blob))
        publisher = wireindex.Publisher(repo.git, spec.name, fetched=encode)
        try:
            report = push_objects(
                repo.odb, obj_remote, wanted, on_bytes, index=index.get() if wanted else {},
                encode=encode and len(wanted) > 0, early=publisher.start,
            )  # fmt: skip
        except BaseException:
            publisher.join()  # never leave a git push half done; the upload's error wins
            raise
        early = publisher.result()
        published = report.encoded and (
            early if report.early else wireindex.publish(
                repo.git, spec.name, report.encoded, fetched=encode
            )
        )  # fmt: skip
        if report.encoded and not published:
            report = _push_plain_instead(repo, obj_remote, wanted, report, on_bytes)
    finally:
        obj_remote.close()
    return spec, report


class _LazyIndex:
    """The remote's wire index, fetched on first use (only with encoded transfer on)."""

    def __init__(self, git: Git, remote: str, enabled: bool) -> None:
        self.git, self.remote, self.enabled = git, remote, enabled
        self._index: dict[str, WireEntry] | None = None

    def get(self) -> dict[str, WireEntry]:
        """The index (empty when encoded transfer is off)."""
        if self._index is None:
            self._index = wireindex.fetch_index(self.git, self.remote) if self.enabled else {}
        return self._index


def _tracking(git: Git, remote: str) -> list[str]:
    """``--remotes=NAME`` when ``remote`` is a configured git remote (else nothing)."""
    return [f"--remotes={remote}"] if git_remote_url(git, remote) is not None else []


def _remote_has_tips(
    repo: Repo, remote: ObjectRemote, exclude: Sequence[str], index: _LazyIndex
) -> bool:
    """Whether a sample of the objects at the commits ``exclude`` names (the remote-tracking
    refs, the remote's branch tips) is really on the object remote: one existence check of
    up to ``TIP_SAMPLE`` objects. The refs say what the git remote has, not what its store
    holds."""
    out = repo.git.run_proc("rev-parse", *exclude).stdout.decode().split()
    tips = list(dict.fromkeys(t for t in out if not t.startswith("-")))[:MAX_TIPS]
    blobs: dict[str, str] = {}
    for tip in tips:
        for path, blob in repo.git.list_blobs(tip):
            blobs.setdefault(blob, path)
    refs = {
        ObjectRef(e.oid, e.size)
        for _, m in _manifest_blobs(repo, blobs).values()
        for e in m.entries
    }
    sample = sorted(refs)[:TIP_SAMPLE]
    if not sample:
        return True
    view = verify_remote(remote, sample, index.get())
    lacking = len(sample) - len(view.present & {r.oid for r in sample})
    if lacking:
        log.warning(
            "%s lacks %d of %d sampled objects of commits the git remote already has (a new or "
            "emptied object store?); checking the objects of every commit",
            remote.url, lacking, len(sample),
        )  # fmt: skip
    return lacking == 0


def _push_plain_instead(
    repo: Repo, remote: ObjectRemote, wanted: Wanted, report: PushReport, on_bytes: OnBytes | None
) -> PushReport:
    """The index could not be published: send the encoded objects as plain bytes too, so the
    remote is complete without it."""
    oids = {e.oid for e in report.encoded}
    subset = Wanted({r: w for r, w in wanted.refs.items() if r.oid in oids}, wanted.itemsizes)
    again = push_objects(repo.odb, remote, subset, on_bytes)
    return PushReport(
        report.checked, report.uploaded + again.uploaded, report.bytes + again.bytes,
        report.already_there, stale=report.stale,
    )  # fmt: skip


# -- fetch ------------------------------------------------------------------------------------


def manifests_at(repo: Repo, revs: Sequence[str]) -> dict[str, tuple[str, Manifest]]:
    """blob → (path, manifest) of every potluck file in the trees of ``revs``."""
    blobs: dict[str, str] = {}
    for rev in revs:
        if repo.git.rev_parse(rev + "^{tree}") is None:
            raise UserError(f"unknown revision {rev!r}", hint="`git log --oneline` lists them")
        for path, blob in repo.git.list_blobs(rev):
            blobs.setdefault(blob, path)
    return _manifest_blobs(repo, blobs)


def wanted_for(
    manifests: Iterable[tuple[str, Manifest]], selection: Selection, commit: str | None = None
) -> Wanted:
    """The objects of ``manifests`` that ``selection`` accepts."""
    wanted = Wanted()
    for path, m in manifests:
        wanted.add_manifest(m, path, commit, functools.partial(_accepts, selection, path))
    return wanted


def _accepts(selection: Selection, path: str, tensor: str) -> bool:
    return selection.accepts(path, tensor)


def fetch(
    repo: Repo,
    remote: str | None = None,
    revs: Sequence[str] = ("HEAD",),
    selection: Selection | None = None,
    on_bytes: OnBytes | None = None,
) -> tuple[RemoteSpec, TransferStats]:
    """Download the selected objects of ``revs`` that are not in the local store."""
    selection = selection if selection is not None else configured_selection(repo.git)
    manifests = manifests_at(repo, revs)
    wanted = wanted_for(manifests.values(), selection)
    spec, obj_remote = open_object_remote(repo.git, remote)
    try:
        with disk_errors(repo, f"fetching the objects of {', '.join(revs)}"):
            stats = _fetch(repo, spec, obj_remote, wanted, on_bytes)
    finally:
        obj_remote.close()
    return spec, stats


def _fetch(
    repo: Repo, spec: RemoteSpec, remote: ObjectRemote, wanted: Wanted, on_bytes: OnBytes | None
) -> TransferStats:
    """Fetch with the remote's wire index when anything is missing."""
    if all(repo.odb.has(r.oid) for r in wanted.refs):
        return TransferStats(skipped=len(wanted.refs))
    index = wireindex.fetch_index(repo.git, spec.name)
    tmp = repo.tmp_dir / "incoming"
    return fetch_objects(repo.odb, remote, wanted, tmp, on_bytes, index=index)


def fetch_manifest(
    repo: Repo, m: Manifest, path: str, names: Sequence[str] | None = None,
    remote: str | None = None,
) -> TransferStats:  # fmt: skip
    """Fetch the objects ``m`` needs for ``names`` (all tensors when None) that are missing."""
    wanted = Wanted()
    needed = None if names is None else _storages(m, names)
    wanted.add_manifest(m, path, None, None if needed is None else needed.__contains__)
    if all(repo.odb.has(r.oid) for r in wanted.refs):
        return TransferStats(skipped=len(wanted.refs))
    spec, obj_remote = open_object_remote(repo.git, remote)
    try:
        return _fetch(repo, spec, obj_remote, wanted, None)
    finally:
        obj_remote.close()


def _storages(m: Manifest, names: Sequence[str]) -> set[str]:
    """Tensor entries that hold ``names`` (a view's storage stands in for the view)."""
    views = {v.name: v.storage for v in m.views}
    return {views.get(n, n) for n in names}


# -- placeholders -----------------------------------------------------------------------------


def placeholders(repo: Repo) -> list[tuple[str, Manifest]]:
    """Tracked work-tree files that are manifests (their data was not checked out)."""
    return [(p, parse(data, f"work-tree file {p}")) for p, data in worktree_manifests(repo)]


def checkout_placeholders(repo: Repo) -> tuple[list[str], list[str]]:
    """Write the checkpoint of every placeholder whose objects are all present.

    Returns (written, still incomplete). Each file is replaced atomically; git's index is then
    refreshed so the files show as unmodified.
    """
    written: list[str] = []
    incomplete: list[str] = []
    restage: list[str] = []
    staged = {path: blob for path, blob, stage in repo.git.index_entries() if stage == 0}
    for path, m in placeholders(repo):
        if missing_objects(m, repo.odb):
            incomplete.append(path)
            continue
        full = repo.root / path
        blob = repo.git.run("hash-object", "--no-filters", "--", path).decode().strip()
        mode = full.stat().st_mode
        with atomic_writer(full) as out:
            write_file(m, repo.odb, out, path=path)
        full.chmod(mode)
        written.append(path)
        if staged.get(path) == blob:
            restage.append(path)
    # git takes a size change for a modification without re-cleaning, so re-stage the files
    # whose index entry is exactly their manifest (the blob stays, only its stat data changes)
    if restage:
        repo.git.run("update-index", "-q", "--", *restage)
    return written, incomplete


def pull(
    repo: Repo,
    remote: str | None = None,
    selection: Selection | None = None,
    on_bytes: OnBytes | None = None,
) -> tuple[TransferStats, list[str], list[str]]:
    """Fetch the objects of HEAD, then check out every file left as a manifest. A
    ``selection`` is kept for later checkouts and pulls (``save_selection``: ``*`` clears it);
    without one, the kept selection applies. Checkouts fetch again from now on (as before a
    ``clone --no-data``)."""
    if selection is not None:
        save_selection(repo.git, selection)
    repo.git.config_unset(FETCH_ON_CHECKOUT)  # data wanted from now on (after clone --no-data)
    _spec, stats = fetch(repo, remote, ("HEAD",), None, on_bytes)
    with disk_errors(repo, "checking out the files left as manifests"):
        written, incomplete = checkout_placeholders(repo)
    return stats, written, incomplete


# -- clone ------------------------------------------------------------------------------------


def clone(
    url: str,
    directory: Path,
    *,
    install: Callable[[Repo], None],
    no_data: bool = False,
    selection: Selection | None = None,
    branch: str | None = None,
) -> Repo:
    """``git clone`` without checkout, configure potluck (``install``), then check out.

    With ``no_data`` every potluck file is left as a manifest (fetch tensors later with
    ``potluck fetch --include`` / ``potluck pull``); with a selection only those tensors are
    fetched, and files that are not complete are left as manifests.
    """
    if directory.exists() and any(directory.iterdir()):
        raise UserError(f"{directory} exists and is not empty", hint="pick a new directory")
    branch_args = ["--branch", branch] if branch else []
    wire = _wire_refspec(CLONE_REMOTE)  # the wire index and the records come with the commits
    extra = ["-c", f"remote.{CLONE_REMOTE}.fetch={wire}"]
    extra += ["-c", f"remote.{CLONE_REMOTE}.fetch={evalsync.fetch_refspec(CLONE_REMOTE)}"]
    Git(Path.cwd()).run(
        "clone", "--no-checkout", *extra, *branch_args, "--", url, str(directory)
    )  # fmt: skip
    repo = Repo(directory)  # `git fetch` keeps moving the records, not the index (potluck does)
    repo.git.run_proc("config", "--fixed-value", "--unset", f"remote.{CLONE_REMOTE}.fetch", wire)
    install(repo)
    if no_data:
        repo.git.config_set(FETCH_ON_CHECKOUT, "false")
    if selection is not None:
        save_selection(repo.git, selection)
    if repo.git.rev_parse("HEAD") is not None:
        _checkout(repo.git, "reset", "-q", "--hard", "HEAD")
    else:  # the remote's HEAD names no branch (e.g. a bare repo made with another default)
        pick = _fallback_branch(repo.git)
        if pick is not None:
            _checkout(repo.git, "checkout", "-q", "-B", pick, f"origin/{pick}")
    _check_fetched(repo)
    return repo


def _check_fetched(repo: Repo) -> None:
    """Raise when a checkout left files as manifests although their selected tensors should
    have come (the remote failed, the disk was full): the clone is usable, and says how to
    finish it."""
    if not _config_bool(repo.git, FETCH_ON_CHECKOUT, True):
        return
    selection = configured_selection(repo.git)
    failed = [
        path
        for path, m in placeholders(repo)
        if any(not repo.odb.has(r.oid) for r in wanted_for([(path, m)], selection).refs)
    ]
    if failed:
        shown = ", ".join(failed[:5]) + (f" and {len(failed) - 5} more" if len(failed) > 5 else "")
        raise PotluckError(
            f"cloned into {repo.root}, but {len(failed)} file(s) could not be fetched and were "
            f"left as manifests: {shown} (the reasons are above)",
            hint="fix what is said above (free some space, check the remote), then run "
            f"`potluck pull` in {repo.root}: it fetches what is missing (interrupted downloads "
            "resume) and checks the files out",
            paths=failed,
        )


def _wire_refspec(remote: str) -> str:
    """The refspec that copies ``remote``'s wire index to its tracking ref (a glob: a remote
    without an index is no error)."""
    return f"+{wireindex.REF}*:{wireindex.tracking_ref(remote)}*"


def _checkout(git: Git, *args: str) -> None:
    """Run a checkout with stderr passed through: the filter's warnings (files left as
    manifests, and why) reach the user. Its filter uses the wire index the clone fetched."""
    env = {**os.environ, WIRE_FETCHED_ENV: CLONE_REMOTE}
    code = subprocess.run(
        git.command(*args), cwd=git.cwd, stdin=subprocess.DEVNULL, env=env
    ).returncode
    if code != 0:
        raise GitError(f"`git {' '.join(args)}` failed with exit code {code}", hint="see above")


def _fallback_branch(git: Git) -> str | None:
    """main, else master, else the first remote branch of origin; None for an empty repo."""
    out = git.run("for-each-ref", "--format=%(refname:strip=3)", "refs/remotes/origin/")
    names = [n for n in out.decode().split() if n != "HEAD" and not n.startswith("-")]
    for name in ("main", "master"):
        if name in names:
            return name
    return names[0] if names else None


# -- checkout ---------------------------------------------------------------------------------


def _config_bool(git: Git, key: str, default: bool) -> bool:
    value = git.config_get(key)
    if value is None:
        return default
    return value.strip().lower() not in ("false", "no", "off", "0", "")


class CheckoutFetcher:
    """The smudge filter's source of missing objects: one object remote, opened on first use
    and kept for the whole filter process; one batch per file. Disabled by
    ``potluck.fetchOnCheckout=false`` (``potluck clone --no-data``)."""

    def __init__(self, repo: Repo, remote: str | None = None) -> None:
        self.repo = repo
        self.remote_name = remote
        self.enabled = _config_bool(repo.git, FETCH_ON_CHECKOUT, True)
        self.selection = configured_selection(repo.git)
        self._remote: ObjectRemote | None = None
        self._index: dict[str, WireEntry] | None = None
        self._failed: PotluckError | None = None
        self._storing: tuple[threading.Thread, dict[str, Path], list[BaseException]] | None = None

    def __call__(self, m: Manifest, path: str) -> Mapping[str, Path]:
        """Fetch the selected objects ``m`` needs that are not local. After a failure that
        is not about this file's objects (the remote unreachable, retries exhausted), later
        files fail at once instead of retrying again."""
        return self.fetch_many([(path, m)])

    def fetch_many(self, files: Sequence[tuple[str, Manifest]]) -> Mapping[str, Path]:
        """``__call__`` for several files in one batch (a delayed checkout)."""
        if not self.enabled or not files:
            return {}
        path = files[0][0] if len(files) == 1 else f"{len(files)} files"
        wanted = wanted_for(files, self.selection)
        lacking = [r for r in wanted.refs if not self.repo.odb.has(r.oid)]
        if not lacking:
            return {}
        if self._failed is not None:
            raise self._failed
        whole = len(wanted.refs) == len({o for _, m in files for o in m.oids()})  # all written
        written = sum(m.size for _, m in files) if whole else 0
        check_space(self.repo, path, sum(r.size for r in lacking), written)
        try:
            with disk_errors(self.repo, f"fetching the objects of {path}"):
                if self._remote is None or self._index is None:
                    spec, self._remote = open_object_remote(self.repo.git, self.remote_name)
                    self._index = self._wire_index(spec.name)
                tmp = self.repo.tmp_dir / "incoming"
                fresh: dict[str, Path] = {}
                stats = fetch_objects(
                    self.repo.odb, self._remote, wanted, tmp, index=self._index, fresh=fresh
                )  # fmt: skip
        except IntegrityError:
            raise  # about these objects only: other files may still come
        except PotluckError as e:
            self._failed = e
            raise
        except Exception as e:  # a bug must not cost the file: it stays a manifest
            log.debug("fetching the objects of %s failed", path, exc_info=True)
            self._failed = RemoteError(
                f"fetching the objects of {path} failed: {type(e).__name__}: {e}",
                hint="this is a bug in potluck; please report it (run with -v for details)",
            )
            raise self._failed from None
        log.info("%s: fetched %d objects (%d bytes)", path, stats.objects, stats.bytes)
        self._store_in_background(wanted, fresh)
        return fresh

    def _wire_index(self, remote: str) -> dict[str, WireEntry]:
        """``remote``'s wire index: the copy ``clone`` fetched with the commits moments ago
        (``WIRE_FETCHED_ENV`` names the remote), else fetched now. Either way only hints."""
        git = self.repo.git
        if os.environ.get(WIRE_FETCHED_ENV) == remote:
            return wireindex.read_index(git, git.rev_parse(wireindex.tracking_ref(remote)))
        return wireindex.fetch_index(git, remote)

    def pull_hint(self) -> str:
        """What to run to get the tensors of a file left as a manifest (``pull_hint``)."""
        return pull_hint(self.repo.git)

    def _store_in_background(self, wanted: Wanted, fresh: dict[str, Path]) -> None:
        """Put the fresh files into the store on a thread while smudge copies them out."""
        errors: list[BaseException] = []

        def run() -> None:
            try:
                store_fresh(self.repo.odb, wanted, fresh)
            except BaseException as e:  # reported by settle
                errors.append(e)

        thread = threading.Thread(target=run, name="potluck-store-fresh", daemon=True)
        thread.start()
        self._storing = (thread, fresh, errors)

    def settle(self) -> None:
        """Wait until the fresh files are in the store, then delete them."""
        if self._storing is None:
            return
        thread, fresh, errors = self._storing
        self._storing = None
        thread.join()
        for file in fresh.values():
            file.unlink(missing_ok=True)
        if errors:
            log.warning("storing fetched objects failed (fetched again next time): %s", errors[0])

    def close(self) -> None:
        """Finish storing, then close the remote's connections."""
        self.settle()
        if self._remote is not None:
            self._remote.close()
            self._remote = None

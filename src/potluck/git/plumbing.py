"""The only subprocess wrapper around git.

``Git`` runs one-shot commands; ``CatFileBatch`` keeps one ``git cat-file --batch`` process
alive to read many objects cheaply. No shell is ever used, every command runs with
``core.quotepath=off`` and NUL-separated output is used wherever git offers it, so paths with
spaces, newlines or non-ASCII characters come through unchanged.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO

from potluck.errors import GitError, UserError

GIT = "git"
_BASE_ARGS = ("-c", "core.quotepath=off")
#: Options ``log_path`` accepts among its revisions (everything else must not start with '-').
_REV_OPTIONS = frozenset({"--all", "--branches", "--tags", "--remotes"})


def _decode(raw: bytes) -> str:
    """Decode git output (paths are bytes) without ever failing."""
    return raw.decode("utf-8", "surrogateescape")


def _encode(text: str) -> bytes:
    """Inverse of ``_decode``."""
    return text.encode("utf-8", "surrogateescape")


def _hint_for(stderr: str) -> str:
    """Pick a hint for a failed git command from its stderr."""
    low = stderr.lower()
    if "not a git repository" in low:
        return "run this inside a git repository (create one with `git init`)"
    if "unknown revision" in low or "bad revision" in low or "not a valid object" in low:
        return "check that the revision exists (`git log --oneline --all`)"
    if "index.lock" in low:
        return "another git process is running; wait for it or remove the stale index.lock"
    return "run the git command by hand to see its full output and fix the cause"


def refuse_option(value: str, what: str) -> str:
    """``value`` unchanged; ``UserError`` when git would read it as an option (leading ``-``).

    Every user- or repository-given string that reaches a git command line where git has no
    ``--`` or ``--end-of-options`` separator goes through this check first.
    """
    if value.startswith("-"):
        raise UserError(
            f"{what} {value!r} starts with '-'",
            hint=f"a {what} cannot start with '-' (it would be read as an option)",
            value=value,
        )
    return value


def _split_z(raw: bytes) -> list[str]:
    """Split NUL-terminated git output into strings, dropping empty ones."""
    return [_decode(part) for part in raw.split(b"\0") if part]


def _split_z_keep(raw: bytes) -> list[str]:
    """Split NUL-terminated git output into strings, keeping empty fields."""
    parts = raw.split(b"\0")
    if parts and parts[-1] == b"":
        parts.pop()
    return [_decode(part) for part in parts]


class Git:
    """Run git commands in one working directory (a worktree, or any directory inside one)."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = Path(cwd)

    # -- running --------------------------------------------------------------------------

    def command(self, *args: str) -> list[str]:
        """The argv that ``run`` would execute for ``args``."""
        return [GIT, *_BASE_ARGS, *args]

    def _env(self, env: dict[str, str] | None) -> dict[str, str] | None:
        if not env:
            return None
        return {**os.environ, **env}

    def _error(self, args: Sequence[str], code: int, stderr: bytes) -> GitError:
        text = _decode(stderr).strip()
        cmd = "git " + " ".join(args)
        return GitError(
            f"`{cmd}` failed with exit code {code}" + (f": {text}" if text else ""),
            hint=_hint_for(text),
            command=cmd,
            returncode=code,
            stderr=text,
        )

    def run_proc(
        self,
        *args: str,
        input: bytes | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run git and return the completed process whatever its exit code."""
        try:
            return subprocess.run(
                self.command(*args),
                cwd=self.cwd,
                input=input,
                stdin=None if input is not None else subprocess.DEVNULL,
                capture_output=True,
                env=self._env(env),
                check=False,
            )
        except FileNotFoundError as e:
            raise GitError(
                f"cannot run git in {self.cwd}: {e}",
                hint="install git (2.31 or newer) and make sure it is on PATH",
            ) from e

    def run(
        self,
        *args: str,
        input: bytes | None = None,
        check: bool = True,
        env: dict[str, str] | None = None,
    ) -> bytes:
        """Run ``git args…`` and return its stdout; raise ``GitError`` on failure if ``check``."""
        proc = self.run_proc(*args, input=input, env=env)
        if check and proc.returncode != 0:
            raise self._error(args, proc.returncode, proc.stderr)
        return proc.stdout

    def _run_text(self, *args: str) -> str:
        return _decode(self.run(*args)).rstrip("\n")

    # -- repository layout ----------------------------------------------------------------

    def toplevel(self) -> Path:
        """Absolute path of the worktree's top-level directory."""
        return Path(self._run_text("rev-parse", "--show-toplevel"))

    def toplevel_and_common_dir(self) -> tuple[Path, Path]:
        """``toplevel()`` and ``common_dir()`` from one ``git rev-parse``."""
        out = self._run_text(
            "rev-parse", "--show-toplevel", "--path-format=absolute", "--git-common-dir"
        )
        lines = out.split("\n")
        if len(lines) != 2:  # a newline inside a path: ask one at a time
            top = self.toplevel()
            return top, Git(top).common_dir()
        return Path(lines[0]), Path(lines[1])

    def git_dir(self) -> Path:
        """Absolute path of this worktree's git directory (``.git/worktrees/X`` in worktrees)."""
        return Path(self._run_text("rev-parse", "--absolute-git-dir"))

    def common_dir(self) -> Path:
        """Absolute path of the git directory shared by all worktrees (holds objects, config)."""
        return Path(self._run_text("rev-parse", "--path-format=absolute", "--git-common-dir"))

    def git_path(self, name: str) -> Path:
        """Absolute ``git rev-parse --git-path NAME`` (respects ``core.hooksPath`` for hooks)."""
        return Path(self._run_text("rev-parse", "--path-format=absolute", "--git-path", name))

    # -- revisions ------------------------------------------------------------------------

    def rev_parse(self, rev: str) -> str | None:
        """Object id that ``rev`` names, or None when git does not know it."""
        proc = self.run_proc("rev-parse", "--verify", "--quiet", "--end-of-options", rev)
        if proc.returncode != 0:
            if b"not a git repository" in proc.stderr:
                raise self._error(("rev-parse", rev), proc.returncode, proc.stderr)
            return None
        return _decode(proc.stdout).strip() or None

    def merge_base(self, a: str, b: str) -> str | None:
        """Best common ancestor of ``a`` and ``b``, or None when they share no history."""
        args = ("merge-base", "--end-of-options", a, b)
        proc = self.run_proc(*args)
        if proc.returncode == 1 and not proc.stderr.strip():
            return None
        if proc.returncode != 0:
            raise self._error(args, proc.returncode, proc.stderr)
        return _decode(proc.stdout).strip()

    def is_ancestor(self, a: str, b: str) -> bool:
        """True when commit ``a`` is an ancestor of (or equal to) commit ``b``."""
        args = ("merge-base", "--is-ancestor", "--end-of-options", a, b)
        proc = self.run_proc(*args)
        if proc.returncode in (0, 1) and not proc.stderr.strip():
            return proc.returncode == 0
        raise self._error(args, proc.returncode, proc.stderr)

    def rev_list(self, *args: str) -> list[str]:
        """``git rev-list ARGS`` as a list of lines (``ARGS`` may hold options: callers check
        user-given revisions with ``refuse_option``)."""
        return _decode(self.run("rev-list", *args)).splitlines()

    def all_ref_commits(self, include_reflog: bool = True, include_stash: bool = True) -> list[str]:
        """Every commit reachable from refs (optionally also from reflogs and ``refs/stash``).

        With ``include_stash=False`` the ``refs/stash`` ref is skipped; with ``include_reflog``
        the reflog of ``refs/stash`` (older stash entries) is still walked, as git does.
        """
        args = [] if include_stash else ["--exclude=refs/stash"]
        args.append("--all")
        if include_reflog:
            args.append("--reflog")
        return self.rev_list(*args)

    # -- config ---------------------------------------------------------------------------

    def config_get(self, key: str, *, local: bool = False) -> str | None:
        """Value of config ``key`` (all scopes, or only the repository's with ``local``)."""
        args = ["config", *(["--local"] if local else []), "--get", key]
        proc = self.run_proc(*args)
        if proc.returncode == 1:
            return None
        if proc.returncode != 0:
            raise self._error(args, proc.returncode, proc.stderr)
        return _decode(proc.stdout).rstrip("\n")

    def config_matching(self, keys: Sequence[str]) -> dict[str, str | None]:
        """The values of ``keys`` (all scopes) read by one ``git config``, by lower-case key:
        the last value of a key wins, as for ``config_get``; a key set without a value (a
        true boolean) maps to None; keys not set are absent."""
        pattern = "^(" + "|".join(re.escape(k) for k in keys) + ")$"
        args = ["config", "-z", "--get-regexp", pattern]
        proc = self.run_proc(*args)
        if proc.returncode == 1:
            return {}
        if proc.returncode != 0:
            raise self._error(args, proc.returncode, proc.stderr)
        values: dict[str, str | None] = {}
        for item in _split_z(proc.stdout):
            key, newline, value = item.partition("\n")
            values[key.lower()] = value if newline else None
        return values

    def config_set(self, key: str, value: str) -> None:
        """Set repository-local config ``key`` to ``value`` (replacing every existing value)."""
        self.run("config", "--local", "--replace-all", key, value)

    def config_unset(self, key: str) -> bool:
        """Remove every repository-local value of ``key``; False when it was not set."""
        args = ("config", "--local", "--unset-all", key)
        proc = self.run_proc(*args)
        if proc.returncode == 5:
            return False
        if proc.returncode != 0:
            raise self._error(args, proc.returncode, proc.stderr)
        return True

    def config_local_keys(self, section: str) -> list[str]:
        """Repository-local keys under ``section`` (e.g. ``filter.potluck``)."""
        pattern = "^" + re.escape(section) + r"\."
        args = ("config", "--local", "--name-only", "--get-regexp", pattern)
        proc = self.run_proc(*args)
        if proc.returncode == 1:
            return []
        if proc.returncode != 0:
            raise self._error(args, proc.returncode, proc.stderr)
        return _decode(proc.stdout).splitlines()

    # -- index and trees ------------------------------------------------------------------

    def ls_files(self, *paths: str) -> list[str]:
        """Paths in the index (relative to ``cwd``), limited to ``paths`` when given."""
        return _split_z(self.run("ls-files", "-z", "--", *paths))

    def index_entries(self) -> list[tuple[str, str, int]]:
        """``(path, blob_id, stage)`` of every index entry (stages 1-3 during a conflict)."""
        out: list[tuple[str, str, int]] = []
        for rec in self.run("ls-files", "-s", "-z").split(b"\0"):
            meta, _, path = rec.partition(b"\t")
            fields = meta.split(b" ")
            if len(fields) == 3:
                out.append((_decode(path), _decode(fields[1]), int(fields[2])))
        return out

    def show_blob(self, rev_path: str) -> bytes | None:
        """Contents of ``REV:PATH`` (``:PATH`` = index); None when it does not exist."""
        args = ("cat-file", "--end-of-options", "blob", rev_path)
        proc = self.run_proc(*args)
        if proc.returncode != 0:
            if b"not a git repository" in proc.stderr:
                raise self._error(args, proc.returncode, proc.stderr)
            return None
        return proc.stdout

    def list_blobs(self, rev: str, paths: list[str] | None = None) -> list[tuple[str, str]]:
        """``(path, blob_id)`` for every blob in ``rev``'s tree (paths relative to the top)."""
        args = ["ls-tree", "-r", "-z", "--full-tree", "--end-of-options", rev]
        if paths:
            args += ["--", *paths]
        out: list[tuple[str, str]] = []
        for entry in self.run(*args).split(b"\0"):
            if not entry:
                continue
            meta, _, path = entry.partition(b"\t")
            _mode, kind, oid = meta.split(b" ")
            if kind == b"blob":
                out.append((_decode(path), _decode(oid)))
        return out

    def log_path(
        self, path: str, max_count: int | None = None, revs: Sequence[str] = ("HEAD",)
    ) -> list[tuple[str, str, str | None]]:
        """Commits of ``revs`` that changed ``path`` (relative to the top), newest first.

        Each row is ``(commit, subject, blob_id)``; the blob is None where the commit deleted
        the path. At most ``max_count`` rows when given.
        """
        limit = [] if max_count is None else [f"--max-count={max_count}"]
        for rev in revs:
            if rev not in _REV_OPTIONS:
                refuse_option(rev, "revision")
        spec = ":(top,literal)" + path
        raw = self.run("log", "--format=%H%x1f%s", *limit, *revs, "--", spec)
        rows = [line.split("\x1f", 1) for line in _decode(raw).splitlines() if line]
        blobs = self._resolve_many([f"{c}:{path}" for c, _ in rows])
        return [(c, s, b) for (c, s), b in zip(rows, blobs, strict=True)]

    def commits_with_blob(self, blob: str, path: str) -> list[str]:
        """Commits (reachable from any ref) that changed ``path`` to the content ``blob``."""
        rows = self.log_path(path, revs=("--all",))
        return [commit for commit, _, b in rows if b == blob]

    def check_attr_many(self, attr: str, paths: Sequence[str]) -> dict[str, str | None]:
        """Value of gitattribute ``attr`` for each path (None = unspecified).

        Other values are git's: ``set``, ``unset`` or the assigned string.
        """
        if not paths:
            return {}
        fields = _split_z_keep(self.run("check-attr", "-z", attr, "--", *paths))
        out: dict[str, str | None] = {}
        for i in range(0, len(fields) - 2, 3):
            path, value = fields[i], fields[i + 2]
            out[path] = None if value == "unspecified" else value
        return out

    def check_attr(self, attr: str, path: str) -> str | None:
        """Value of gitattribute ``attr`` for ``path`` (None = unspecified)."""
        return self.check_attr_many(attr, [path]).get(path)

    def _resolve_many(self, specs: list[str]) -> list[str | None]:
        """Object ids of many ``REV:PATH`` specs with one ``cat-file --batch-check``."""
        if not specs:
            return []
        if any("\n" in s for s in specs):
            return [self.rev_parse(s) for s in specs]
        data = b"".join(_encode(s) + b"\n" for s in specs)
        out = self.run("cat-file", "--batch-check=%(objectname) %(objecttype)", input=data)
        result: list[str | None] = []
        for line in _decode(out).splitlines():
            oid, _, kind = line.rpartition(" ")
            result.append(oid if kind == "blob" else None)
        return result

    def object_bytes(self, name: str) -> bytes | None:
        """Contents of the object ``name`` names (any type; the name may hold a newline), or
        None when it is missing. Two one-shot commands: ``CatFileBatch.get`` is cheaper."""
        kind = self.run_proc("cat-file", "-t", "--end-of-options", name)
        if kind.returncode != 0:
            if b"not a git repository" in kind.stderr:
                raise self._error(("cat-file", "-t", name), kind.returncode, kind.stderr)
            return None
        args = ("cat-file", "--end-of-options", _decode(kind.stdout).strip(), name)
        proc = self.run_proc(*args)
        if proc.returncode != 0:
            raise self._error(args, proc.returncode, proc.stderr)
        return proc.stdout

    def object_sizes(self, oids: Sequence[str]) -> dict[str, int]:
        """Sizes in bytes of existing objects, with one ``cat-file --batch-check``."""
        if not oids:
            return {}
        data = b"".join(_encode(o) + b"\n" for o in oids)
        out = self.run("cat-file", "--batch-check=%(objectname) %(objectsize)", input=data)
        sizes: dict[str, int] = {}
        for line in _decode(out).splitlines():
            oid, _, size = line.partition(" ")
            if size.isdigit():
                sizes[oid] = int(size)
        return sizes

    # -- reachability ---------------------------------------------------------------------

    def reachable_blobs(
        self, path_filter: Callable[[str], bool] | None = None
    ) -> Iterator[tuple[str, str]]:
        """``(blob_id, path)`` for every blob reachable from refs, reflogs, stash or the index.

        Each blob is reported once, with the first path git found it under; ``path_filter``
        selects on that path. A path containing a newline is reported only up to the newline
        (git's ``rev-list`` prints no more). Used by garbage collection to find live pointers.
        """
        args = self.command(
            "rev-list", "--objects", "--filter=object:type=blob", "--all", "--reflog",
            "--indexed-objects",
        )  # fmt: skip
        proc = subprocess.Popen(
            args, cwd=self.cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdout is not None and proc.stderr is not None
        try:
            for oid, path in _object_lines(proc.stdout):
                if path_filter is None or path_filter(path):
                    yield oid, path
        finally:
            proc.stdout.close()
            err = proc.stderr.read()
            proc.stderr.close()
            code = proc.wait()
        if code != 0:
            raise self._error(args[len(_BASE_ARGS) + 1 :], code, err)

    def batch(self) -> CatFileBatch:
        """A ``CatFileBatch`` reader for this repository (use as a context manager)."""
        return CatFileBatch(self)


def _object_lines(stream: IO[bytes]) -> Iterator[tuple[str, str]]:
    """Parse ``rev-list --objects`` output into ``(oid, path)``, skipping unnamed objects.

    Commits are listed without a name even under ``--filter=object:type=blob``. git prints a
    name only up to its first newline, so such paths arrive truncated.
    """
    for line in stream:
        oid, sep, path = line.rstrip(b"\n").partition(b" ")
        if sep:
            yield _decode(oid), _decode(path)


class CatFileBatch:
    """One persistent ``git cat-file --batch`` process; ``get`` reads objects by name.

    Use as a context manager (or call ``close``). Not thread-safe.
    """

    def __init__(self, git: Git) -> None:
        self._git = git
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> CatFileBatch:
        self._start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _start(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            self._proc = subprocess.Popen(
                self._git.command("cat-file", "--batch"),
                cwd=self._git.cwd,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                bufsize=1 << 16,
            )
        return self._proc

    def _broken(self, what: str) -> GitError:
        proc = self._proc
        err = b""
        if proc is not None and proc.poll() is not None and proc.stderr is not None:
            err = proc.stderr.read()
        self.close()
        return GitError(
            f"git cat-file --batch {what}" + (f": {_decode(err).strip()}" if err else ""),
            hint="check that this is a healthy git repository (`git fsck`)",
        )

    def get(self, rev_or_sha: str) -> bytes | None:
        """Contents of the object ``rev_or_sha`` names, or None when it is missing."""
        if "\n" in rev_or_sha:  # the batch protocol is line-based: ask a one-shot git
            return self._git.object_bytes(rev_or_sha)
        proc = self._start()
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(_encode(rev_or_sha) + b"\n")
            proc.stdin.flush()
        except BrokenPipeError:
            raise self._broken("exited unexpectedly") from None
        header = proc.stdout.readline()
        if not header.endswith(b"\n"):
            raise self._broken("exited unexpectedly")
        fields = header.rstrip(b"\n").rsplit(b" ", 2)
        if len(fields) != 3 or not fields[2].isdigit():
            return None  # "<name> missing" / "<name> ambiguous"
        size = int(fields[2])
        data = proc.stdout.read(size)
        if len(data) != size or proc.stdout.read(1) != b"\n":
            raise self._broken(f"returned a truncated object for {rev_or_sha!r}")
        return data

    def close(self) -> None:
        """Stop the cat-file process."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                with contextlib.suppress(BrokenPipeError):
                    stream.close()
        proc.wait()

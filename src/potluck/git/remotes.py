"""Which object remote belongs to a git remote, and git's credential helpers for it.

Resolution order for git remote ``NAME`` (first match wins):

1. ``remote.NAME.potluckurl`` (set by ``potluck remote set-url``): any URL the remote layer
   knows (``https://…`` = a Git LFS endpoint, ``s3://bucket/prefix``, ``file:///dir``, …);
   fsspec options from the multi-valued ``remote.NAME.potluckoption`` (``key=value``).
2. ``remote.NAME.lfsurl``, then ``lfs.url`` (also read from a committed ``.lfsconfig``), as
   git-lfs does.
3. Derived from the git URL: ``https://host/org/repo[.git]`` → ``…/repo.git/info/lfs``;
   ``git@host:org/repo`` and ``ssh://`` → the https LFS endpoint on the same host; a local
   path or ``file://`` bare repository → ``file://<repo>/lfs`` (git-lfs's own layout for
   local remotes, so no server is needed).
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from potluck.errors import UserError
from potluck.git.plumbing import Git, refuse_option
from potluck.remote import ObjectRemote, RemoteOptions, open_remote

_SCP = re.compile(r"^(?:(?P<user>[^@/]+)@)?(?P<host>[^:/]+):(?P<path>[^/].*)$")


@dataclass(frozen=True)
class RemoteSpec:
    """A resolved object remote: its URL, where the setting came from, fsspec options."""

    name: str
    url: str
    source: str
    options: dict[str, str] = field(default_factory=dict)


def default_remote(git: Git) -> str:
    """The current branch's upstream remote, else ``origin``."""
    branch = git.run_proc("symbolic-ref", "-q", "--short", "HEAD").stdout.decode().strip()
    if branch:
        upstream = git.config_get(f"branch.{branch}.remote")
        if upstream and upstream != ".":
            return upstream
    return "origin"


def git_remote_url(git: Git, name: str) -> str | None:
    """``remote.NAME.url``; None when NAME is not a configured remote."""
    return git.config_get(f"remote.{name}.url")


def lfs_endpoint(url: str, base: Path | None = None) -> str:
    """The object remote URL git-lfs would use for git URL ``url`` (see module doc)."""
    parts = urlsplit(url)
    if parts.scheme in ("http", "https"):
        path = parts.path.rstrip("/")
        if not path.endswith(".git"):
            path += ".git"
        return f"{parts.scheme}://{parts.netloc}{path}/info/lfs"
    if parts.scheme in ("ssh", "git+ssh", "ssh+git"):
        host = parts.hostname or ""
        path = parts.path.lstrip("/")
        return lfs_endpoint(f"https://{host}/{path}")
    if parts.scheme == "file":
        return "file://" + str(Path(parts.path).resolve()) + "/lfs"
    scp = _SCP.match(url)
    if scp and not parts.scheme and not os.path.exists(url):
        return lfs_endpoint(f"https://{scp.group('host')}/{scp.group('path')}")
    if parts.scheme and len(parts.scheme) > 1:
        raise UserError(
            f"cannot derive an object remote from git URL {url!r}",
            hint="set one with `potluck remote set-url NAME URL`",
        )
    local = Path(url)
    if not local.is_absolute() and base is not None:
        local = base / local
    return "file://" + str(local.resolve()) + "/lfs"


def _options(git: Git, name: str) -> dict[str, str]:
    proc = git.run_proc("config", "--get-all", f"remote.{name}.potluckoption")
    opts: dict[str, str] = {}
    for line in proc.stdout.decode().splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            raise UserError(
                f"remote.{name}.potluckoption {line!r} is not key=value",
                hint=f"fix it with `git config --unset-all remote.{name}.potluckoption`",
            )
        opts[key.strip()] = value.strip()
    return opts


def resolve(git: Git, name: str | None = None) -> RemoteSpec:
    """The object remote for git remote ``name`` (or a git URL given instead of a name)."""
    name = refuse_option(name or default_remote(git), "remote name or URL")
    explicit = git.config_get(f"remote.{name}.potluckurl")
    if explicit:
        return RemoteSpec(name, explicit, f"remote.{name}.potluckurl", _options(git, name))
    for key in (f"remote.{name}.lfsurl", "lfs.url"):
        value = git.config_get(key)
        if value:
            return RemoteSpec(name, value, key)
    lfsconfig = git.cwd / ".lfsconfig"
    if lfsconfig.is_file():
        proc = git.run_proc("config", "-f", str(lfsconfig), "--get", "lfs.url")
        if proc.returncode == 0 and proc.stdout.strip():
            return RemoteSpec(name, proc.stdout.decode().strip(), ".lfsconfig lfs.url")
    url = git_remote_url(git, name)
    if url is None:
        if "/" in name or ":" in name:  # a URL or path given in place of a remote name
            return RemoteSpec(name, lfs_endpoint(name, git.cwd), "git URL")
        raise UserError(
            f"no git remote named {name!r}",
            hint="add one with `git remote add NAME URL`, or give a URL",
        )
    return RemoteSpec(name, lfs_endpoint(url, git.cwd), f"remote.{name}.url")


def set_url(git: Git, name: str, url: str, options: dict[str, str] | None = None) -> None:
    """Set ``remote.NAME.potluckurl`` (and replace its options when given)."""
    refuse_option(name, "remote name")
    git.config_set(f"remote.{name}.potluckurl", url)
    if options is not None:
        git.config_unset(f"remote.{name}.potluckoption")
        for key, value in options.items():
            git.run("config", "--local", "--add", f"remote.{name}.potluckoption", f"{key}={value}")


class GitCredentials:
    """Credentials from git's helpers (``git credential fill|approve|reject``)."""

    def __init__(self, git: Git) -> None:
        self.git = git

    def _describe(self, url: str, extra: dict[str, str] | None = None) -> bytes:
        parts = urlsplit(url)
        lines = [f"protocol={parts.scheme}", f"host={parts.netloc.rpartition('@')[2]}"]
        if parts.path:
            lines.append(f"path={parts.path.lstrip('/')}")
        lines += [f"{k}={v}" for k, v in (extra or {}).items()]
        return ("\n".join(lines) + "\n\n").encode()

    def fill(self, url: str) -> tuple[str, str] | None:
        """Ask the helpers (and, on a terminal, the user) for a username and password."""
        env = {} if sys.stdin.isatty() else {"GIT_TERMINAL_PROMPT": "0"}
        proc = self.git.run_proc("credential", "fill", input=self._describe(url), env=env)
        if proc.returncode != 0:
            return None
        found = dict(
            line.split("=", 1) for line in proc.stdout.decode().splitlines() if "=" in line
        )
        if "username" not in found or "password" not in found:
            return None
        return found["username"], found["password"]

    def approve(self, url: str, username: str, password: str) -> None:
        """Tell the helpers these credentials worked (they may store them)."""
        data = self._describe(url, {"username": username, "password": password})
        self.git.run_proc("credential", "approve", input=data)

    def reject(self, url: str, username: str, password: str) -> None:
        """Tell the helpers these credentials failed (they forget them)."""
        data = self._describe(url, {"username": username, "password": password})
        self.git.run_proc("credential", "reject", input=data)


def open_object_remote(
    git: Git, name: str | None = None, options: RemoteOptions | None = None
) -> tuple[RemoteSpec, ObjectRemote]:
    """Resolve and open the object remote of git remote ``name``."""
    spec = resolve(git, name)
    storage: dict[str, Any] = dict(spec.options)
    remote = open_remote(
        spec.url,
        options=options or RemoteOptions(),
        credentials=GitCredentials(git),
        storage_options=storage or None,
    )
    return spec, remote

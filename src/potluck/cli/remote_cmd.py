"""Sharing: push, fetch, pull, clone and object-remote settings."""

from __future__ import annotations

from pathlib import Path

import click

from potluck.cli.commands import fill_textconv_cache, install_repo, json_opt
from potluck.cli.main import cli, handle_errors
from potluck.cli.progress import byte_progress
from potluck.cli.render import echo, emit_json, human_bytes
from potluck.errors import UserError
from potluck.git import remotes, sync
from potluck.git import selection as sel
from potluck.git.repo import Repo

include_opt = click.option(
    "--include", "include", multiple=True, metavar="GLOB",
    help="Only tensors (or files) matching GLOB; repeatable.",
)  # fmt: skip
exclude_opt = click.option(
    "--exclude", "exclude", multiple=True, metavar="GLOB",
    help="Skip tensors (or files) matching GLOB; repeatable.",
)  # fmt: skip


def _selection(include: tuple[str, ...], exclude: tuple[str, ...]) -> sel.Selection | None:
    return sel.Selection(include, exclude) if include or exclude else None


@cli.command()
@click.argument("remote", required=False)
@click.option("--all", "everything", is_flag=True, help="Check every commit, not only new ones.")
@click.option(
    "--verify", is_flag=True,
    help="Check that the object store really has every object of every commit of the local "
    "branches and tags and of REMOTE's remote-tracking refs; upload what it lacks.",
)  # fmt: skip
@json_opt
@handle_errors
def push(remote: str | None, everything: bool, verify: bool, as_json: bool) -> None:
    """Upload the objects of local branches and tags that REMOTE's object store lacks.

    `git push` does this by itself through the pre-push hook that `potluck init` installs.
    """
    repo = Repo(".")
    with byte_progress("potluck: uploading") as on_bytes:
        spec, report = sync.push(
            repo, remote, None, everything=everything, verify=verify, on_bytes=on_bytes
        )
    if as_json:
        emit_json(
            {
                "remote": spec.url,
                "checked": report.checked,
                "uploaded": report.uploaded,
                "bytes": report.bytes,
                "already_there": report.already_there,
                "encoded": len(report.encoded),
                "bundles": report.bundles,
                "stale_index_entries": report.stale,
            }
        )
        return
    echo(
        f"potluck: {spec.url}: uploaded {report.uploaded} objects "
        f"({human_bytes(report.bytes)}; {len(report.encoded)} as deltas or compressed"
        + (f", in {report.bundles} bundle{'s' * (report.bundles != 1)}" if report.bundles else "")
        + "), "
        f"{report.already_there} already there"
        + (
            f"; {report.stale} stale wire index entries re-sent as plain bytes"
            if report.stale
            else ""
        )
    )
    if verify:
        echo(f"potluck: verified: {spec.url} holds all {report.checked} objects the refs need")


@cli.command()
@click.argument("remote", required=False)
@click.option("--rev", "revs", multiple=True, metavar="REV", help="Revision(s); default HEAD.")
@include_opt
@exclude_opt
@json_opt
@handle_errors
def fetch(
    remote: str | None,
    revs: tuple[str, ...],
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    as_json: bool,
) -> None:
    """Download the objects of REV's potluck files (only the selected tensors) that are not
    here. Work-tree files are not touched: `potluck pull` also checks them out."""
    repo = Repo(".")
    with byte_progress("potluck: downloading") as on_bytes:
        spec, stats = sync.fetch(
            repo, remote, revs or ("HEAD",), _selection(include, exclude), on_bytes
        )
    if as_json:
        emit_json({"remote": spec.url, **stats.__dict__})
        return
    echo(
        f"potluck: {spec.url}: fetched {stats.objects} objects ({human_bytes(stats.bytes)}), "
        f"{stats.skipped} already here"
    )


@cli.command()
@click.argument("remote", required=False)
@include_opt
@exclude_opt
@handle_errors
def pull(remote: str | None, include: tuple[str, ...], exclude: tuple[str, ...]) -> None:
    """Fetch the objects of HEAD, then check out every file left as a manifest (run it after
    a `git pull` made with fetching off, or a `potluck clone --no-data`).

    --include/--exclude are kept for later checkouts and pulls (as `git sparse-checkout set`);
    `--include '*'` clears the selection: every tensor is fetched from then on."""
    repo = Repo(".")
    selection = _selection(include, exclude)
    with byte_progress("potluck: downloading") as on_bytes:
        stats, written, incomplete = sync.pull(repo, remote, selection, on_bytes)
    echo(f"potluck: fetched {stats.objects} objects ({human_bytes(stats.bytes)})")
    if selection is not None:
        kept = sel.configured_selection(repo.git)
        echo(
            "potluck: checkouts and pulls fetch every tensor from now on"
            if not kept.include and not kept.exclude
            else f"potluck: checkouts and pulls fetch from now on: {_describe(kept)}"
        )
    fill_textconv_cache(repo)
    for path in written:
        echo(f"checked out {path}")
    for path in incomplete:
        echo(f"left as a manifest (tensors not selected): {path}")
    if incomplete:
        echo(f"potluck: {sel.pull_hint(repo.git)}")


def _describe(selection: sel.Selection) -> str:
    parts = [f"--include {g!r}" for g in selection.include]
    return " ".join(parts + [f"--exclude {g!r}" for g in selection.exclude])


@cli.command()
@click.argument("url")
@click.argument("directory", required=False)
@click.option("--no-data", is_flag=True, help="Leave every potluck file as a manifest.")
@click.option("-b", "--branch", help="Check out this branch.")
@include_opt
@exclude_opt
@handle_errors
def clone(
    url: str,
    directory: str | None,
    no_data: bool,
    branch: str | None,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
) -> None:
    """Clone a git repository and set potluck up in it; tensors come from its object remote.

    With --include/--exclude only those tensors are downloaded (the choice is kept for later
    checkouts); files not complete are left as manifests and shown by `potluck status`.
    """
    target = Path(directory) if directory else Path(_default_dir(url))
    repo = sync.clone(
        url, target, install=lambda r: _install(r), no_data=no_data,
        selection=_selection(include, exclude), branch=branch,
    )  # fmt: skip
    fill_textconv_cache(repo)
    left = sync.placeholders(repo)
    echo(
        f"potluck: cloned into {target}"
        + (f"; {len(left)} file(s) left as manifests" if left else "")
    )


def _install(repo: Repo) -> None:
    install_repo(repo)


def _default_dir(url: str) -> str:
    name = url.rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1]
    name = name[:-4] if name.endswith(".git") else name
    if not name:
        raise UserError(f"cannot guess a directory name from {url!r}", hint="give DIRECTORY")
    return name


@cli.group()
def remote() -> None:
    """Where a git remote keeps potluck's objects."""


@remote.command(name="set-url")
@click.argument("name")
@click.argument("url")
@click.option(
    "-o",
    "--option",
    "options",
    multiple=True,
    metavar="KEY=VALUE",
    help="fsspec storage option (e.g. endpoint_url=http://…); repeatable.",
)
@handle_errors
def set_url(name: str, url: str, options: tuple[str, ...]) -> None:
    """Keep NAME's objects at URL (s3://bucket/prefix, file:///dir, https://…/info/lfs)."""
    parsed: dict[str, str] = {}
    for opt in options:
        key, sep, value = opt.partition("=")
        if not sep:
            raise UserError(f"option {opt!r} is not KEY=VALUE")
        parsed[key] = value
    remotes.set_url(Repo(".").git, name, url, parsed if options else None)
    echo(f"potluck: objects of {name} go to {url}")


@remote.command(name="show")
@click.argument("name", required=False)
@json_opt
@handle_errors
def show(name: str | None, as_json: bool) -> None:
    """The object remote NAME (default: the upstream remote, else origin) resolves to."""
    spec = remotes.resolve(Repo(".").git, name)
    if as_json:
        emit_json(spec.__dict__)
        return
    echo(f"{spec.name}: {spec.url} (from {spec.source})")

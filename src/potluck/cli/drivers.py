"""Subcommands git calls: the filter process, per-file filters, diff and merge drivers.

stdout of these is git's protocol channel; every log line goes to stderr. What only one driver
uses (inspection, merging) is imported inside it, so the filter process starts without it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from potluck.cli.filter_entry import checkout_fetcher, serve_filter_process
from potluck.cli.main import cli, handle_errors
from potluck.cli.render import (
    echo,
    echo_textconv,
    err,
    file_diff_text,
    human_bytes,
    safe_field,
    tensor_lines,
    textconv_text,
)
from potluck.errors import PotluckError
from potluck.git.filter import PotluckFilter, started_to_show
from potluck.git.from_lfs import MAX_POINTER_BYTES, is_pointer
from potluck.git.plumbing import Git
from potluck.git.repo import Repo
from potluck.git.textconv_cache import TextconvCache
from potluck.objects.manifest import is_manifest, parse


@cli.command(name="filter-process", hidden=True)
@handle_errors
def filter_process() -> None:
    """git's long-running clean/smudge filter (filter.potluck.process)."""
    sys.exit(serve_filter_process())


@cli.command(name="clean", hidden=True)
@click.argument("path", required=False, default="")
@handle_errors
def clean(path: str) -> None:
    """Per-file clean filter (stdin checkpoint → stdout manifest)."""
    repo = Repo(".")
    cache = TextconvCache(repo.git, textconv_text)
    with repo.git.batch() as batch:
        PotluckFilter(repo, batch, textconv=cache).clean(path, sys.stdin.buffer, sys.stdout.buffer)
    sys.stdout.buffer.flush()
    cache.flush()


@cli.command(name="smudge", hidden=True)
@click.argument("path", required=False, default="")
@handle_errors
def smudge(path: str) -> None:
    """Per-file smudge filter (stdin manifest → stdout checkpoint)."""
    repo = Repo(".")
    fetcher = checkout_fetcher(repo)
    try:
        smudger = PotluckFilter(repo, None, fetcher, started_to_show())
        smudger.smudge(path, sys.stdin.buffer, sys.stdout.buffer)
    finally:
        fetcher.close()


@cli.command(name="pre-push", hidden=True)
@click.argument("remote")
@click.argument("url", required=False, default="")
@handle_errors
def pre_push(remote: str, url: str) -> None:
    """git pre-push hook: upload the objects of the commits being pushed (REMOTE URL; the refs
    come on stdin). When another hook read stdin first, every local branch and tag counts."""
    from potluck.cli.progress import byte_progress
    from potluck.git import sync

    lines = [] if sys.stdin is None or sys.stdin.isatty() else sys.stdin.read().splitlines()
    updates = sync.parse_pre_push(lines)
    if lines and not updates:
        return  # only deletions
    repo = Repo(".")
    with byte_progress("potluck: uploading") as on_bytes:
        spec, report = sync.push(repo, remote, updates or None, on_bytes=on_bytes)
    if report.uploaded:
        err(
            f"potluck: uploaded {report.uploaded} objects ({human_bytes(report.bytes)}) "
            f"to {spec.url}"
        )
    _push_records(repo, remote, lines)


def _push_records(repo: Repo, remote: str, lines: list[str]) -> None:
    """Evaluation records go with the push; a remote that refuses them gets a warning only."""
    from potluck.git import evalsync

    try:
        evalsync.push_for_hook(repo, remote, lines)
    except PotluckError as e:
        err(f"potluck: warning: {e.message}")


@cli.command(name="diff-driver", hidden=True)
@click.argument("args", nargs=-1)
@handle_errors
def diff_driver(args: tuple[str, ...]) -> None:
    """git external diff: PATH OLD-FILE OLD-HEX OLD-MODE NEW-FILE NEW-HEX NEW-MODE."""
    if len(args) < 7:
        echo(f"* Unmerged path {args[0] if args else '?'}")
        return
    from potluck.git import inspect as insp  # here, not at the top: git's filter starts faster

    repo = Repo(".")
    path, old_file, new_file = args[0], args[1], args[4]
    d = insp.diff_sides(path, insp.file_side(repo, old_file), insp.file_side(repo, new_file))
    echo(file_diff_text(d))


@cli.command(name="textconv", hidden=True)
@click.argument("file", required=False)
@click.option(
    "--fill-cache",
    is_flag=True,
    help="Write git's textconv cache for every manifest in the history (after a clone).",
)
@handle_errors
def textconv(file: str | None, fill_cache: bool) -> None:
    """One line per tensor (name, dtype[shape], content id) for `git log -p` and friends; a
    git-lfs pointer (a commit from before `potluck track --migrate`) is shown as it is.
    With --fill-cache (and no FILE): note every manifest of the history in git's textconv
    cache, so that the first `git log -p` starts no textconv process."""
    if fill_cache == (file is not None):
        raise click.UsageError("give a FILE, or --fill-cache alone")
    if file is None:
        from potluck.git.textconv_cache import fill_history

        added = fill_history(Repo(".").git, textconv_text)
        err(f"potluck: textconv cache: {added} new notes")
        return
    with open(file, "rb") as f:
        head = f.read(MAX_POINTER_BYTES)
        if is_manifest(head):  # git smudges blobs first; a manifest stays when data is absent
            echo_textconv(parse(head + f.read(), file))
            return
    if is_pointer(head):
        echo("\n".join(safe_field(line) for line in head.decode("ascii", "replace").splitlines()))
        return
    from potluck.git import inspect as insp  # a checkpoint in the work tree

    echo(tensor_lines(insp.file_side(Repo("."), file).manifest))


@cli.command(name="merge-driver", hidden=True)
@click.argument("base")
@click.argument("ours")
@click.argument("theirs")
@click.argument("path")
def merge_driver(base: str, ours: str, theirs: str, path: str) -> None:
    """git merge driver: %O %A %B %P. Exit 0 merged, 1 conflict."""
    from potluck.git.merge_driver import run_merge_driver

    try:
        result = run_merge_driver(Repo("."), base, ours, theirs, path)
    except PotluckError as e:
        err(f"potluck: merge of {path} failed: {e}")
        sys.exit(1)
    if result.from_theirs or result.combined:
        err(
            f"potluck: {path}: took {len(result.from_theirs)} tensors from theirs, "
            f"combined {len(result.combined)}"
        )
    if result.conflicts:
        err(
            f"potluck: CONFLICT {path}: {len(result.conflicts)} tensors changed on both sides "
            f"(the file holds ours); see `potluck status`, finish with "
            f"`potluck resolve {path} --take ours|theirs`"
        )
        sys.exit(1)


@cli.command(name="prepare-commit-msg", hidden=True)
@click.argument("message_file")
@click.argument("source", required=False, default="")
@click.argument("commit", required=False, default="")
@handle_errors
def prepare_commit_msg(message_file: str, source: str, commit: str) -> None:
    """git prepare-commit-msg hook: FILE [SOURCE [SHA]]. A merge commit gets a
    ``Potluck-Merge:`` trailer per file the merge driver merged; other commits are left alone."""
    del source, commit  # a merge is recognised by MERGE_HEAD (`git commit -m` says "message")
    from potluck.git.merge_record import prepare_commit_msg as add_merge_trailers

    lines = add_merge_trailers(Git(Path.cwd()), Path(message_file).resolve())
    if lines:
        err(f"potluck: recorded how {len(lines)} file(s) were merged in the commit message")

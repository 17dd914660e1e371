"""git's long-running filter process, started without click.

git starts ``git-potluck filter-process`` for every ``git add``, checkout and ``git log -p`` of a
tracked file, so its start-up is paid on each of them: the console entry point (``entry.main``)
runs it from here without importing click and the rest of the command-line interface. The click
command ``filter-process`` (``drivers``) runs the same function.
"""

from __future__ import annotations

from potluck.cli.render import configure_logging, err, textconv_text
from potluck.errors import PotluckError
from potluck.git.filter import Fetcher, FetcherOnFirstUse, PotluckFilter, started_to_show
from potluck.git.filter_process import serve_stdio
from potluck.git.repo import Repo
from potluck.git.textconv_cache import TextconvCache


def checkout_fetcher(repo: Repo) -> FetcherOnFirstUse:
    """The smudge filter's fetcher, made (and ``git.sync`` imported) on first use."""

    def make() -> Fetcher:
        from potluck.git import sync

        return sync.CheckoutFetcher(repo)

    return FetcherOnFirstUse(make)


def serve_filter_process() -> int:
    """Serve git's filter protocol on stdin/stdout until git closes it; the exit code."""
    repo = Repo(".")
    fetcher = checkout_fetcher(repo)
    show_only = started_to_show()
    cache = None if show_only else TextconvCache(repo.git, textconv_text)
    try:
        with repo.git.batch() as batch:
            code = serve_stdio(PotluckFilter(repo, batch, fetcher, show_only, cache), err)
    finally:
        fetcher.close()
    if cache is not None:  # git waits for its filter to exit: the notes are there when it ends
        cache.flush()
    return code


def main() -> int:
    """``git-potluck filter-process`` as the click CLI would run it (logging at the default
    level, a ``PotluckError`` reported on stderr with its exit code), without click."""
    configure_logging(verbose=0, quiet=False)
    try:
        return serve_filter_process()
    except PotluckError as e:
        err(f"potluck: error: {e}")
        return e.exit_code

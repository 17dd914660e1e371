"""The ``potluck`` / ``git-potluck`` console entry point.

``git-potluck filter-process`` (started by git for every add and checkout of a tracked file)
runs without loading click (``filter_entry``); every other command goes through the click CLI
(``main``).
"""

from __future__ import annotations

import sys


def main() -> None:
    """Run the command named by ``sys.argv``."""
    if sys.argv[1:] == ["filter-process"]:
        from potluck.cli.filter_entry import main as filter_main

        _exit_now(filter_main())
    from potluck.cli.main import main as cli_main

    cli_main()


def _exit_now(code: int) -> None:
    """Exit with ``code`` without the interpreter's teardown. git waits for its filter process
    to exit, and freeing every object of the files it handled takes 15–25 ms after a
    20k-tensor add. By then the filter has closed everything it wrote (its ``with`` blocks, the
    textconv notes commit): only the standard streams and logging's handlers are flushed."""
    import contextlib
    import logging
    import os

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # git closed its end: nothing can reach it
            stream.flush()
    os._exit(code)

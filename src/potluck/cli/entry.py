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

        sys.exit(filter_main())
    from potluck.cli.main import main as cli_main

    cli_main()

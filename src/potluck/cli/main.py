"""The ``potluck`` / ``git-potluck`` command."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import click

from potluck.errors import PotluckError

F = TypeVar("F", bound=Callable[..., Any])


def handle_errors(fn: F) -> F:
    """Turn a ``PotluckError`` into a message on stderr and its exit code."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PotluckError as e:
            click.echo(f"potluck: error: {e}", err=True)
            sys.exit(e.exit_code)

    return wrapper  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output on stderr.")
@click.option("-q", "--quiet", is_flag=True, help="Only errors on stderr.")
@click.version_option(package_name="potluck")
def cli(verbose: int, quiet: bool) -> None:
    """potluck: version, patch, merge and compose ML checkpoints with git."""
    level = (
        logging.ERROR
        if quiet
        else (logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING)
    )
    logging.basicConfig(level=level, stream=sys.stderr, format="potluck: %(message)s")


def main() -> None:
    """Console-script entry point."""
    # importing the modules registers their subcommands
    from potluck.cli import (  # noqa: F401
        commands,
        drivers,
        merge_cmd,
        modular_cmd,
        patch_cmd,
        peft_cmd,
        remote_cmd,
        stats_cmd,
    )

    cli(prog_name="potluck")

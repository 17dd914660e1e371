"""The ``potluck`` / ``git-potluck`` command."""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import click

from potluck.cli.render import SafeFormatter, echo
from potluck.errors import PotluckError

F = TypeVar("F", bound=Callable[..., Any])


def handle_errors(fn: F) -> F:
    """Turn a ``PotluckError`` into a message on stderr and its exit code."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PotluckError as e:
            echo(f"potluck: error: {e}", err=True)
            sys.exit(e.exit_code)

    return wrapper  # type: ignore[return-value]


#: Subcommands whose modules load only when used (keeps git hooks and drivers fast to start).
LAZY_COMMANDS = {
    "merge": "merge_cmd",
    "stats": "stats_cmd",
    "patch": "patch_cmd",
    "peft": "peft_cmd",
    "experts": "modular_cmd",
    "compose": "modular_cmd",
    "eval": "eval_cmd",
    "push": "remote_cmd",
    "fetch": "remote_cmd",
    "pull": "remote_cmd",
    "clone": "remote_cmd",
    "remote": "remote_cmd",
}


class LazyGroup(click.Group):
    """A group that imports a subcommand's module the first time the subcommand is needed."""

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in LAZY_COMMANDS:
            importlib.import_module(f"potluck.cli.{LAZY_COMMANDS[cmd_name]}")
        return super().get_command(ctx, cmd_name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        for module in sorted(set(LAZY_COMMANDS.values())):
            importlib.import_module(f"potluck.cli.{module}")
        return super().list_commands(ctx)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
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
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(SafeFormatter("potluck: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])


def main() -> None:
    """Console-script entry point."""
    # importing the modules registers their subcommands
    from potluck.cli import commands, drivers  # noqa: F401  (the others: LAZY_COMMANDS)

    cli(prog_name="potluck")

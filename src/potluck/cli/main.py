"""The ``potluck`` / ``git-potluck`` command."""

from __future__ import annotations

import importlib
import os
import select
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, NoReturn, TypeVar

import click

from potluck.cli.render import configure_logging, echo, safe_field, safe_text
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


#: The module (under ``potluck.cli``) that registers each subcommand. A module is imported only
#: when one of its subcommands runs, so ``potluck --version``, git's filter and the drivers and
#: hooks start without the modules (and numpy-heavy libraries) they do not use.
LAZY_COMMANDS = {
    **dict.fromkeys(
        ["init", "track", "untrack", "ls", "diff", "log", "du", "gc", "fsck", "status"],
        "commands",
    ),
    **dict.fromkeys(["resolve", "demo"], "commands"),
    **dict.fromkeys(
        ["filter-process", "clean", "smudge", "pre-push", "diff-driver", "textconv"], "drivers"
    ),
    **dict.fromkeys(["merge-driver", "prepare-commit-msg"], "drivers"),
    "merge": "merge_cmd",
    "stats": "stats_cmd",
    "patch": "patch_cmd",
    "peft": "peft_cmd",
    "experts": "modular_cmd",
    "compose": "modular_cmd",
    "eval": "eval_cmd",
    "lineage": "lineage_cmd",
    **dict.fromkeys(["gate", "report", "promote"], "gate_cmd"),
    "hub": "hub_cmd",
    **dict.fromkeys(["push", "fetch", "pull", "clone", "remote"], "remote_cmd"),
}


def _import_all() -> None:
    for module in sorted(set(LAZY_COMMANDS.values())):
        importlib.import_module(f"potluck.cli.{module}")


def _stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader has gone (not some other pipe, such as a git
    subprocess's stdin, that broke)."""
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows), no real stdout
        return False


def _closed_pipe() -> NoReturn:
    """The reader of stdout stopped early (``potluck log | head``): end quietly with status 0,
    like any filter whose reader has what it wanted (no error, no traceback)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # the interpreter's last flush must not fail too
    sys.exit(0)


def _escaped(e: click.ClickException) -> click.ClickException:
    """``e`` with the user input its message quotes made safe for a terminal (a usage error
    is one line: newlines are escaped too)."""
    escaped: click.ClickException
    if isinstance(e, click.UsageError):
        escaped = click.UsageError(safe_field(e.format_message()), e.ctx)
    else:
        escaped = click.ClickException(safe_text(e.format_message()))
    return escaped


class LazyGroup(click.Group):
    """A group that imports a subcommand's module the first time the subcommand is needed;
    for every command, a closed stdout pipe ends it with status 0 and click's own messages
    (usage errors) show user input escaped."""

    def make_context(
        self, info_name: str | None, args: list[str], parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:  # fmt: skip
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.ClickException as e:
            raise _escaped(e) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            result = super().invoke(ctx)
            sys.stdout.flush()
        except BrokenPipeError:
            if not _stdout_closed():
                raise
            _closed_pipe()
        except click.ClickException as e:
            raise _escaped(e) from None
        except SystemExit:
            try:
                sys.stdout.flush()
            except BrokenPipeError:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
            raise
        return result

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands:
            if cmd_name in LAZY_COMMANDS:
                importlib.import_module(f"potluck.cli.{LAZY_COMMANDS[cmd_name]}")
            if cmd_name not in self.commands:  # a command LAZY_COMMANDS does not name yet
                _import_all()
        return super().get_command(ctx, cmd_name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        _import_all()
        return super().list_commands(ctx)


def _installed_version() -> str:
    """potluck's version from its installed metadata: the ``Version:`` line of the first
    ``potluck-*.dist-info/METADATA`` on ``sys.path`` (what ``importlib.metadata`` finds, without
    importing it: that import was a third of ``potluck --version``'s start-up)."""
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for name in names:
            if not (name.startswith("potluck-") and name.endswith(".dist-info")):
                continue
            try:
                with open(os.path.join(entry, name, "METADATA"), encoding="utf-8") as f:
                    for line in f:
                        if line.startswith("Version:"):
                            return line.split(":", 1)[1].strip()
            except OSError:
                continue
    from potluck import __version__  # not installed (a source tree): importlib.metadata

    return __version__


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    """``--version``: print ``potluck, version X`` (click's wording) and exit."""
    if not value or ctx.resilient_parsing:
        return
    echo(f"{ctx.find_root().info_name}, version {_installed_version()}")
    ctx.exit()


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output on stderr.")
@click.option("-q", "--quiet", is_flag=True, help="Only errors on stderr.")
@click.option(
    "--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
    help="Show the version and exit.",
)  # fmt: skip
def cli(verbose: int, quiet: bool) -> None:
    """potluck: version, patch, merge and compose ML checkpoints with git."""
    configure_logging(verbose, quiet)


def main() -> None:
    """Console-script entry point (subcommands load on use: ``LAZY_COMMANDS``)."""
    cli(prog_name="potluck")

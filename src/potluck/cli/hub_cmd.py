"""``potluck hub [REPO…]`` / ``potluck hub reindex [REPO…]``: the read-only web view
(docs/hub.md)."""

from __future__ import annotations

import click

from potluck.cli.main import cli, handle_errors
from potluck.cli.render import echo, safe_field


@cli.command("hub")
@click.argument("repos", nargs=-1)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8080, show_default=True, type=int, help="Port to listen on.")
@click.option(
    "--db",
    default=None,
    help="Index database URL (sqlite:///PATH or postgresql://USER@HOST:PORT/DB); "
    "default: .git/potluck/hub.sqlite of the first repository.",
)
@handle_errors
def hub(repos: tuple[str, ...], host: str, port: int, db: str | None) -> None:
    """Serve a read-only web view of REPO… (default: the current repository).

    `potluck hub reindex [REPO…]` rebuilds the index from git instead of serving.
    """
    from potluck.hub import server

    if repos[:1] == ("reindex",):
        for name, n in server.reindex(list(repos[1:]), db).items():
            echo(f"{safe_field(name)}: {n} commit(s) indexed")
        return
    server.serve(list(repos), host, port, db)

"""Serve a hub with uvicorn (the index is brought up to date first)."""

from __future__ import annotations

import logging
import sys

from potluck.errors import UserError
from potluck.hub.pages import Hub, hub_for

log = logging.getLogger(__name__)


def reindex(paths: list[str], db: str | None, full: bool = True) -> dict[str, int]:
    """``potluck hub reindex``: rebuild the index of ``paths`` from git; commits indexed each."""
    return hub_for(paths, db).reindex(full=full)


def serve(paths: list[str], host: str, port: int, db: str | None) -> Hub:
    """``potluck hub``: index what is new, then serve until interrupted."""
    import uvicorn

    from potluck.hub.app import make_app

    if not 0 < port < 65536:
        raise UserError(f"port {port} is out of range", hint="give 1-65535 (0 is not allowed)")
    hub = hub_for(paths, db)
    counts = hub.reindex(full=False)
    for name, n in counts.items():
        print(f"potluck hub: {name}: {n} new commit(s) indexed", file=sys.stderr)
    print(f"potluck hub: serving http://{host}:{port}/", file=sys.stderr)
    uvicorn.run(make_app(hub), host=host, port=port, log_level="warning", access_log=False)
    return hub

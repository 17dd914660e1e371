"""Progress bars for transfers: on a terminal only (stderr), silent otherwise and with -q."""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


def _wanted() -> bool:
    quiet = logging.getLogger().getEffectiveLevel() > logging.WARNING
    return not quiet and sys.stderr.isatty()


@contextmanager
def byte_progress(label: str, total: int | None = None) -> Iterator[Callable[[int], None] | None]:
    """Yield an ``on_bytes`` callback driving a rich bar (bytes, rate), or None when not on a
    terminal. The callback is thread-safe."""
    if not _wanted():
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TransferSpeedColumn,
    )

    lock = threading.Lock()
    with Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        TimeElapsedColumn(), console=Console(stderr=True), transient=True,
        redirect_stdout=False, redirect_stderr=False,
    ) as bar:  # fmt: skip
        task = bar.add_task(label, total=total)

        def on_bytes(n: int) -> None:
            with lock:
                bar.update(task, advance=n)

        yield on_bytes

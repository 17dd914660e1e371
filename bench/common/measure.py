"""Measuring child processes and the machine, and plain-text tables (bench.vcs, .remote, .merge).

``TreeRssSampler``: peak summed RSS of a process and all its descendants (psutil, every 20 ms);
``run_command``: one command in its own session, with a timeout; ``machine_info``: what the
benchmark ran on; ``render_table``: aligned columns.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import psutil

SAMPLE_INTERVAL_S = 0.02


class TreeRssSampler:
    """Samples the summed RSS of a process and all its descendants every ~20 ms."""

    def __init__(self) -> None:
        self.peak = 0
        self.peak_descendants = 0  # without the watched git process itself
        self._root: psutil.Process | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> TreeRssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def watch(self, pid: int) -> None:
        try:
            self._root = psutil.Process(pid)
        except psutil.NoSuchProcess:
            self._root = None
        self._sample()

    def _loop(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL_S):
            self._sample()

    def _sample(self) -> None:
        root = self._root
        if root is None:
            return
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        self._record(procs)

    def _record(self, procs: list[psutil.Process]) -> None:
        """Take one sample of ``procs`` (the watched process first, then its descendants)."""
        sizes = []
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                sizes.append(proc.memory_info().rss)
        self.peak = max(self.peak, sum(sizes))
        self.peak_descendants = max(self.peak_descendants, sum(sizes[1:]))


def children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def dir_bytes(path: Path) -> int:
    """Apparent size of every regular file below path (like du --apparent-size -b)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


class CommandError(RuntimeError):
    pass


def run_command(
    cmd: list[str],
    cwd: Path,
    env: dict[str, str],
    timeout: float,
    log: Path,
    on_start: Callable[[int], None] | None = None,
) -> tuple[int, str]:
    """Run one command in its own session; returns (returncode, stdout)."""
    with tempfile.TemporaryFile() as out, log.open("ab") as err:
        err.write(f"\n$ {' '.join(cmd)}\n".encode())
        err.flush()
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=out, stderr=err, start_new_session=True
        )
        if on_start is not None:
            on_start(proc.pid)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise CommandError(f"timeout after {timeout:.0f}s: {' '.join(cmd)}") from None
        out.seek(0)
        return rc, out.read().decode(errors="replace")


def error_tail(error: str, last: int) -> str:
    """The first line of ``error`` and its ``last`` last lines, indented for a report."""
    lines = error.splitlines()
    return "\n    ".join(lines[:1] + lines[1:][-last:])


def log_tail(log: Path, lines: int = 15) -> str:
    try:
        text = log.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return ""
    return "\n".join(text[-lines:])


def thread_env(threads: int) -> dict[str, str]:
    n = str(threads)
    names = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
    extra = ("NUMEXPR_NUM_THREADS", "RAYON_NUM_THREADS", "GOMAXPROCS")
    return {k: n for k in (*names, *extra)}


def capture(cmd: list[str], env: dict[str, str] | None = None) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc.__class__.__name__})"
    text = (proc.stdout or proc.stderr).strip().splitlines()
    return text[0] if proc.returncode == 0 and text else "unavailable"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(threads: int) -> dict[str, str]:
    return {
        "nproc": str(len(os.sched_getaffinity(0))),
        "cpu": cpu_model(),
        "memory": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
        "os": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "threads": f"{threads} (OMP/MKL/OPENBLAS/NUMEXPR/RAYON_NUM_THREADS, GOMAXPROCS)",
    }


def fmt(value: float, spec: str) -> str:
    return "-" if value is None or math.isnan(value) else format(value, spec)


def render_table(rows: list[list[str]], header: list[list[str]]) -> str:
    table = [*header, *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = []
    for n, row in enumerate(table):
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append(" | ".join(cells))
        if n == len(header) - 1:
            lines.append("-+-".join("-" * w for w in widths))
    return "\n".join(lines)


@contextlib.contextmanager
def scratch(prefix: str, workdir: Path | None, keep: bool) -> Iterator[Path]:
    """A fresh temp folder (under ``workdir``, else the system's), removed after unless ``keep``."""
    root = Path(tempfile.mkdtemp(prefix=prefix, dir=workdir))
    try:
        yield root
    finally:
        if keep:
            print(f"  kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)

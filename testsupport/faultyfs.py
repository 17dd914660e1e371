"""A misbehaving fsspec filesystem for fault-injection tests: ``faulty:///abs/dir``.

Objects live in a real directory (so every process of a ``git push`` or ``git clone`` sees the
same store), published atomically on ``close``. With the environment variable
``POTLUCK_FAULTY="SEED:RATE[:DELAY]"`` each operation fails with probability RATE (a line in
the file ``POTLUCK_FAULTY_LOG`` names, if set), in one of the ways a network store fails: a
lookup or a read that drops the connection, a read that ends early (truncated), a write that
drops half-way; every operation waits DELAY seconds (slow).
Without the variable it behaves. Faults are drawn from a generator seeded with SEED in each
process, so a run is repeatable up to thread scheduling.

Subprocesses (git hooks, git's filter) find the protocol through ``faultsite/sitecustomize.py``:
put ``testsupport/faultsite`` and the repository root on ``PYTHONPATH`` (``fault_env``).
"""

from __future__ import annotations

import io
import os
import random
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from fsspec.spec import AbstractFileSystem

ENV = "POTLUCK_FAULTY"
LOG_ENV = "POTLUCK_FAULTY_LOG"  # a file that gets one line per injected fault
PROTOCOL = "faulty"
ROOT = Path(__file__).resolve().parent.parent


def fault_env(
    seed: int | None, rate: float = 0.0, delay: float = 0.0, log: Path | None = None
) -> dict[str, str]:
    """Environment for subprocesses that should see ``faulty://`` (faults off for None);
    with ``log``, each injected fault adds a line to that file."""
    paths = [str(ROOT / "testsupport" / "faultsite"), str(ROOT)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    env.pop(ENV, None)
    env.pop(LOG_ENV, None)
    if seed is not None:
        env[ENV] = f"{seed}:{rate}:{delay}"
        if log is not None:
            env[LOG_ENV] = str(log)
    return env


class _Chaos:
    """The fault plan of this process (read once from ``POTLUCK_FAULTY``)."""

    def __init__(self) -> None:
        seed, rate, delay = (os.environ.get(ENV, "") + "::").split(":")[:3]
        self.rate = float(rate or 0)
        self.delay = float(delay or 0)
        self._rng = random.Random(int(seed or 0))
        self._lock = threading.Lock()

    def hit(self) -> bool:
        if self.delay:
            time.sleep(self.delay)
        with self._lock:
            hit = self.rate > 0 and self._rng.random() < self.rate
        if hit and os.environ.get(LOG_ENV):
            with open(os.environ[LOG_ENV], "a") as log:  # one line per injected fault
                log.write(f"{os.getpid()}\n")
        return hit


CHAOS = _Chaos()


class _Reader(io.RawIOBase):
    """A read stream that may drop the connection or end early."""

    def __init__(self, path: str) -> None:
        self._f = open(path, "rb")  # noqa: SIM115 (closed in close)
        self._mode = "drop" if CHAOS.hit() else "truncate" if CHAOS.hit() else ""
        self._served = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def read(self, n: int = -1) -> bytes:  # type: ignore[override]
        if self._served and self._mode == "drop":
            raise ConnectionResetError("injected fault: connection reset while reading")
        if self._served and self._mode == "truncate":
            return b""
        data = self._f.read(n if n is None or n < 0 else min(n, 4096))
        self._served += len(data)
        return data

    def close(self) -> None:
        self._f.close()
        super().close()


class _Writer:
    """A write stream published by ``close`` (atomic rename), dropped by ``discard``; it may
    drop the connection half-way."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.tmp, "wb")  # noqa: SIM115 (closed in close or discard)
        self._drop = CHAOS.hit()
        self.closed = False

    def write(self, data: bytes) -> int:
        if self._drop and self._f.tell() > 0:
            raise ConnectionResetError("injected fault: connection reset while writing")
        return self._f.write(data)

    def discard(self) -> None:
        self._f.close()
        Path(self.tmp).unlink(missing_ok=True)

    def close(self) -> None:
        if self.closed:
            return
        self._f.close()
        os.replace(self.tmp, self.path)
        self.closed = True


class FaultyFileSystem(AbstractFileSystem):  # type: ignore[misc]
    """``faulty:///abs/dir``: a local directory behind an unreliable "network"."""

    protocol = PROTOCOL
    root_marker = "/"

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        path = self._strip_protocol(path)
        if CHAOS.hit():
            raise ConnectionError(f"injected fault: no answer looking up {path}")
        st = os.stat(path)  # FileNotFoundError when absent
        kind = "directory" if os.path.isdir(path) else "file"
        return {"name": path, "size": st.st_size, "type": kind}

    def invalidate_cache(self, path: str | None = None) -> None:
        pass

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        path = self._strip_protocol(path)
        if "w" in mode:
            return _Writer(path)
        if CHAOS.hit():
            raise ConnectionError(f"injected fault: cannot open {path}")
        return _Reader(path)

    def rm_file(self, path: str) -> None:
        os.unlink(self._strip_protocol(path))

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        path = self._strip_protocol(path)
        names = [os.path.join(path, n) for n in sorted(os.listdir(path))]
        return [self.info(n) for n in names] if detail else names

"""Cost of reading ``torch.save`` checkpoints safely: ``scan_file`` of a ``.pt`` with N tensors
(what ``git add`` and ``potluck ls`` pay) against the same unpickling on CPython's C unpickler
with the same stand-ins (unsafe: no hash or BUILD checks; the speed potluck had before issue 14).

    python -m bench.pickle_scan [--tensors 20000] [--repeat 5]

Needs torch (to write the checkpoint). Prints the best of ``--repeat`` runs of each.
"""

from __future__ import annotations

import argparse
import io
import pickle
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

from potluck.formats import scan_file
from potluck.formats.pickle_safe import SafeUnpickler, walk_tensors


class _CUnpickler(pickle.Unpickler):
    """CPython's C unpickler with potluck's allowlist and storages (no hashing checks)."""

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self.storages: dict[str, Any] = {}

    find_class = SafeUnpickler.find_class
    persistent_load = SafeUnpickler.persistent_load


def _best(fn: Any, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    """Write the checkpoint, time both, print a table."""
    p = argparse.ArgumentParser(prog="python -m bench.pickle_scan", description=__doc__)
    p.add_argument("--tensors", type=int, default=20_000)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "many.pt"
        sd = {
            f"model.layers.{i // 20}.block.w{i % 20}": torch.zeros(2) for i in range(args.tensors)
        }
        torch.save(sd, path)
        with zipfile.ZipFile(path) as z:
            data = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
        scan = _best(lambda: scan_file(path), args.repeat)
        safe = _best(lambda: SafeUnpickler(data).load(), args.repeat)
        fast = _best(lambda: _CUnpickler(data).load(), args.repeat)
        obj = SafeUnpickler(data).load()
        walk = _best(lambda: walk_tensors(obj), args.repeat)
    print(f"{args.tensors} tensors, data.pkl {len(data) / 1e6:.1f} MB, best of {args.repeat}")
    print(f"  scan_file (all of it)          {scan:7.3f} s")
    print(f"  unpickle, safe (pure Python)   {safe:7.3f} s")
    print(f"  unpickle, C (no hash checks)   {fast:7.3f} s")
    print(f"  walk_tensors                   {walk:7.3f} s")


if __name__ == "__main__":
    main()

"""Structured-update encoding (object format v2) on its own: size and speed per matrix.

For each case (shape, dtype, update) one base matrix and its updated version are stored with
``ObjectDB.put`` twice in one run: as before (no dtype/shape given: XOR delta + zstd) and with
the structured detection; prints the stored size as % of the matrix, encode and decode MB/s
(logical bytes per CPU second of this process, all its threads: the machine may be shared;
one encoder thread), and the encoding chosen. Decoding is
checked bit for bit. Run: ``python -m bench.vcs.structured [--repeat N]``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time
from collections.abc import Callable

import ml_dtypes
import numpy as np

from potluck.config import RepoConfig
from potluck.objects.encoding import describe
from potluck.ops.vcs.odb import ObjectDB
from potluck.store.memory import MemoryStore

NP = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}


def lora(w: np.ndarray, rng: np.random.Generator, rank: int = 8) -> np.ndarray:
    b = rng.standard_normal((w.shape[0], rank), dtype=np.float32) * np.float32(0.02)
    a = rng.standard_normal((rank, w.shape[1]), dtype=np.float32) * np.float32(0.02)
    return (w.astype(np.float32) + (b @ a) * np.float32(16 / rank)).astype(w.dtype)


def colscale(w: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    s = rng.uniform(0.8, 1.2, (1, w.shape[1])).astype(np.float32)
    return (w.astype(np.float32) * s).astype(w.dtype)


def dense(w: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    noise = rng.standard_normal(w.shape, dtype=np.float32) * np.float32(1e-3)
    return (w.astype(np.float32) * (1 + noise)).astype(w.dtype)


CASES: list[tuple[tuple[int, int], str, str, Callable[..., np.ndarray]]] = [
    ((768, 2304), "F32", "LoRA r8", lora),
    ((768, 768), "F32", "LoRA r8", lora),
    ((768, 2304), "BF16", "LoRA r8", lora),
    ((4096, 4096), "BF16", "LoRA r8", lora),
    ((768, 3072), "F32", "column scale", colscale),
    ((768, 3072), "F32", "dense 1e-3 (no model)", dense),
]


def one(
    shape: tuple[int, int], dtype: str, update: Callable[..., np.ndarray], structured: bool
) -> tuple[float, float, float, str]:
    """(stored fraction, encode CPU s, decode CPU s, encoding) of one base/update pair."""
    rng = np.random.default_rng(0)
    old = (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)).astype(NP[dtype])
    new = update(old, rng)
    ob, nb = old.tobytes(), new.tobytes()
    db = ObjectDB(MemoryStore(), RepoConfig(), workers=1)
    base = hashlib.sha256(ob).hexdigest()
    db.put(base, lambda: [ob], size=len(ob), itemsize=old.dtype.itemsize)
    oid = hashlib.sha256(nb).hexdigest()
    t0 = time.process_time()
    res = db.put(
        oid,
        lambda: [nb],
        size=len(nb),
        itemsize=old.dtype.itemsize,
        base_oid=base,
        dtype=dtype if structured else None,
        shape=shape if structured else None,
    )
    t1 = time.process_time()
    back = db.read_bytes(oid)
    t2 = time.process_time()
    if back != nb:
        raise SystemExit(f"round trip of {shape} {dtype} is not bit-exact")
    with db.store.open(oid) as f:
        how = describe(f)
    return res.stored / len(nb), t1 - t0, t2 - t1, how


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=1, help="best of N timings")
    args = ap.parse_args()
    print(f"# load: {os.getloadavg()}")
    speeds = f"{'enc MB/CPU-s':>18} {'dec MB/CPU-s':>18}"
    head = f"{'case':36} {'before %':>8} {'after %':>8} {speeds}  encoding"
    print(head)
    for shape, dtype, label, update in CASES:
        mb = shape[0] * shape[1] * np.dtype(NP[dtype]).itemsize / 1e6
        runs = {s: [one(shape, dtype, update, s) for _ in range(args.repeat)] for s in (0, 1)}
        before, after = runs[0][0], runs[1][0]
        enc = [mb / min(r[1] for r in runs[s]) for s in (0, 1)]
        dec = [mb / min(r[2] for r in runs[s]) for s in (0, 1)]
        name = f"{shape[0]}x{shape[1]} {dtype} {label}"
        print(
            f"{name:36} {100 * before[0]:8.2f} {100 * after[0]:8.2f} "
            f"{enc[0]:8.0f} -> {enc[1]:6.0f} {dec[0]:8.0f} -> {dec[1]:6.0f}  {after[3]}"
        )


if __name__ == "__main__":
    main()

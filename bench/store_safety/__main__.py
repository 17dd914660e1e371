"""What the store's safety checks cost (issue 14 items 1 and 3).

``ObjectDB.has`` checks an object's record layout against its file size the first time a
process asks (catching torn objects), and ``put`` of an object that exists re-checks it and
freshens its mtime (gc's grace period). This times, on a ``LocalStore`` in a temp directory:

* ``has`` over N single-chunk objects (a 20k-tensor checkpoint), plain existence
  (``store.has``, the old ``ObjectDB.has``) vs the first checked call vs later (cached) calls;
* the same for one object of many chunks;
* ``put`` of objects that already exist (a re-add of an unchanged file);
* ``gc -n``-style listing of every object's mtime.

Run: ``python -m bench.store_safety [--objects 20000] [--chunks 4096]``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from potluck.config import RepoConfig
from potluck.ops.vcs import ObjectDB
from potluck.store import LocalStore


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def small(i: int) -> bytes:
    return i.to_bytes(4, "little") * 64


def put(odb: ObjectDB, data: bytes, itemsize: int) -> str:
    """Store ``data`` without fsync (as fetched objects are), for a quick build."""
    oid = hashlib.sha256(data).hexdigest()
    odb.put(oid, lambda: [data], size=len(data), itemsize=itemsize, quick=True)
    return oid


def build(root: Path, n: int, chunks: int) -> tuple[ObjectDB, list[str], str]:
    """N small objects (256 bytes) and one object of ``chunks`` 4 KiB chunks."""
    odb = ObjectDB(LocalStore(root), RepoConfig(chunk_bytes=4096), workers=1)
    oids = [put(odb, small(i), 4) for i in range(n)]
    return odb, oids, put(odb, os.urandom(4096 * chunks), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objects", type=int, default=20000)
    ap.add_argument("--chunks", type=int, default=4096)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        odb, oids, big = build(Path(tmp) / "objects", args.objects, args.chunks)
        store = odb.store
        fresh = ObjectDB(store, odb.config, workers=1)  # a new process: nothing checked
        rows = [
            ("store.has (existence only)", timed(lambda: [store.has(o) for o in oids])),
            ("ObjectDB.has, first call", timed(lambda: [fresh.has(o) for o in oids])),
            ("ObjectDB.has, cached", timed(lambda: [fresh.has(o) for o in oids])),
        ]
        again = ObjectDB(store, odb.config, workers=1)
        data = [small(i) for i in range(args.objects)]
        before = timed(lambda: [store.has(hashlib.sha256(d).hexdigest()) for d in data])
        rows.append(("put of existing, old (hash+stat)", before))
        rows.append(
            ("put of existing objects", timed(lambda: [again.put_bytes(d, 4) for d in data]))
        )
        rows.append(("store.mtime (gc)", timed(lambda: [store.mtime(o) for o in oids])))
        n = args.objects
        print(f"{n} single-chunk objects:")
        for name, s in rows:
            print(f"  {name:<34} {s * 1e3:8.1f} ms  {s / n * 1e6:6.1f} us/object")
        big_odb = ObjectDB(store, odb.config, workers=1)
        t = timed(lambda: big_odb.has(big))
        size = store.stored_size(big)
        print(f"one object of {args.chunks} chunks ({size >> 20} MiB stored):")
        print(f"  {'ObjectDB.has, first call':<34} {t * 1e3:8.1f} ms")
        t = timed(lambda: hashlib.sha256(b"".join(big_odb.read_chunks(big))).hexdigest())
        print(f"  {'full decode + sha256 (fsck)':<34} {t * 1e3:8.1f} ms")


if __name__ == "__main__":
    main()

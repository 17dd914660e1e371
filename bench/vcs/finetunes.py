"""Lossless store growth of real dense fine-tunes against their base (issue 19, item 5).

For each full fine-tune of all-MiniLM-L6-v2 found (``encoder.safetensors`` of the bench.quality
fine-tunes, ``lora_rank`` 0 in their ``meta.json``; or ``--files``), every tensor that differs
from the shipped base is encoded as a delta of the base's tensor three ways in one run:

* ``xor``: object format v1/v2 as before (XOR delta, byte-grouped, one zstd frame per chunk;
  ``encode_object(diff=False)``);
* ``diff``: with difference streams allowed (kind 5, chosen per chunk when smaller; the
  default of ``encode_object``);
* ``put``: ``ObjectDB.put`` with the tensor's dtype and shape, the clean filter's path
  (structured-model detection first, then the default encoding): what potluck stores.

Unchanged tensors cost nothing (their object already exists). Growth is the stored bytes of
the changed tensors' objects as % of the file (the safetensors header, a few kB in git, is left
out). ``xor/chg`` and ``diff/chg`` are the same stored bytes as % of the changed elements'
bytes (the parameters whose bits differ: the measure of the issue's "68.7 %"). References in
the same run: zstd -1 of the file's raw bytes (``zstd``), and potluck's standalone encoding of
the file (``alone``: byte-grouped zstd per chunk, what a first add stores). Encode and decode
speeds are logical MB of the changed tensors per CPU second of this process, one thread, best
of ``--repeat``; decoding is checked bit for bit.

Run: ``.venv/bin/python -m bench.vcs.finetunes [--repeat 3] [--files A.safetensors ...]``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import zstandard

from bench.common import model, paths
from potluck.config import RepoConfig
from potluck.objects.encoding import decode_object, encode_object, rechunk
from potluck.ops.vcs.odb import ObjectDB
from potluck.store.memory import MemoryStore
from potluck.tensors.dtypes import itemsize

FINETUNES = paths.RESULTS / "quality" / "finetunes"


@dataclass(frozen=True)
class Tensor:
    """One tensor of a safetensors file: name, dtype, shape and its bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    data: bytes


def read_tensors(path: Path) -> dict[str, Tensor]:
    """The tensors of a safetensors file, by name."""
    raw = path.read_bytes()
    (n,) = struct.unpack_from("<Q", raw)
    head = json.loads(raw[8 : 8 + n])
    out = {}
    for name, meta in head.items():
        if name == "__metadata__":
            continue
        a, b = meta["data_offsets"]
        data = raw[8 + n + a : 8 + n + b]
        out[name] = Tensor(name, meta["dtype"], tuple(meta["shape"]), data)
    return out


def find_finetunes(root: Path) -> list[Path]:
    """Full fine-tunes (``lora_rank`` 0) under ``root``, one per task, sorted by folder."""
    found = []
    for meta in sorted(root.glob("*/meta.json")):
        cfg = json.loads(meta.read_text()).get("config", {})
        enc = meta.parent / "encoder.safetensors"
        if cfg.get("lora_rank", 0) == 0 and enc.exists():
            found.append(enc)
    return found


@dataclass
class Way:
    """Totals of one encoding over the changed tensors of one file."""

    stored: int = 0
    enc_s: float = float("inf")
    dec_s: float = float("inf")


def _encode(new: Tensor, old: Tensor, diff: bool, cfg: RepoConfig) -> bytes:
    out = io.BytesIO()
    encode_object(
        rechunk([new.data], cfg.chunk_bytes),
        size=len(new.data),
        itemsize=itemsize(new.dtype),
        chunk_size=cfg.chunk_bytes,
        level=cfg.zstd_level,
        out=out,
        base=iter([old.data]),
        base_oid=hashlib.sha256(old.data).hexdigest(),
        diff=diff,
    )
    return out.getvalue()


def _decode(blob: bytes, old: Tensor) -> bytes:
    def open_base(oid: str) -> Iterator[bytes]:
        return iter([old.data])

    return b"".join(decode_object(io.BytesIO(blob), open_base))


def changed_bytes(pairs: list[tuple[Tensor, Tensor]]) -> int:
    """Bytes of the elements whose bit patterns differ between the two versions."""
    import numpy as np

    total = 0
    for new, old in pairs:
        k = itemsize(new.dtype)
        kind = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[k]
        a, b = np.frombuffer(new.data, kind), np.frombuffer(old.data, kind)
        total += k * int(np.count_nonzero(a != b))
    return total


def measure(pairs: list[tuple[Tensor, Tensor]], diff: bool, repeat: int, cfg: RepoConfig) -> Way:
    """Stored bytes and best-of-``repeat`` CPU seconds of one encoding of ``pairs``."""
    way = Way()
    for _ in range(repeat):
        t0 = time.process_time()
        blobs = [_encode(new, old, diff, cfg) for new, old in pairs]
        t1 = time.process_time()
        backs = [_decode(blob, old) for blob, (_, old) in zip(blobs, pairs, strict=True)]
        t2 = time.process_time()
        if any(back != new.data for back, (new, _) in zip(backs, pairs, strict=True)):
            raise SystemExit("a decoded tensor differs from the fine-tune: not bit-exact")
        way.enc_s, way.dec_s = min(way.enc_s, t1 - t0), min(way.dec_s, t2 - t1)
        way.stored = sum(map(len, blobs))
    return way


def put_stored(pairs: list[tuple[Tensor, Tensor]], cfg: RepoConfig) -> int:
    """Bytes ``ObjectDB.put`` stores for the new tensors with their dtype and shape."""
    db = ObjectDB(MemoryStore(), cfg, workers=1)
    total = 0
    for new, old in pairs:
        k = itemsize(new.dtype)
        base = hashlib.sha256(old.data).hexdigest()
        db.put(base, lambda d=old.data: [d], size=len(old.data), itemsize=k)
        oid = hashlib.sha256(new.data).hexdigest()
        res = db.put(
            oid,
            lambda d=new.data: [d],
            size=len(new.data),
            itemsize=k,
            base_oid=base,
            dtype=new.dtype,
            shape=new.shape,
        )
        if db.read_bytes(oid) != new.data:
            raise SystemExit(f"{new.name}: ObjectDB round trip is not bit-exact")
        total += res.stored
    return total


def standalone(path: Path, cfg: RepoConfig) -> tuple[int, int]:
    """(zstd -1 of the raw file, potluck's standalone encoding of its tensors) in bytes."""
    raw = path.read_bytes()
    plain = len(zstandard.ZstdCompressor(level=1).compress(raw))
    grouped = 0
    for t in read_tensors(path).values():
        out = io.BytesIO()
        k = itemsize(t.dtype)
        encode_object(
            rechunk([t.data], cfg.chunk_bytes),
            size=len(t.data),
            itemsize=k,
            chunk_size=cfg.chunk_bytes,
            level=cfg.zstd_level,
            out=out,
        )
        grouped += len(out.getvalue())
    return plain, grouped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", nargs="*", type=Path, help="fine-tuned encoder.safetensors files")
    ap.add_argument("--base", type=Path, default=None, help="base weights (default: shipped)")
    ap.add_argument("--repeat", type=int, default=1, help="best of N timings")
    args = ap.parse_args()
    files = args.files or find_finetunes(FINETUNES)
    if not files:
        raise SystemExit(f"no fine-tunes found under {FINETUNES} (run python -m bench.quality)")
    base_path = args.base or model.base_weights()
    base = read_tensors(base_path)
    cfg = RepoConfig()
    print(f"# load: {tuple(round(x, 2) for x in os.getloadavg())}  base: {base_path.name}")
    print(f"# chunk {cfg.chunk_bytes >> 20} MiB, zstd level {cfg.zstd_level}, one thread")
    cols = ["file", "MB", "chg %", "zstd %", "alone %", "xor %", "diff %", "put %"]
    cols += ["xor/chg", "diff/chg"]
    cols += ["enc xor", "enc diff", "dec xor", "dec diff"]
    print(" ".join(f"{c:>9}" if i else f"{c:32}" for i, c in enumerate(cols)))
    means: dict[str, list[float]] = {}
    for path in files:
        new = read_tensors(path)
        pairs = [(new[k], base[k]) for k in new if k in base and new[k].data != base[k].data]
        size = path.stat().st_size
        changed = sum(len(n.data) for n, _ in pairs)
        elements = changed_bytes(pairs)
        ways = {d: measure(pairs, d, args.repeat, cfg) for d in (False, True)}
        put = put_stored(pairs, cfg)
        plain, grouped = standalone(path, cfg)
        row = {
            "zstd": plain / size,
            "alone": grouped / size,
            "xor": ways[False].stored / size,
            "diff": ways[True].stored / size,
            "put": put / size,
            "xor/chg": ways[False].stored / elements,
            "diff/chg": ways[True].stored / elements,
        }
        for k, v in row.items():
            means.setdefault(k, []).append(v)
        speeds = [changed / 1e6 / w.enc_s for w in ways.values()]
        speeds += [changed / 1e6 / w.dec_s for w in ways.values()]
        name = path.parent.name if path.name == "encoder.safetensors" else path.name
        cells = [f"{size / 1e6:9.1f}", f"{100 * elements / size:9.1f}"]
        cells += [f"{100 * v:9.2f}" for v in row.values()] + [f"{s:9.0f}" for s in speeds]
        print(f"{name[:32]:32} " + " ".join(cells))
    mean = [f"{100 * sum(v) / len(v):9.2f}" for v in means.values()]
    print(f"{'mean':32} {'':9} {'':9} " + " ".join(mean))
    print("# chg: changed elements' bytes, % of the file; zstd..put: stored bytes, % of the file;")
    print("# enc/dec: MB of changed tensors per CPU second, best of --repeat")


if __name__ == "__main__":
    main()

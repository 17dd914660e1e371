"""Fuzz targets: one per reader of untrusted bytes, each a hypothesis strategy of inputs and a
check that runs the reader. The invariant: the reader returns a result (which is checked where
a property is known, e.g. a layout tiles the file) or raises a ``PotluckError``; anything else
propagates and is a bug. Time and memory are bounded by the runner (``fuzz.__main__``)."""

from __future__ import annotations

import atexit
import functools
import io
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from hypothesis import strategies as st

from fuzz import files, pickles, texts
from potluck.formats import scan_stream
from potluck.formats.base import Layout
from potluck.formats.pickle_safe import load_weights_pickle, walk_tensors
from potluck.formats.reader import read_tensors
from potluck.formats.safetensors import SafetensorsFormat
from potluck.objects.manifest import dumps, parse, parse_lenient
from potluck.ops.merge.statsfile import load_stats
from potluck.ops.patch.fileformat import read_patch
from potluck.ops.vcs.wire import dump_index, parse_index
from potluck.remote import ObjectRef
from potluck.remote.lfs import parse_batch


@functools.cache
def _tmp() -> Path:
    """This process's scratch directory (removed at exit)."""
    path = Path(tempfile.mkdtemp(prefix="potluck-fuzz-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


@dataclass(frozen=True)
class Target:
    """What to generate, how to read it, and the input's size (for the memory bound)."""

    strategy: st.SearchStrategy[Any]
    check: Callable[[Any], None]
    size: Callable[[Any], int] = len


def _tiles(layout: Layout, data: bytes) -> None:
    pos = 0
    for seg in layout.segments:
        assert seg.offset == pos and seg.length >= 0, (seg, pos)
        pos += seg.length
    assert pos == layout.size == len(data), (pos, layout.size, len(data))


def _checkpoint(name: str) -> Callable[[bytes], None]:
    def check(data: bytes) -> None:
        layout = scan_stream(io.BytesIO(data), len(data), name=name)
        _tiles(layout, data)
        read_tensors(io.BytesIO(data), layout, source=name)

    return check


def _safetensors(data: bytes) -> None:
    _checkpoint("f.safetensors")(data)
    fmt = SafetensorsFormat()
    if len(data) >= 9 and fmt.sniff(data[:4096], len(data)):
        prefix = data[: fmt.prefix_length(data)]
        if len(prefix) == fmt.prefix_length(data):
            fmt.scan_prefix(prefix)


def _pickle(data: bytes) -> None:
    obj, _ = load_weights_pickle(data)
    walk_tensors(obj, 16 * len(data) + (1 << 20))


def _manifest(data: bytes) -> None:
    parse_lenient(data, "fuzz")
    m = parse(data, "fuzz")
    assert dumps(m) == data


def _wire(data: bytes) -> None:
    entries = parse_index(data)
    assert parse_index(dump_index(entries.values())) == entries


def _on_disk(suffix: str, read: Callable[[Path], object]) -> Callable[[bytes], None]:
    def check(data: bytes) -> None:
        path = _tmp() / f"input{suffix}"
        path.write_bytes(data)
        read(path)

    return check


def _stats(path: Path) -> None:
    f = load_stats(path)
    for name in f.names():
        f.tensor_stats(name)


def _lfs(case: tuple[bytes, list[tuple[str, int]]]) -> None:
    body, refs = case
    url = "http://lfs.invalid/info/lfs"
    resp = httpx.Response(200, content=body, request=httpx.Request("POST", url + "/objects/batch"))
    parse_batch(resp, [ObjectRef(oid, size) for oid, size in refs], url)


TARGETS: dict[str, Target] = {
    "safetensors": Target(files.safetensors_files(), _safetensors),
    "pickle": Target(pickles.pickles(), _pickle),
    "torch": Target(pickles.torch_archives(), _checkpoint("f.pt")),
    "npz": Target(files.npz_files(), _checkpoint("f.npz")),
    "manifest": Target(texts.manifests(), _manifest),
    "wire": Target(texts.wire_indexes(), _wire),
    "patch": Target(files.patch_files(), _on_disk(".patch", read_patch)),
    "stats": Target(files.stats_files(), _on_disk(".stats", _stats)),
    "lfs": Target(texts.lfs_batches(), _lfs, size=lambda case: len(case[0])),
}

#: Targets whose input is plain bytes: atheris can also feed them raw (``--raw``).
RAW = {
    "safetensors": _safetensors,
    "pickle": _pickle,
    "torch": _checkpoint("f.pt"),
    "npz": _checkpoint("f.npz"),
    "manifest": _manifest,
    "wire": _wire,
    "patch": _on_disk(".patch", read_patch),
    "stats": _on_disk(".stats", _stats),
}

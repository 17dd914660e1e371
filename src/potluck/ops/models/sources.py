"""Model sources: a checkpoint file, a Hugging Face directory, or stored tensors, read lazily.

``open_path(path)`` opens a single checkpoint file (safetensors, PyTorch zip, npz) or a Hugging
Face model directory (``model.safetensors``, sharded ``*.safetensors`` with an index, or
``pytorch_model*.bin``). Safetensors data is memory-mapped, so reading one tensor costs no copy
until it is used; other formats read one tensor at a time. ``open_input`` takes a path or an
already open ``ModelSource``; the git layer (``potluck.git.models``) builds a ``ModelSource`` over
the object store for ``file@rev``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from potluck.errors import UserError
from potluck.formats import scan_file
from potluck.formats.base import Layout, TensorSegment
from potluck.formats.reader import read_tensors
from potluck.tensors.digests import tensor_sha256
from potluck.tensors.dtypes import to_numpy

__all__ = [
    "BLOCK_BYTES",
    "CONFIG_FILES",
    "ModelSource",
    "TensorInfo",
    "checkpoint_files",
    "config_files",
    "copy_layout",
    "layout_files",
    "open_path",
]

#: Bytes per block when a tensor is hashed, encoded, decoded or written piece by piece (patch
#: create/apply); mapped pages behind each block are let go, so memory stays a few blocks.
BLOCK_BYTES = 16 << 20

#: Files copied from a model directory to a derived one (config, tokenizer, generation settings).
CONFIG_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
    "spiece.model",
    "sentencepiece.bpe.model",
)

#: sentence-transformers files beside the weights; ``modules.json`` also names module folders.
SENTENCE_TRANSFORMERS_FILES = (
    "modules.json",
    "config_sentence_transformers.json",
    "sentence_bert_config.json",
)


#: Weight files of a directory without an index, most specific first.
_WEIGHT_PATTERNS = (
    "model.safetensors",
    "model-*-of-*.safetensors",
    "pytorch_model.bin",
    "pytorch_model-*-of-*.bin",
    "*.safetensors",
    "*.bin",
    "*.pt",
    "*.pth",
    "*.npz",
)


@dataclass(frozen=True)
class TensorInfo:
    """Name, canonical dtype (``F32``, ``BF16``, …) and shape of one tensor."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        """Number of elements."""
        return int(np.prod(self.shape, dtype=np.int64))


Reader = Callable[[str], np.ndarray]


@dataclass
class ModelSource:
    """A model's tensors, read one at a time; ``files`` maps each tensor to its file (shard).

    ``config_dir`` is a directory holding the model's ``config.json`` and tokenizer files, when
    there is one. ``identity`` describes where the tensors came from (path, revision, hashes) for
    provenance records. ``metadata`` maps each safetensors file to its ``__metadata__`` (e.g.
    ``{"format": "pt"}``), which a model derived file by file keeps. ``known_sha256`` holds
    tensor hashes known without reading (stored tensors: their object ids).
    """

    label: str
    infos: dict[str, TensorInfo]
    reader: Reader
    files: dict[str, str] = field(default_factory=dict)
    config_dir: Path | None = None
    identity: dict[str, str] = field(default_factory=dict)
    closers: list[Callable[[], None]] = field(default_factory=list)
    releasers: dict[str, Callable[[int, int | None], None]] = field(default_factory=dict)
    metadata: dict[str, dict[str, str]] = field(default_factory=dict)
    known_sha256: dict[str, str] = field(default_factory=dict)

    def names(self) -> list[str]:
        """Tensor names in the source's order."""
        return list(self.infos)

    def info(self, name: str) -> TensorInfo:
        """The ``TensorInfo`` of ``name``, or a ``UserError`` naming the model."""
        try:
            return self.infos[name]
        except KeyError:
            raise UserError(
                f"{self.label} has no tensor named {name!r}",
                hint="the inputs must be versions of the same model (same tensor names)",
                model=self.label,
                tensor=name,
            ) from None

    def read(self, name: str) -> np.ndarray:
        """The tensor ``name`` (read-only; memory-mapped where the format allows)."""
        self.info(name)
        return self.reader(name)

    def release(self, name: str, start: int = 0, length: int | None = None) -> None:
        """Tell the OS that the mapped pages of bytes ``[start, start+length)`` of the tensor
        (all of it by default) are not needed now; they are read again if used (low peak RSS)."""
        fn = self.releasers.get(name)
        if fn is not None:
            fn(start, length)

    def blocks(self, name: str, arr: np.ndarray | None = None) -> Iterator[np.ndarray]:
        """The tensor (``arr`` when already read) as flat C-order pieces of about
        ``BLOCK_BYTES``, letting the mapped pages of each piece go once the next is asked for."""
        a = self.read(name) if arr is None else arr
        flat = np.ascontiguousarray(a).reshape(-1)
        step = max(1, BLOCK_BYTES // max(1, flat.dtype.itemsize))
        for lo in range(0, flat.size, step):
            yield flat[lo : lo + step]
            self.release(name, lo * flat.dtype.itemsize, step * flat.dtype.itemsize)

    def sha256(self, name: str, arr: np.ndarray | None = None) -> str:
        """``tensor_sha256`` of the tensor (``arr`` when already read), hashed block by block;
        ``known_sha256`` (a stored tensor's object id) answers without reading."""
        known = self.known_sha256.get(name)
        if known is not None:
            return known
        a = self.read(name) if arr is None else arr
        if a.dtype.byteorder == ">" or not a.flags.c_contiguous:
            return tensor_sha256(a)
        h = hashlib.sha256()
        for piece in self.blocks(name, a):
            h.update(piece.view(np.uint8).data)
        return h.hexdigest()

    def close(self) -> None:
        """Release open files and mappings."""
        while self.closers:
            self.closers.pop()()

    def __enter__(self) -> ModelSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def config_files(directory: Path | None) -> list[Path]:
    """The ``CONFIG_FILES`` present in ``directory`` (none for None)."""
    if directory is None:
        return []
    return [directory / n for n in CONFIG_FILES if (directory / n).is_file()]


def layout_files(directory: Path | None) -> list[Path]:
    """The non-weight files of a model directory that travel with a model derived from it
    (merge, ``patch apply`` and ``peft apply`` outputs), as paths relative to ``directory``.

    They are the ``CONFIG_FILES`` (config, tokenizer, generation and processor settings), the
    Python files ``config.json``'s ``auto_map`` names (remote code), and a sentence-transformers
    layout: ``modules.json``, ``config_sentence_transformers.json``,
    ``sentence_bert_config.json`` and every module folder ``modules.json`` names (``1_Pooling/``
    …, with all their files). Weights, shard indexes, the model card and anything else stay
    behind; a module folder the source lacks is not invented.
    """
    if directory is None:
        return []
    names = [*CONFIG_FILES, *SENTENCE_TRANSFORMERS_FILES, *_remote_code(directory)]
    out = [Path(n) for n in dict.fromkeys(names) if (directory / n).is_file()]
    for folder in _module_folders(directory):
        out += sorted(
            p.relative_to(directory)
            for p in (directory / folder).rglob("*")
            if p.is_file() and not p.name.startswith(".")
        )
    return out


def copy_layout(directory: Path | None, dest: Path) -> list[str]:
    """Copy ``layout_files(directory)`` into ``dest`` (folders created); return them (POSIX)."""
    copied = []
    for rel in layout_files(directory):
        assert directory is not None
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(directory / rel, dest / rel)
        copied.append(rel.as_posix())
    return copied


def _json_file(path: Path) -> object:
    try:
        return json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return None  # absent or unreadable: nothing more travels (the file itself is copied)


def _remote_code(directory: Path) -> list[str]:
    """``modeling_x.py``, … named by ``config.json``'s ``auto_map`` (``"modeling_x.Class"``)."""
    config = _json_file(directory / "config.json")
    auto_map = config.get("auto_map") if isinstance(config, dict) else None
    if not isinstance(auto_map, dict):
        return []
    refs = [
        v for value in auto_map.values() for v in (value if isinstance(value, list) else [value])
    ]
    modules = [r.rsplit(".", 1)[0] for r in refs if isinstance(r, str) and "--" not in r]
    return [f"{m}.py" for m in modules if m and "/" not in m and "\\" not in m]


def _module_folders(directory: Path) -> list[str]:
    """The module folders a sentence-transformers ``modules.json`` names and the source has."""
    modules = _json_file(directory / "modules.json")
    if not isinstance(modules, list):
        return []
    out = []
    for m in modules:
        path = m.get("path") if isinstance(m, dict) else None
        if not isinstance(path, str) or not path or Path(path).is_absolute():
            continue
        if ".." in Path(path).parts or not (directory / path).is_dir():
            continue  # never outside the model directory; a missing folder is not invented
        out.append(Path(path).as_posix())
    return sorted(set(out))


def checkpoint_files(directory: Path) -> list[Path]:
    """The weight files of a Hugging Face directory, in shard order."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = directory / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not all(isinstance(f, str) for f in weight_map.values()):
                    raise TypeError("weight_map names a file with something not a string")
            except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
                raise UserError(f"{index}: not a valid shard index ({str(e)[:200]})") from e
            return [directory / f for f in dict.fromkeys(weight_map.values())]
    for pattern in _WEIGHT_PATTERNS:
        found = sorted(p for p in directory.glob(pattern) if p.is_file())
        if found:
            return found
    raise UserError(
        f"{directory}: no checkpoint files (model.safetensors, shards with an index, "
        "pytorch_model.bin, …)",
        hint="point at a Hugging Face model directory or a single checkpoint file",
    )


def open_path(path: str | os.PathLike[str]) -> ModelSource:
    """Open a checkpoint file or a Hugging Face model directory (see the module docstring)."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such file or directory", hint="check the model path")
    if p.is_dir():
        files = checkpoint_files(p)
        config_dir: Path | None = p
    else:
        files = [p]
        config_dir = p.parent if (p.parent / "config.json").is_file() else None
    src = ModelSource(str(path), {}, lambda n: np.empty(0), config_dir=config_dir)
    readers: dict[str, Callable[[], np.ndarray]] = {}
    try:
        for f in files:
            for info, reader in _open_file(f, src):
                if info.name in src.infos:
                    raise UserError(f"{p}: tensor {info.name!r} appears in two files")
                src.infos[info.name] = info
                src.files[info.name] = f.name
                readers[info.name] = reader
    except BaseException:
        src.close()
        raise
    src.reader = lambda n: readers[n]()
    src.identity = {"path": str(path)}
    return src


def _open_file(
    path: Path, src: ModelSource
) -> Iterator[tuple[TensorInfo, Callable[[], np.ndarray]]]:
    if not path.is_file():
        raise UserError(f"{path}: listed in the shard index but missing", hint="re-download it")
    layout = scan_file(path)
    if layout.format == "safetensors":
        src.metadata[path.name] = dict(layout.metadata)
        yield from _mapped(path, layout, src)
        return
    handle = path.open("rb")
    src.closers.append(handle.close)
    backing = {v.storage for v in layout.views}  # shared storages: their views are the tensors
    names = [s.name for s in layout.tensor_segments() if s.name not in backing]
    names += [v.name for v in layout.views]
    specs = {v.name: (v.dtype, tuple(v.shape)) for v in layout.views}
    specs.update({s.name: (s.dtype, tuple(s.shape)) for s in layout.tensor_segments()})
    for name in names:
        dtype, shape = specs[name]
        yield TensorInfo(name, dtype, shape), _file_reader(handle, layout, name)


def _file_reader(handle: object, layout: Layout, name: str) -> Callable[[], np.ndarray]:
    return lambda: read_tensors(handle, layout, [name])[name]  # type: ignore[arg-type]


def _mapped(
    path: Path, layout: Layout, src: ModelSource
) -> Iterator[tuple[TensorInfo, Callable[[], np.ndarray]]]:
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
    if mm is not None:
        src.closers.append(lambda: _close_map(mm))
    for seg in layout.tensor_segments():
        if mm is not None and seg.length:
            src.releasers[seg.name] = _releaser(mm, seg)
        yield TensorInfo(seg.name, seg.dtype, tuple(seg.shape)), _map_reader(mm, seg)


def _releaser(mm: mmap.mmap, seg: TensorSegment) -> Callable[[int, int | None], None]:
    def release(start: int, length: int | None) -> None:
        lo = seg.offset + max(0, start)
        hi = seg.offset + (seg.length if length is None else min(seg.length, start + length))
        lo -= lo % mmap.PAGESIZE
        if hi > lo:
            with contextlib.suppress(ValueError, OSError):  # closed, or not supported here
                mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    return release


def _close_map(mm: mmap.mmap) -> None:
    with contextlib.suppress(BufferError):  # arrays still point into it; they keep it alive
        mm.close()


def _map_reader(mm: mmap.mmap | None, seg: TensorSegment) -> Callable[[], np.ndarray]:
    def read() -> np.ndarray:
        dtype = to_numpy(seg.dtype)
        if mm is None or seg.length == 0:
            return np.zeros(seg.shape, dtype)
        arr = np.frombuffer(mm, dtype=dtype, count=seg.length // dtype.itemsize, offset=seg.offset)
        return arr.reshape(seg.shape)

    return read


ModelInput = ModelSource | str | os.PathLike[str]


def open_input(model: ModelInput, stack: ExitStack) -> ModelSource:
    """``model`` itself when it is a ``ModelSource`` (the caller closes it), else ``open_path``."""
    if isinstance(model, ModelSource):
        return model
    src = open_path(model)
    stack.callback(src.close)
    return src

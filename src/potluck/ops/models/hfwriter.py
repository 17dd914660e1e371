"""Write a Hugging Face model directory tensor by tensor, in any order, all or nothing.

``HFDirWriter(out_dir, infos, max_shard_bytes)`` lays the tensors out up front (one
``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` shards with
``model.safetensors.index.json`` above the size limit), writes each file's header, then takes
tensor data as it is produced — whole or in row ranges, from any thread (``os.pwrite`` at known
offsets). Everything goes to a hidden staging directory beside ``out_dir`` that replaces it only
in ``commit``; on error ``abort`` removes it, so a failed merge never leaves a half-written model.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from potluck.errors import UserError
from potluck.fileio import publish_mode
from potluck.formats.safetensors import build_header
from potluck.ops.models.sources import TensorInfo, copy_layout
from potluck.tensors.dtypes import itemsize, to_numpy

__all__ = ["DEFAULT_SHARD_BYTES", "HFDirWriter", "parse_size"]

#: Shard size limit (mergekit's and transformers' default is 5 GB).
DEFAULT_SHARD_BYTES = 5 * 1000**3


def parse_size(text: str) -> int:
    """``"5GB"``, ``"500MiB"``, ``"1e9"`` → bytes."""
    units = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4}
    units |= {"KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4}
    t = text.strip().upper()
    num = t.rstrip("KMGTIB")
    unit = t[len(num) :].strip()
    try:
        value = float(num) * units[unit]
    except (ValueError, KeyError):
        raise UserError(f"not a size: {text!r}", hint="write e.g. 5GB, 800MiB or 1e9") from None
    if value <= 0:
        raise UserError(f"size must be positive: {text!r}")
    return int(value)


@dataclass(frozen=True)
class _Slot:
    file: int
    offset: int
    info: TensorInfo


class HFDirWriter:
    """See the module docstring. Use as a context manager: commits on success, aborts on error."""

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        infos: Sequence[TensorInfo],
        *,
        max_shard_bytes: int = DEFAULT_SHARD_BYTES,
        metadata: Mapping[str, str] | None = None,
        overwrite: bool = False,
    ) -> None:
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and any(self.out_dir.iterdir()) and not overwrite:
            raise UserError(
                f"{self.out_dir} exists and is not empty",
                hint="choose a new output directory, or pass --overwrite to replace it",
            )
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.stage = Path(
            tempfile.mkdtemp(prefix=f".{self.out_dir.name}.", dir=self.out_dir.parent)
        )
        publish_mode(self.stage)  # mkdtemp makes it private; the output is shared like any dir
        self.groups = _shard(infos, max_shard_bytes)
        n = len(self.groups)
        self.names = (
            ["model.safetensors"]
            if n == 1
            else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self.slots: dict[str, _Slot] = {}
        self.fds: list[int] = []
        try:
            for i, group in enumerate(self.groups):
                self._open(i, group, metadata)
        except BaseException:
            self.abort()
            raise

    def _open(self, i: int, group: list[TensorInfo], metadata: Mapping[str, str] | None) -> None:
        header = build_header([(t.name, t.dtype, t.shape) for t in group], metadata)
        fd = os.open(self.stage / self.names[i], os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        self.fds.append(fd)
        os.write(fd, header)
        offset = len(header)
        for t in group:
            self.slots[t.name] = _Slot(i, offset, t)
            offset += t.size * itemsize(t.dtype)
        os.ftruncate(fd, offset)

    def write(self, name: str, array: np.ndarray, row_start: int = 0) -> None:
        """Write ``array`` as tensor ``name`` (or as its rows from ``row_start`` on)."""
        slot = self.slots[name]
        info = slot.info
        data = np.ascontiguousarray(array, dtype=to_numpy(info.dtype))
        row_elems = int(np.prod(info.shape[1:], dtype=np.int64)) if info.shape else 1
        if row_start == 0 and data.shape == info.shape:
            pos = slot.offset
        elif data.shape[1:] == info.shape[1:] and row_start + len(data) <= info.shape[0]:
            pos = slot.offset + row_start * row_elems * data.itemsize
        else:
            raise ValueError(f"{name}: block {data.shape} at row {row_start} does not fit")
        view = data.reshape(-1).view(np.uint8).data
        while view:
            done = os.pwrite(self.fds[slot.file], view, pos)
            view, pos = view[done:], pos + done

    def commit(
        self, copy_from: Path | None = None, files: Mapping[str, str] | None = None
    ) -> list[str]:
        """fsync, write the index (when sharded), copy the layout files of ``copy_from``
        (``sources.layout_files``: config, tokenizer, sentence-transformers modules), write
        ``files`` (name → text, over copied ones), move into place; return the files written
        (paths relative to the output directory, POSIX, sorted)."""
        for fd in self.fds:
            os.fsync(fd)
            os.close(fd)
        self.fds = []
        if len(self.names) > 1:
            (self.stage / "model.safetensors.index.json").write_text(self._index())
        copy_layout(copy_from, self.stage)
        for name, text in (files or {}).items():
            (self.stage / name).write_text(text)
        if self.out_dir.exists():
            old = self.out_dir.with_name(f".{self.out_dir.name}.old-{os.getpid()}")
            os.replace(self.out_dir, old)
            os.replace(self.stage, self.out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.stage, self.out_dir)
        return sorted(p.relative_to(self.out_dir).as_posix() for p in self.out_dir.rglob("*")
                      if p.is_file())  # fmt: skip

    def _index(self) -> str:
        weight_map = {name: self.names[s.file] for name, s in sorted(self.slots.items())}
        total = sum(s.info.size * itemsize(s.info.dtype) for s in self.slots.values())
        return json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)

    def abort(self) -> None:
        """Close and remove everything written so far."""
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []
        shutil.rmtree(self.stage, ignore_errors=True)


def _shard(infos: Sequence[TensorInfo], limit: int) -> list[list[TensorInfo]]:
    groups: list[list[TensorInfo]] = [[]]
    used = 0
    for t in infos:
        size = t.size * itemsize(t.dtype)
        if groups[-1] and used + size > limit:
            groups.append([])
            used = 0
        groups[-1].append(t)
        used += size
    return groups

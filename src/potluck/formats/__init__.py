"""Checkpoint formats: detect a file's format and describe it as segments (see ``base``).

Built in: ``safetensors``, ``pytorch`` (``torch.save`` zip files) and ``npz``. Third-party formats
register through the ``potluck.formats`` entry-point group.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, cast

from potluck.errors import FormatError, PotluckError
from potluck.formats.base import CheckpointFormat, Layout, naming
from potluck.formats.safetensors import SafetensorsFormat
from potluck.registry import Registry

if TYPE_CHECKING:  # imported when first used (``_Deferred``, ``__getattr__``)
    from potluck.formats.npz import NpzFormat
    from potluck.formats.torch_zip import TorchZipFormat

__all__ = [
    "FORMATS",
    "NpzFormat",
    "SafetensorsFormat",
    "TorchZipFormat",
    "detect",
    "scan_file",
]

#: Bytes of a file's beginning that ``sniff`` gets to see.
HEAD_SIZE = 4096

#: built-in formats whose module is imported on first use: {class name: module}
_DEFERRED = {
    "TorchZipFormat": "potluck.formats.torch_zip",
    "NpzFormat": "potluck.formats.npz",
}


def __getattr__(name: str) -> object:
    """``NpzFormat`` and ``TorchZipFormat``, imported when first asked for."""
    if name in _DEFERRED:
        return getattr(importlib.import_module(_DEFERRED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _Deferred:
    """A built-in format made (its module imported: zipfile, pickle) only when a file is not
    one of the formats tried before it: git's filter cleans a safetensors file without them."""

    def __init__(self, name: str, cls: str, needs_random_access: bool) -> None:
        self.name = name
        self.needs_random_access = needs_random_access  # the class's own (a test checks)
        self._cls = cls
        self._format: CheckpointFormat | None = None

    def get(self) -> CheckpointFormat:
        """The format itself (made on the first call)."""
        if self._format is None:
            module = importlib.import_module(_DEFERRED[self._cls])
            self._format = cast(CheckpointFormat, getattr(module, self._cls)())
        return self._format

    def sniff(self, head: bytes, size: int) -> bool:
        """The format's ``sniff``."""
        return self.get().sniff(head, size)

    def scan(self, f: BinaryIO, size: int) -> Layout:
        """The format's ``scan``."""
        return self.get().scan(f, size)


FORMATS: Registry[CheckpointFormat] = Registry("checkpoint format", "potluck.formats")
FORMATS.register("safetensors", SafetensorsFormat())
FORMATS.register("pytorch", _Deferred("pytorch", "TorchZipFormat", needs_random_access=True))
FORMATS.register("npz", _Deferred("npz", "NpzFormat", needs_random_access=True))


def detect(head: bytes, size: int) -> CheckpointFormat | None:
    """The first registered format whose ``sniff`` accepts the file, or None.

    Built-ins are tried in the order safetensors, pytorch, npz; plugins after them (looked
    for only when no built-in format matches).
    """
    return _first_match(FORMATS.items(plugins=False), head, size) or _first_match(
        FORMATS.items(), head, size
    )


def _first_match(
    formats: Iterator[tuple[str, CheckpointFormat]], head: bytes, size: int
) -> CheckpointFormat | None:
    for _name, fmt in formats:
        try:
            if fmt.sniff(head, size):
                return _made(fmt)
        except Exception:  # a sniff must not raise; a broken plugin just does not match
            continue
    return None


def scan_file(path: str | os.PathLike[str]) -> Layout:
    """Detect the format of the file at ``path`` and scan it; errors name ``path``."""
    with Path(path).open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(HEAD_SIZE)
        fmt = detect(head, size)
        if fmt is None:
            raise FormatError(
                f"{path}: not a checkpoint potluck knows (safetensors, PyTorch zip, npz)",
                hint="track only checkpoint files, or add a format plugin",
            )
        f.seek(0)
        return _scan_named(fmt, f, size, str(path))


def scan_stream(f: BinaryIO, size: int, *, name: str = "<stream>") -> Layout:
    """Detect the format of the open, seekable file ``f`` (``size`` bytes) and scan it.

    Errors name the file as ``name``.
    """
    f.seek(0)
    head = f.read(HEAD_SIZE)
    fmt = detect(head, size) or _by_extension(name)
    if fmt is None:
        raise FormatError(
            f"{name}: not a checkpoint potluck knows (safetensors, PyTorch zip, npz)",
            hint="track only checkpoint files (`potluck untrack PATTERN`), or add a format plugin",
        )
    f.seek(0)
    return _scan_named(fmt, f, size, name)


def _scan_named(fmt: CheckpointFormat, f: BinaryIO, size: int, name: str) -> Layout:
    """``fmt.scan``, its errors naming the file ``name``."""
    try:
        return fmt.scan(f, size)
    except PotluckError as e:
        renamed = naming(e, name)
        if renamed is e:
            raise
        raise renamed from e


_EXTENSIONS = {
    ".safetensors": "safetensors",
    ".pt": "pytorch",
    ".pth": "pytorch",
    ".bin": "pytorch",
    ".npz": "npz",
}


def _by_extension(name: str) -> CheckpointFormat | None:
    """Content decides the format; the extension only picks the parser whose error explains
    why a file that looks like one of ours is not valid (e.g. a truncated safetensors)."""
    for ext, fmt in _EXTENSIONS.items():
        if name.endswith(ext):
            return _made(FORMATS.get(fmt))
    return None


def _made(fmt: CheckpointFormat) -> CheckpointFormat:
    """The format itself for a deferred built-in one."""
    return fmt.get() if isinstance(fmt, _Deferred) else fmt

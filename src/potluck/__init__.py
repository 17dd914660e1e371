"""potluck: build ML models the way open-source software is built.

Public API (everything else is internal):

* ``load(path, rev=None, names=None)`` → ``{name: numpy array}`` from the work tree or any git
  revision, decoding only the requested tensors.
* error types: ``PotluckError``, ``UserError``, ``FormatError``, ``IntegrityError``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from potluck.errors import FormatError, IntegrityError, PotluckError, UserError

if TYPE_CHECKING:
    import numpy as np

    __version__: str


def __getattr__(name: str) -> str:
    """``__version__``, read from the installed metadata on first use (``importlib.metadata``
    takes longer to import than a git hook should spend starting)."""
    if name != "__version__":
        raise AttributeError(f"module 'potluck' has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        value = version("potluck")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        value = "0.0.0"
    globals()["__version__"] = value
    return value


def load(
    path: str, rev: str | None = None, names: list[str] | None = None
) -> dict[str, np.ndarray]:
    """Tensors of the checkpoint ``path`` as numpy arrays.

    ``rev`` is any git revision (None = the work tree); ``names`` limits decoding to those
    tensors. Every decoded object is verified against its hash.
    """
    from potluck.git.inspect import load as _load

    return _load(path, rev, names)


__all__ = ["FormatError", "IntegrityError", "PotluckError", "UserError", "__version__", "load"]

"""potluck: build ML models the way open-source software is built.

Public API (everything else is internal):

* ``load(path, rev=None, names=None)`` → ``{name: numpy array}`` from the work tree or any git
  revision, decoding only the requested tensors.
* error types: ``PotluckError``, ``UserError``, ``FormatError``, ``IntegrityError``.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from potluck.errors import FormatError, IntegrityError, PotluckError, UserError

if TYPE_CHECKING:
    import numpy as np

try:
    __version__ = version("potluck")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"


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

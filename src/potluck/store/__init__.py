"""Object stores: where object files live. Never imports numpy or ``potluck.objects``.

A repository keeps its objects in a ``LocalStore`` under ``.git/potluck/objects`` (``git.repo``);
``MemoryStore`` is for tests and scratch work. Objects elsewhere are reached through remotes
(``potluck.remote.REMOTES``), not through another store.
"""

from __future__ import annotations

from potluck.store.base import ObjectStore, validate_oid
from potluck.store.local import LocalStore
from potluck.store.memory import MemoryStore

__all__ = ["LocalStore", "MemoryStore", "ObjectStore", "validate_oid"]

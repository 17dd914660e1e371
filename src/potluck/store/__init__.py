"""Object stores: where object files live. Never imports numpy or ``potluck.objects``."""

from __future__ import annotations

from collections.abc import Callable

from potluck.registry import Registry
from potluck.store.base import ObjectStore, validate_oid
from potluck.store.local import LocalStore
from potluck.store.memory import MemoryStore

STORES: Registry[Callable[..., ObjectStore]] = Registry("object store", "potluck.stores")
STORES.register("local", LocalStore)
STORES.register("memory", MemoryStore)

__all__ = ["STORES", "LocalStore", "MemoryStore", "ObjectStore", "validate_oid"]

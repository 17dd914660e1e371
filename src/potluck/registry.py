"""A generic, explicit registry: one per extension point (formats, codecs, merge methods, routers,
remote URL schemes)."""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from typing import Generic, TypeVar

from potluck.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named plugins of one kind.

    ``register`` refuses duplicates; ``get`` answers an unknown name with the known ones. Third
    parties plug in through the entry-point group ``entry_point_group``, loaded lazily on first use.
    """

    def __init__(self, kind: str, entry_point_group: str | None = None) -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._items: dict[str, T] = {}
        self._entry_points_loaded = entry_point_group is None

    def register(self, name: str, item: T) -> T:
        """Add ``item`` under ``name``; a second registration of the same name is an error."""
        if name in self._items:
            raise UserError(
                f"{self.kind} {name!r} is already registered",
                hint="pick another name for the plugin",
                name=name,
            )
        self._items[name] = item
        return item

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        assert self.entry_point_group is not None
        from importlib import metadata  # here: importing it costs every git hook's start

        for ep in metadata.entry_points(group=self.entry_point_group):
            if ep.name not in self._items:
                self._items[ep.name] = ep.load()

    def get(self, name: str) -> T:
        """Return the plugin called ``name`` or raise a ``UserError`` listing the known names."""
        if name not in self._items:
            self._load_entry_points()
        try:
            return self._items[name]
        except KeyError:
            known = sorted(self._items)
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise UserError(
                f"unknown {self.kind} {name!r}",
                hint=f"{hint}known: {', '.join(known) or '(none)'}",
                name=name,
                known=known,
            ) from None

    def names(self) -> list[str]:
        """All registered names, sorted."""
        self._load_entry_points()
        return sorted(self._items)

    def items(self, *, plugins: bool = True) -> Iterator[tuple[str, T]]:
        """(name, plugin) pairs in registration order; with ``plugins`` False only those
        registered so far, without looking for entry points (which costs a scan of every
        installed distribution: a tenth of a second in a large environment)."""
        if plugins:
            self._load_entry_points()
        return iter(list(self._items.items()))

    def __contains__(self, name: object) -> bool:
        self._load_entry_points()
        return name in self._items

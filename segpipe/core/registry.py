"""Explicit registries: a decorator fills a dict, and lookup errors list what exists.

Schedules, normalizers, augmentations and networks register here, so extending segpipe means
adding one function and one decorator line, never crawling folders or editing a trainer.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A named table of components."""

    def __init__(self, kind: str, entry_point_group: str | None = None):
        self.kind = kind
        self._items: dict[str, T] = {}
        # outside packages add components through this package entry-point group (never folder crawling)
        self.entry_point_group = entry_point_group
        self._loaded_entry_points = entry_point_group is None

    def register(self, name: str) -> Callable[[T], T]:
        def deco(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = item
            return item

        return deco

    def get(self, name: str) -> T:
        if name not in self._items:
            self._load_entry_points()
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._items))}") from None

    def names(self) -> list[str]:
        self._load_entry_points()
        return sorted(self._items)

    def _load_entry_points(self) -> None:
        """Once: each entry point of the group is a component registered under the entry point's name."""
        if self._loaded_entry_points:
            return
        self._loaded_entry_points = True
        for ep in entry_points(group=self.entry_point_group):
            item = ep.load()
            self._items.setdefault(ep.name, item)

    def __contains__(self, name: str) -> bool:
        return name in self._items

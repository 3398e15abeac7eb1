"""A named registry: adapters, dataset recipes and figures each keep one, built the same way."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Objects by name, filled by ``register``; ``kind`` names the registry in error messages."""

    def __init__(self, kind: str, loader: Callable[[], None] | None = None) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._loader = loader  # imports the modules that register, on first lookup

    def register(self, name: str, item: T) -> T:
        if name in self._items and self._items[name] is not item:
            raise ValueError(f"{self.kind} name {name!r} is already registered")
        self._items[name] = item
        return item

    def _load(self) -> None:
        if self._loader is not None:
            loader, self._loader = self._loader, None
            loader()

    def get(self, name: str, hint: str = "") -> T:
        self._load()
        if name not in self._items:
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {sorted(self._items)}{hint}")
        return self._items[name]

    def names(self) -> list[str]:
        self._load()
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __getitem__(self, name: str) -> T:
        return self.get(name)

"""Name -> builder registries, the project's only global state."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from cmssft.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection of builders, filled with the :meth:`register` decorator."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        if name not in self._items:
            known = ", ".join(sorted(self._items)) or "(none)"
            raise UserError(f"unknown {self.kind} {name!r}; registered: {known}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items


DATASETS: Registry[Callable] = Registry("dataset")
MODELS: Registry[Callable] = Registry("model")

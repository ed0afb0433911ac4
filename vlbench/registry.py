"""Name → builder registries for model families and tasks (timm's ``@register_model`` pattern)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T", bound=Callable)


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._builders: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(builder: T) -> T:
            if name in self._builders:
                raise ValueError(f"{self.kind} {name!r} is already registered (by {self._builders[name].__module__})")
            self._builders[name] = builder
            return builder

        return decorator

    def get(self, name: str) -> T:
        if name not in self._builders:
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {', '.join(sorted(self._builders))}")
        return self._builders[name]

    def names(self) -> list[str]:
        return sorted(self._builders)


MODELS: Registry = Registry("model")
TASKS: Registry = Registry("task")

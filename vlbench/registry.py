"""Name → builder registries for model families and tasks (timm's ``@register_model`` pattern)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from vlbench.errors import VlbenchError

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
        """The builder registered as ``name``; an unknown name (e.g. ``model.name=foo``) is a user error, one line."""
        if name not in self._builders:
            raise VlbenchError(
                f"{self.kind}.name={name!r}: no such {self.kind}; registered: {', '.join(sorted(self._builders))}"
            )
        return self._builders[name]

    def names(self) -> list[str]:
        return sorted(self._builders)


MODELS: Registry = Registry("model")
TASKS: Registry = Registry("task")

"""Named entries that the benchmark runners take by name (contenders, workloads, algorithms).

As timm registers models: an entry is registered once, in one place, and every runner, report and
test reads the registry, so adding a contender or a workload is one ``register`` call::

    from registry import Registry

    WORKLOADS = Registry("workload")
    WORKLOADS.register("conv4 28px 5w1s, mb 8, K=1", dict(model="conv4", meta_batch=8, steps=1, lr=0.4))
    WORKLOADS.get("conv4 28px 5w1s, mb 8, K=1")      # the value; an unknown name lists the known ones
    WORKLOADS.names()                                 # in registration order
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries by name, in registration order; a name is registered once."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, value: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = value
        return value

    def decorator(self, name: str) -> Callable[[T], T]:
        """``@REGISTRY.decorator("name")`` registers the decorated function or class."""
        return lambda value: self.register(name, value)

    def get(self, name: str) -> T:
        if name not in self._entries:
            close = difflib.get_close_matches(name, list(self._entries), n=3)
            hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
            raise KeyError(f"unknown {self.kind} {name!r}{hint}; registered: {', '.join(self._entries)}")
        return self._entries[name]

    def names(self) -> list[str]:
        return list(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return list(self._entries.items())

    def __contains__(self, name: Any) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

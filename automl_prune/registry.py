"""Name -> component registries with lazy imports.

Components (models, datasets, criteria, strategies, rewards, ...) are looked up by name.
A registry entry is either an object or a ``"package.module:attribute"`` string imported
on first use, so listing names never imports heavy optional dependencies. An unknown
name raises :class:`~automl_prune.errors.UnknownNameError` listing the valid names.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from automl_prune.errors import UnknownNameError

T = TypeVar("T")


def import_object(path: str) -> object:
    """Import ``"package.module:attribute"`` (attribute may be dotted).

    Args:
        path: Import path with a colon between module and attribute.

    Returns:
        The imported attribute.

    Raises:
        UnknownNameError: The path is malformed or cannot be imported.
    """
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise UnknownNameError(f"'{path}' is not an import path; write it as 'package.module:attribute'")
    try:
        obj: object = importlib.import_module(module_name)
    except ImportError as exc:
        raise UnknownNameError(f"cannot import module '{module_name}' from '{path}': {exc}") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UnknownNameError(f"module '{module_name}' has no attribute '{attr}' (from '{path}')")
        obj = getattr(obj, part)
    return obj


@dataclass
class Entry(Generic[T]):
    """One registered component."""

    name: str
    target: T | str
    description: str = ""

    def load(self) -> T:
        """Return the component, importing it first when registered by path."""
        if isinstance(self.target, str):
            self.target = import_object(self.target)  # type: ignore[assignment]
        return self.target  # type: ignore[return-value]


class Registry(Generic[T]):
    """A named collection of components of one kind.

    Args:
        kind: What the registry holds, used in error messages ("model", "criterion").
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}
        self._renamed: dict[str, str] = {}

    def register(self, name: str, target: T | str | None = None, description: str = "") -> Callable[[T], T]:
        """Register ``target`` under ``name``; usable as a decorator when ``target`` is None.

        Args:
            name: Unique name.
            target: The component, or an import path loaded lazily.
            description: One line shown by ``automl-prune list``.

        Returns:
            A decorator that registers its argument (and returns it unchanged).
        """

        def decorator(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is already registered")
            doc = description or (getattr(obj, "__doc__", None) or "").strip().splitlines()[0:1]
            desc = doc if isinstance(doc, str) else (doc[0] if doc else "")
            self._entries[name] = Entry(name, obj, desc)
            return obj

        if target is not None:
            decorator(target)  # type: ignore[arg-type]
        return decorator

    def rename(self, old: str, where: str) -> None:
        """Say where a name that is no longer registered went, when someone asks for it.

        Args:
            old: The former name.
            where: What to use instead, as the rest of a sentence ("now 'static_skip'; ...").
        """
        self._renamed[old] = where

    def get(self, name: str) -> T:
        """Return the component registered as ``name``.

        Raises:
            UnknownNameError: With the valid names and the closest match.
        """
        if name not in self._entries:
            raise UnknownNameError(self.unknown_message(name))
        return self._entries[name].load()

    def unknown_message(self, name: str) -> str:
        """The error message for an unknown ``name``: valid names and the nearest one."""
        names = sorted(self._entries)
        if name in self._renamed:
            return f"{self.kind} '{name}' is {self._renamed[name]}. Valid {self.kind} names: {', '.join(names)}."
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        return f"unknown {self.kind} '{name}'. Valid {self.kind} names: {', '.join(names)}.{hint}"

    def describe(self, name: str) -> str:
        """The one-line description of ``name``."""
        return self._entries[name].description

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

"""The one way a config key is declared: a dataclass field with its help text and limits."""

from __future__ import annotations

from dataclasses import field
from typing import Any


def opt(default: Any, help: str, **limits: Any) -> Any:
    """A config field with its help text and limits.

    Limits: ``gt``, ``ge``, ``lt``, ``le`` (numbers, or each entry of a list), ``choices``
    (the value, or each entry of a list), ``count`` (a budget term: a fraction or a whole
    count), ``repeat`` (a list may repeat entries), ``empty`` (a list may be empty), ``key`` (the key's name when it is not a
    valid Python name, e.g. ``global``).
    """
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **limits})
    return field(default=default, metadata={"help": help, **limits})

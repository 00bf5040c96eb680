"""Torch's intra-op thread count, pinned for a block: the one helper every module uses."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from automl_prune.errors import InvalidValueError

__all__ = ["check_threads", "num_threads"]


def check_threads(threads: int | None, *, allow_none: bool) -> None:
    """Raise :class:`InvalidValueError` unless ``threads`` is an integer >= 1 (or None when allowed)."""
    if threads is None and allow_none:
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise InvalidValueError(f"threads must be an integer >= 1, got {threads!r}")


@contextlib.contextmanager
def num_threads(n: int | None) -> Iterator[int]:
    """Pin torch's intra-op thread count to ``n`` inside the block, then restore it.

    Args:
        n: Number of threads (>= 1), or ``None`` to leave the current setting alone.

    Yields:
        The thread count in effect inside the block.

    Raises:
        InvalidValueError: If ``n`` is not ``None`` and not an integer >= 1.
    """
    check_threads(n, allow_none=True)
    previous = torch.get_num_threads()
    if n is None or n == previous:
        yield previous
        return
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(previous)

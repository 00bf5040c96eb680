"""Progress of long stages: a bar in a terminal, plain lines at a steady interval anywhere else.

A bar redrawn with carriage returns is unreadable in a piped log (``| tee log``, CI, a cluster
job's output file), and a disabled bar leaves such a log silent for minutes. :class:`Progress`
draws a tqdm bar when standard error is a terminal; otherwise it logs one line every
``interval`` seconds (``AUTOML_PRUNE_PROGRESS_SECONDS``, default 15) through the
``automl_prune.progress`` logger: what is done out of the total, the rate, the time left and
the stage's own figures (the best score so far, the loss). The command line shows that logger
at every verbosity; a Python caller sees the lines once logging is configured at INFO.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_INTERVAL = 15.0
"""Seconds between two plain progress lines (``AUTOML_PRUNE_PROGRESS_SECONDS`` overrides)."""


def _interval() -> float:
    try:
        value = float(os.environ.get("AUTOML_PRUNE_PROGRESS_SECONDS", DEFAULT_INTERVAL))
    except ValueError:
        return DEFAULT_INTERVAL
    return value if value >= 0 else DEFAULT_INTERVAL


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    minutes, s = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {s:02d} s"
    hours, m = divmod(minutes, 60)
    return f"{hours} h {m:02d} min"


class Progress:
    """Progress of ``total`` units of work (see the module docstring).

    Args:
        total: Units expected (None when unknown: no percentage or time left).
        description: What is progressing (``search ddpg``, ``train resnet20``).
        unit: The unit (``eval``, ``step``, ``plan``).
        enabled: False: nothing is shown at all.
        leave: Keep the terminal bar on screen when done.
        terminal: Force the terminal bar (True) or plain lines (False); default: whether
            standard error is a terminal.
        initial: Units already done before this bar started (a resumed stage); they count
            towards the total, not towards the rate.
    """

    def __init__(
        self,
        total: int | None,
        description: str,
        unit: str = "it",
        *,
        enabled: bool = True,
        leave: bool = True,
        terminal: bool | None = None,
        initial: int = 0,
    ) -> None:
        self.total = total
        self.description = description
        self.unit = unit
        self.n = initial
        self._initial = initial
        self.postfix: dict[str, Any] = {}
        self.enabled = enabled
        self.started = time.monotonic()
        self._last_line = self.started
        self._lines = 0
        self._closed = False
        self._interval = _interval()
        if terminal is None:
            terminal = sys.stderr.isatty()
        self._bar = None
        if enabled and terminal:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=description, unit=unit, leave=leave, initial=initial)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        """``n`` more units done."""
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled and time.monotonic() - self._last_line >= self._interval:
            self._emit()

    def set_postfix(self, **figures: Any) -> None:
        """The stage's own figures shown beside the count (``best_acc="0.8123"``)."""
        self.postfix.update(figures)
        if self._bar is not None:
            self._bar.set_postfix(**self.postfix)

    def line(self) -> str:
        """The plain progress line as it stands."""
        elapsed = time.monotonic() - self.started
        rate = (self.n - self._initial) / elapsed if elapsed > 0 else math.nan
        parts = [f"{self.description}: {self.n}"]
        if self.total:
            parts[0] += f"/{self.total} {self.unit}s ({100.0 * self.n / self.total:.0f}%)"
        else:
            parts[0] += f" {self.unit}s"
        if math.isfinite(rate) and rate > 0:
            parts.append(f"{rate:.3g} {self.unit}s/s" if rate >= 1 else f"{1.0 / rate:.3g} s/{self.unit}")
            if self.total and self.n < self.total:
                parts.append(f"ETA {_duration((self.total - self.n) / rate)}")
        parts.append(f"elapsed {_duration(elapsed)}")
        parts += [f"{k} {v}" for k, v in self.postfix.items()]
        return ", ".join(parts)

    def _emit(self) -> None:
        self._last_line = time.monotonic()
        self._lines += 1
        logger.info("%s", self.line())

    def close(self) -> None:
        """End the bar; in plain mode, a last line when the stage took long enough to have shown one."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and (self._lines or time.monotonic() - self.started >= self._interval):
            self._emit()


def track(
    items: Iterable[T], description: str, unit: str = "it", *, total: int | None = None, **kw: Any
) -> Iterator[T]:
    """Iterate over ``items`` with a :class:`Progress` (``total`` defaults to ``len(items)``)."""
    if total is None:
        total = len(items) if hasattr(items, "__len__") else None  # type: ignore[arg-type]
    with Progress(total, description, unit, **kw) as bar:
        for item in items:
            yield item
            bar.update(1)

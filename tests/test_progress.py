"""Progress: plain lines at a steady interval when the output is not a terminal."""

from __future__ import annotations

import logging

import pytest

from automl_prune.progress import Progress, track


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def lines():
    """The progress logger's lines (it may not propagate: the CLI gives it a handler of its own)."""
    logger = logging.getLogger("automl_prune.progress")
    handler, level = _Lines(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler.lines
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_plain_lines_count_rate_eta_and_figures(monkeypatch: pytest.MonkeyPatch, lines: list[str]) -> None:
    monkeypatch.setenv("AUTOML_PRUNE_PROGRESS_SECONDS", "0")
    with Progress(4, "search ddpg", "eval", terminal=False) as bar:
        bar.update(1)
        bar.set_postfix(best_acc="0.8100")
        bar.update(1)
    assert lines[0].startswith("search ddpg: 1/4 evals (25%)") and "ETA" in lines[0]
    assert lines[1].startswith("search ddpg: 2/4 evals (50%)") and lines[1].endswith("best_acc 0.8100")
    assert len(lines) == 3  # and a last line on close


def test_lines_wait_for_the_interval_and_a_disabled_bar_is_silent(
    monkeypatch: pytest.MonkeyPatch, lines: list[str]
) -> None:
    monkeypatch.setenv("AUTOML_PRUNE_PROGRESS_SECONDS", "3600")
    assert list(track(range(50), "steps", "step", terminal=False)) == list(range(50))
    assert lines == []  # a quick stage says nothing
    monkeypatch.setenv("AUTOML_PRUNE_PROGRESS_SECONDS", "0")
    with Progress(3, "x", enabled=False, terminal=False) as bar:
        bar.update(3)
    assert lines == []

"""Progress: plain lines at a steady interval when the output is not a terminal."""

from __future__ import annotations

import logging

import pytest

from automl_prune.progress import Progress, track


def test_plain_lines_count_rate_eta_and_figures(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    monkeypatch.setenv("AUTOML_PRUNE_PROGRESS_SECONDS", "0")
    caplog.set_level(logging.INFO, logger="automl_prune.progress")
    with Progress(4, "search ddpg", "eval", terminal=False) as bar:
        bar.update(1)
        bar.set_postfix(best_acc="0.8100")
        bar.update(1)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("search ddpg: 1/4 evals (25%)") and "ETA" in lines[0]
    assert lines[1].startswith("search ddpg: 2/4 evals (50%)") and lines[1].endswith("best_acc 0.8100")
    assert len(lines) == 3  # and a last line on close


def test_lines_wait_for_the_interval_and_a_disabled_bar_is_silent(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    monkeypatch.setenv("AUTOML_PRUNE_PROGRESS_SECONDS", "3600")
    caplog.set_level(logging.INFO, logger="automl_prune.progress")
    assert list(track(range(50), "steps", "step", terminal=False)) == list(range(50))
    assert caplog.records == []  # a quick stage says nothing
    monkeypatch.setenv("AUTOML_PRUNE_PROGRESS_SECONDS", "0")
    with Progress(3, "x", enabled=False, terminal=False) as bar:
        bar.update(3)
    assert caplog.records == []

"""The report's budget verdict lines: noisy measurements and a machine that changed speed are said plainly."""

from __future__ import annotations

from automl_prune.run_report import _budget_lines


def _report(noisy: bool, then: float, now: float) -> dict:
    term = {
        "term": "speedup",
        "limit": 1.6,
        "limit_given": 1.6,
        "measured": 1.5,
        "met": False,
        "margin": 1.6 / 1.5 - 1,
        "runtime": "onnxruntime",
        "device": "cpu",
        "batch_size": 1,
        "noisy": noisy,
        "baseline_measured": now,
        "baseline_at_search": then,
    }
    return {"budget": {"terms": [term]}, "baseline": {}}


def test_a_quiet_steady_measurement_is_a_plain_verdict() -> None:
    (line,) = _budget_lines(_report(noisy=False, then=1.0, now=1.05))
    assert "**missed by 6.7%**" in line and "x1.50" in line and "onnxruntime, cpu, batch 1" in line
    assert "noisy" not in line


def test_noise_and_drift_are_flagged() -> None:
    line, note = _budget_lines(_report(noisy=True, then=1.0, now=1.4))
    assert "stayed noisy" in line and "automl-prune report --run DIR" in line
    assert "1.4 ms now against 1 ms" in note and "+40%" in note

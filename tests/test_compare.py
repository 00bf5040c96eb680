"""automl-prune compare: three strategies on 2 Ray workers, real (digits) data, every output checked."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import DIGITS_QUICK

from automl_prune.report import pareto_front

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_compare_three_strategies_on_two_ray_workers(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    args = [
        "compare",
        "--compare.strategies",
        "random,uniform,reinforce",
        "--compare.seeds",
        "0,1",
        "--parallel.workers",
        "2",
        *DIGITS_QUICK,
        "--search.evaluations",
        "5",
        "--out",
        str(out),
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "automl_prune.cli", *args], capture_output=True, text=True, env=os.environ.copy()
    )
    assert proc.returncode == 0, proc.stderr
    rows = {r["strategy"]: r for r in csv.DictReader((out / "comparison.csv").open())}
    assert set(rows) == {"random", "uniform", "reinforce"}
    for name, row in rows.items():
        assert int(row["seeds"]) == 2
        assert int(row["evaluations"]) == (1 if name == "uniform" else 5)
        assert 0.5 < float(row["best_mean"]) <= 1.0  # a trained model under a 50% FLOPs budget, not chance
        assert float(row["best_flops_ratio"]) <= 0.5 + 1e-9
        assert 1 <= float(row["evals_to_99"]) <= int(row["evaluations"])
    assert float(rows["random"]["best_mean"]) >= float(rows["uniform"]["best_mean"]) - 0.05
    markdown = (out / "comparison.md").read_text()
    assert all(name in markdown for name in rows) and "best_so_far.png" in markdown
    for plot in ("best_so_far.png", "accuracy_vs_flops.png"):
        data = (out / plot).read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000


def test_pareto_front() -> None:
    points = [(0.5, 0.8), (0.4, 0.7), (0.45, 0.9), (0.3, 0.6), (0.3, 0.5), (0.6, 0.85)]
    assert pareto_front(points) == [(0.3, 0.6), (0.4, 0.7), (0.45, 0.9)]

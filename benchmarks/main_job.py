"""Benchmark: wall time of the main job, `automl-prune search`, first run and with the baseline cached.

Runs the command exactly as a user does (a subprocess, a fresh cache directory, so the first
run trains the baseline) and prints the wall time of each run, the time of each stage (from
the stage lines the command prints) and the run's headline figures from ``report.json``.
Example::

    python benchmarks/main_job.py                              # the embedded default
    python benchmarks/main_job.py --config configs/smoke.yaml  # the smoke config
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import cpu_model, load_average


def run_once(args: list[str], out: Path, env: dict[str, str]) -> tuple[float, list[tuple[str, float]], list[str]]:
    """Run the command; return its wall time, (stage line, seconds until the next stage) and its output lines."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "automl_prune.cli", "search", *args, "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    stages: list[tuple[str, float]] = []
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if line.startswith("[") or line.startswith("      refining"):  # stages, and refinement within the search
            stages.append((line.strip(), time.perf_counter()))
    if proc.wait() != 0:
        raise SystemExit(f"automl-prune search {' '.join(args)} failed with exit {proc.returncode}")
    end = time.perf_counter()
    marks = [t for _, t in stages] + [end]
    return end - start, [(text, marks[i + 1] - marks[i]) for i, (text, _) in enumerate(stages)], lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None, help="a config file (default: the embedded default)")
    args = p.parse_args()
    extra = ["--config", args.config] if args.config else []
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "AUTOML_PRUNE_CACHE": str(Path(tmp) / "cache"), "PYTHONUNBUFFERED": "1"}
        print(f"machine: {cpu_model()}, {os.cpu_count()} cores; load average before: {load_average()}")
        print(f"command: automl-prune search {' '.join(extra)}".rstrip())
        for label, name in (("first run (baseline trained)", "first"), ("baseline cached", "cached")):
            out = Path(tmp) / name
            wall, stages, lines = run_once(extra, out, env)
            print(f"\n{label}: {wall:.1f} s")
            for text, seconds in stages:
                print(f"  {seconds:7.1f} s  {text}")
        report = json.loads((Path(tmp) / "cached" / "report.json").read_text())
        base, new = report["baseline"], report["pruned"]
        print(
            f"\ntest accuracy {base['test_accuracy']:.4f} -> {new['test_accuracy']:.4f}, "
            f"FLOPs x{base['flops'] / new['flops']:.2f} smaller, "
            + ", ".join(f"speed-up x{v:.2f} (b={b})" for b, v in report["speedup"].items())
            + f"; budget met: {report['budget_met']}"
        )
        print(f"load average after: {load_average()}")
        print("\noutput of the run with the baseline cached (runs/search stands for its directory):\n")
        print("\n".join(line.replace(str(Path(tmp) / "cached"), "runs/search") for line in lines))


if __name__ == "__main__":
    main()

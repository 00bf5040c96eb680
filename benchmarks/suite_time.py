"""Benchmark: where the test suite's time goes, per file, per test and per README block.

Runs the README's test command (``bash scripts/test.sh``, which sets the project up first) with
pytest's ``--durations=0``, then sums setup, call and teardown time per test file, lists the
slowest tests, and times each block of the README test (the test records them in the JSON
file named by ``AUTOML_PRUNE_README_TIMES``). Run it on an otherwise idle machine: the suite
measures latency in places, and its length is what is measured. Example::

    python benchmarks/suite_time.py --out suite_time.md
    python benchmarks/suite_time.py -- tests/test_config.py    # a subset (arguments after -- go to pytest)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from _common import load_average, run_header

from automl_prune.io import write_text

ROOT = Path(__file__).resolve().parents[1]
DURATION = re.compile(r"^\s*([0-9.]+)s (setup|call|teardown)\s+(\S.*?)\s*$")
SUMMARY = re.compile(r"^=+ (.*\bin [0-9.]+s.*) =+$")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags (what follows ``--`` goes to pytest)."""
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--top", type=int, default=15, help="slowest tests listed")
    p.add_argument("--out", type=Path, default=None, help="also write the tables to this markdown file")
    p.add_argument("pytest_args", nargs="*", help="arguments of pytest (after --)")
    return p.parse_args(argv)


def parse_durations(output: str) -> dict[str, dict[str, float]]:
    """``{test id: {phase: seconds}}`` from pytest's ``--durations=0`` lines."""
    tests: dict[str, dict[str, float]] = defaultdict(dict)
    for line in output.splitlines():
        m = DURATION.match(line)
        if m:
            tests[m.group(3)][m.group(2)] = float(m.group(1))
    return dict(tests)


def per_file(tests: dict[str, dict[str, float]]) -> list[tuple[str, int, float]]:
    """(file, tests, seconds) per test file, slowest first."""
    files: dict[str, list[float]] = defaultdict(list)
    for test_id, phases in tests.items():
        files[test_id.split("::")[0]].append(sum(phases.values()))
    return sorted(((f, len(t), sum(t)) for f, t in files.items()), key=lambda row: -row[2])


def _cell(text: str) -> str:
    """``text`` safe inside a markdown table cell."""
    return text.replace("|", "\\|")


def report(output: str, readme_blocks: list[dict], wall: float, top: int) -> str:
    """The markdown tables of one run."""
    tests = parse_durations(output)
    summary = next((m.group(1) for line in output.splitlines() if (m := SUMMARY.match(line))), "no pytest summary")
    counted = sum(sum(p.values()) for p in tests.values())
    lines = [
        f"pytest: {summary}; wall time of the command (setup included) {wall:.0f} s; "
        f"time inside tests (setup, call, teardown) {counted:.0f} s.",
        "",
        "| test file | tests | seconds | share |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {f} | {n} | {s:.0f} | {s / counted:.0%} |" for f, n, s in per_file(tests)] if counted else []
    slowest = sorted(tests.items(), key=lambda item: -sum(item[1].values()))[:top]
    lines += ["", "| slowest tests | setup s | call s |", "|---|---:|---:|"]
    lines += [f"| {_cell(t)} | {p.get('setup', 0):.1f} | {p.get('call', 0):.1f} |" for t, p in slowest]
    if readme_blocks:
        lines += ["", "| README block | first line | seconds |", "|---:|---|---:|"]
        for block in readme_blocks:
            first = block["code"].strip().splitlines()[0]
            lines.append(f"| {block['number']} | `{_cell(first[:90])}` | {block['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the suite and print where its time went."""
    args = parse_args(argv)
    started, load_start = time.perf_counter(), load_average()
    with tempfile.TemporaryDirectory() as tmp:
        times = Path(tmp) / "readme_blocks.json"
        env = {**os.environ, "CI": "true", "AUTOML_PRUNE_README_TIMES": str(times)}
        command = [
            "bash",
            "scripts/test.sh",
            "-p",
            "no:cacheprovider",
            "--durations=0",
            "--durations-min=0",
            *args.pytest_args,
        ]
        proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        blocks = json.loads(times.read_text()) if times.is_file() else []
    wall = time.perf_counter() - started
    text = (
        f"{run_header('suite_time.py', argv, 2, load_start, started)}\n\n{report(proc.stdout, blocks, wall, args.top)}"
    )
    print(text)
    if args.out is not None:
        write_text(args.out, text + "\n")
    if proc.returncode != 0:
        print(f"the suite failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}", file=sys.stderr)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())

"""The README's commands, run exactly as written, in order, in a fresh working directory."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from automl_prune.io import write_json

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
FENCE = re.compile(r"^```(bash|python)\n(.*?)^```", re.S | re.M)


def runnable_blocks() -> list[tuple[str, str]]:
    """(language, code) of every bash and python block to run here.

    Left out: the test command itself (this test runs inside it) and the manual install
    (``pip install ... -e``), which ``scripts/setup.sh`` runs on every CI run (checked below).
    """
    return [
        (lang, code)
        for lang, code in FENCE.findall(README)
        if "scripts/test.sh" not in code and not code.startswith("pip install")
    ]


def test_the_manual_install_is_what_setup_runs() -> None:
    (manual,) = [code for _, code in FENCE.findall(README) if code.startswith("pip install")]
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert manual.strip() == 'pip install --constraint constraints/cpu.txt -e ".[dev]"'
    assert "CONSTRAINTS=${AUTOML_PRUNE_CONSTRAINTS:-constraints/cpu.txt}" in setup
    assert '--constraint "$CONSTRAINTS" -e ".[dev]"' in setup


def test_ci_runs_exactly_the_readme_test_command() -> None:
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == "bash scripts/test.sh"
    assert "```bash\nbash scripts/test.sh\n```" in README


def test_readme_has_the_sections_a_user_needs() -> None:
    for heading in (
        "## Quick start",
        "## Target a deployment budget",
        "## Launch a (distributed) search",
        "## Compare strategies",
        "## Configs",
        "## Each stage alone",
    ):
        assert heading in README
    assert len(runnable_blocks()) >= 6


@pytest.mark.slow
def test_readme_commands_run_as_written(tmp_path: Path) -> None:
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    (tmp_path / "scripts").symlink_to(ROOT / "scripts")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    times = os.environ.get("AUTOML_PRUNE_README_TIMES")  # benchmarks/suite_time.py: each block's wall time
    timed: list[dict] = []
    for number, (lang, code) in enumerate(runnable_blocks(), 1):
        command = ["bash", "-euo", "pipefail", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
        start = time.perf_counter()
        proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        timed.append({"number": number, "code": code, "seconds": time.perf_counter() - start})
        if times:
            write_json(Path(times), timed)
        assert proc.returncode == 0, (
            f"README block {number} ({lang}) failed with exit {proc.returncode}:\n{code}\n"
            f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
        )
    # what the README says the main job leaves behind
    for name in (
        "report.md",
        "report.json",
        "model.pt",
        "model.ts",
        "model.onnx",
        "keep_ratios.png",
        "search_curve.png",
    ):
        assert (tmp_path / "runs" / "search" / name).is_file(), name

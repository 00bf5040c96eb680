"""Running the ``automl-prune`` command as a user does (a subprocess, real exit codes), shared by the tests."""

from __future__ import annotations

import os
import subprocess
import sys

DIGITS_QUICK = (
    "--data.dataset",
    "digits",
    "--train.epochs",
    "8",
    "--train.batch_size",
    "32",
    "--search.eval_size",
    "300",
)
"""Flags for a search on the small real digits set with a quickly trained baseline."""


def command(*args: str) -> list[str]:
    """The argv that runs ``automl-prune ARGS`` with this interpreter."""
    return [sys.executable, "-m", "automl_prune.cli", *args]


def cli(*args: str, check: bool = True, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``automl-prune ARGS``; with ``check``, fail the test (showing both streams) on a non-zero exit."""
    proc = subprocess.run(command(*args), capture_output=True, text=True, env=os.environ.copy(), timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc

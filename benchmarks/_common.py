"""Helpers shared by the benchmark scripts (run as ``python benchmarks/NAME.py``)."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence

from automl_prune.cli import int_at_least
from automl_prune.data import DataSplits, load_dataset
from automl_prune.evaluator import EvaluatorConfig
from automl_prune.measure.latency import cpu_model_name as cpu_model

__all__ = [
    "DEFAULT_EPOCHS",
    "csv_ints",
    "csv_list",
    "run_header",
    "int_at_least",
    "setup_logging",
    "cpu_model",
    "epochs_per_model",
    "evaluator_config",
    "load_average",
    "load_splits",
]

DEFAULT_EPOCHS: dict[str, float] = {"fashion_cnn": 3.0, "resnet20": 2.0}
"""Baseline epochs per model used by the search and evaluator benchmarks."""


def csv_ints(value: str) -> list[int]:
    """``"0,1, 2"`` -> ``[0, 1, 2]`` (an argparse type)."""
    return [int(v) for v in csv_list(value)]


def run_header(script: str, argv: Sequence[str] | None, threads: int, load_start: str, started: float) -> str:
    """The machine, threads, date, load and wall time of a run, and the command that reproduces it."""
    import datetime as dt
    import shlex
    import sys
    import time

    import torch

    return (
        f"Machine: {cpu_model()}, {os.cpu_count()} logical cores; torch {torch.__version__}, {threads} thread(s); "
        f"{dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; load average {load_start} at start, {load_average()} at "
        f"end; {time.perf_counter() - started:.0f} s.\n\n"
        f"Command: `python benchmarks/{script} {shlex.join(sys.argv[1:] if argv is None else argv)}`"
    )


def csv_list(value: str) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``."""
    return [v.strip() for v in value.split(",") if v.strip()]


def epochs_per_model(value: str) -> dict[str, float]:
    """``fashion_cnn=3,resnet20=2`` -> {name: epochs}."""
    out: dict[str, float] = {}
    for item in csv_list(value):
        name, sep, epochs = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected MODEL=EPOCHS, got {item!r}")
        out[name.strip()] = float(epochs)
    return out


def evaluator_config(args: argparse.Namespace, recalibrate: bool = True) -> EvaluatorConfig:
    """The evaluator settings of a benchmark from its ``--criterion``, ``--eval-size``, ... flags."""
    return EvaluatorConfig(
        criterion=args.criterion,
        eval_size=args.eval_size,
        bn_recalibration=recalibrate,
        recalibration_batches=args.recal_batches,
        batch_size=args.batch_size,
        seed=args.seed,
    )


def load_average() -> str:
    """The 1/5/15-minute load averages, or "n/a"."""
    try:
        return "/".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def load_splits(args: argparse.Namespace) -> DataSplits:
    """Fashion-MNIST with a benchmark's ``--train-size``/``--val-size``/``--test-size`` and ``--seed``."""
    full = load_dataset("fashion-mnist", args.data_dir, val_size=args.val_size, seed=args.seed)
    return DataSplits(
        name=f"fashion-mnist-{args.train_size // 1000}k",
        train=full.train.subset(args.train_size, seed=args.seed),
        search_val=full.search_val,
        test=full.test.subset(args.test_size, seed=args.seed),
        num_classes=full.num_classes,
        in_channels=full.in_channels,
        image_size=full.image_size,
    )


def setup_logging(verbose: bool, quiet: tuple[str, ...] = ()) -> None:
    """INFO logging (DEBUG when ``verbose``) on stderr; the loggers in ``quiet`` only warn."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for name in quiet:
        logging.getLogger(name).setLevel(logging.WARNING)

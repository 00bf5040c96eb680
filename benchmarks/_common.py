"""Helpers shared by the benchmark scripts (run as ``python benchmarks/NAME.py``)."""

from __future__ import annotations

import argparse
import os

from automl_prune.data import DataSplits, load_dataset
from automl_prune.measure.latency import cpu_model_name as cpu_model

__all__ = ["cpu_model", "load_average", "load_splits"]


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

"""Benchmark of the importance criteria on trained Fashion-MNIST models.

For every model (trained once with :func:`automl_prune.baseline.train_baseline` and cached)
and every FLOPs reduction, each criterion prunes the model with the same uniform plan; the
table reports test accuracy right after pruning, after a short fine-tune (the same budget
for every criterion), the measured FLOPs ratio and the wall time of
:func:`automl_prune.pruning.apply` (statistics collection, scoring, surgery and, for
thinet/lasso, the refit of the next layers).

Example (the defaults take a few minutes on a laptop CPU; the first run also trains and
caches the two baselines)::

    python benchmarks/criteria.py
    python benchmarks/criteria.py --models fashion_cnn --criteria l1,fpgm,lasso --reductions 0.5
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from _common import csv_list, load_splits, setup_logging

from automl_prune.baseline import train_baseline
from automl_prune.criteria import CRITERIA, get_criterion
from automl_prune.graph import LayerGraph, count_cost
from automl_prune.measure.accuracy import evaluate_accuracy
from automl_prune.models import ModelSpec
from automl_prune.pruning import apply
from automl_prune.training import TrainConfig, train

logger = logging.getLogger("benchmarks.criteria")


def _floats(value: str) -> list[float]:
    return [float(v) for v in csv_list(value)]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (all sizes have defaults that finish in a few minutes)."""
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--models", type=csv_list, default=["fashion_cnn", "resnet20"], help="comma-separated model names")
    p.add_argument(
        "--criteria", type=csv_list, default=CRITERIA.names(), help="comma-separated criteria (default: all)"
    )
    p.add_argument("--reductions", type=_floats, default=[0.3, 0.5], help="FLOPs reductions (0.3 = 70%% of FLOPs kept)")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST directory (default: the dataset's default)")
    p.add_argument("--train-size", type=int, default=12000, help="training images (subset of the train split)")
    p.add_argument("--val-size", type=int, default=2000, help="search-val images (fine-tune model selection)")
    p.add_argument("--test-size", type=int, default=2000, help="test images for the accuracies")
    p.add_argument("--train-epochs", type=float, default=3.0, help="baseline training epochs (cached by config)")
    p.add_argument("--train-lr", type=float, default=0.05, help="baseline learning rate")
    p.add_argument(
        "--finetune-epochs", type=float, default=0.1, help="fine-tune epochs after pruning (fractions allowed)"
    )
    p.add_argument("--finetune-lr", type=float, default=0.01, help="fine-tune learning rate")
    p.add_argument("--batches", type=int, default=8, help="search-val batches given to data-driven criteria")
    p.add_argument("--batch-size", type=int, default=64, help="size of those batches")
    p.add_argument("--random-seeds", type=int, default=3, help="seeds averaged for the random control")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=0, help="seed of data splits, training and fine-tuning")
    p.add_argument("--output", type=Path, default=None, help="also write the markdown table here")
    p.add_argument("-v", "--verbose", action="store_true", help="log criterion details")
    args = p.parse_args(argv)
    unknown = [c for c in args.criteria if c not in CRITERIA]
    if unknown:
        p.error(CRITERIA.unknown_message(unknown[0]))
    if any(not 0.0 < r < 1.0 for r in args.reductions):
        p.error("reductions must be in (0, 1)")
    return args


def run(args: argparse.Namespace) -> list[dict[str, object]]:
    """Prune, evaluate and fine-tune every (model, reduction, criterion); return table rows."""
    torch.set_num_threads(args.threads)
    splits = load_splits(args)
    batches = list(splits.search_val.batches(args.batch_size))[: args.batches]
    finetune = TrainConfig(epochs=args.finetune_epochs, lr=args.finetune_lr, seed=args.seed)
    rows: list[dict[str, object]] = []
    for model_name in args.models:
        spec = ModelSpec(model_name, splits.in_channels, splits.num_classes)
        started = time.perf_counter()
        base = train_baseline(spec, splits, TrainConfig(epochs=args.train_epochs, lr=args.train_lr, seed=args.seed))
        dense_acc = evaluate_accuracy(base.model, splits.test)
        logger.info(
            "%s: dense test accuracy %.4f (%s, %.0f s)",
            model_name,
            dense_acc,
            "cached" if base.cached else "trained",
            time.perf_counter() - started,
        )
        example = torch.zeros(splits.input_shape(1))
        graph = LayerGraph(base.model, example)
        rows.append(
            {
                "model": model_name,
                "flops": "100%",
                "criterion": "dense",
                "pruned": dense_acc,
                "finetuned": float("nan"),
                "ratio": 1.0,
                "seconds": 0.0,
            }
        )
        for reduction in args.reductions:
            plan = graph.uniform_plan(1.0 - reduction)
            for name in args.criteria:
                seeds = range(args.random_seeds) if name == "random" else [0]
                results = []
                for seed in seeds:
                    crit = get_criterion(name, seed=seed) if name == "random" else get_criterion(name)
                    t0 = time.perf_counter()
                    pruned = apply(base.model, plan, crit, graph=graph, data=batches)
                    seconds = time.perf_counter() - t0
                    ratio = count_cost(pruned, example).flops / graph.flops
                    acc = evaluate_accuracy(pruned, splits.test)
                    tuned = train(copy.deepcopy(pruned), splits, finetune, description=f"finetune {name}").model
                    results.append((acc, evaluate_accuracy(tuned, splits.test), seconds, ratio))
                n = len(results)
                row = {
                    "model": model_name,
                    "flops": f"{1.0 - reduction:.0%}",
                    "criterion": name if n == 1 else f"{name} (x{n})",
                    "pruned": sum(r[0] for r in results) / n,
                    "finetuned": sum(r[1] for r in results) / n,
                    "ratio": sum(r[3] for r in results) / n,
                    "seconds": sum(r[2] for r in results) / n,
                }
                logger.info("%s", row)
                rows.append(row)
    return rows


def markdown(rows: list[dict[str, object]], args: argparse.Namespace) -> str:
    """The rows as a markdown table with a header line of the settings."""
    lines = [
        f"Fashion-MNIST, {args.train_size} train / {args.test_size} test images; baselines {args.train_epochs:g} epochs; "
        f"data-driven criteria on {args.batches} x {args.batch_size} search-val images; fine-tune "
        f"{args.finetune_epochs:g} epochs at lr {args.finetune_lr:g}; {args.threads} thread(s).",
        "",
        "| model | FLOPs kept | criterion | acc. after pruning | acc. after fine-tune | FLOPs ratio | prune time (s) |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        tuned = r["finetuned"]
        tuned_s = "" if isinstance(tuned, float) and tuned != tuned else f"{tuned:.4f}"
        lines.append(
            f"| {r['model']} | {r['flops']} | {r['criterion']} | {r['pruned']:.4f} | {tuned_s} | "
            f"{r['ratio']:.3f} | {r['seconds']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the markdown table."""
    args = parse_args(argv)
    setup_logging(args.verbose, ("automl_prune.baseline", "automl_prune.training"))
    table = markdown(run(args), args)
    print(table)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

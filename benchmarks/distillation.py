"""Benchmark: does distillation from the dense model help a pruned model's fine-tune at equal steps?

For every model (trained once on Fashion-MNIST and cached) and FLOPs budget, the uniform plan
is cut with l1 and its BatchNorm statistics re-estimated (the evaluator's model, as the main job
fine-tunes it), then fine-tuned for the same number of steps (same lr schedule and batch order)
with labels only and with distillation (weight ``w``, temperature ``T``), for several fine-tune
seeds; test accuracy on the test split. Prints a markdown table with mean +- std over seeds and
the paired difference (distilled - labels only) per seed. Example::

    python benchmarks/distillation.py --models fashion_cnn --budgets 0.5,0.25 --steps 300 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import os
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from _common import cpu_model, csv_ints, csv_list, epochs_per_model, load_average, load_splits, setup_logging

from automl_prune.baseline import train_baseline
from automl_prune.evaluator import Evaluator, EvaluatorConfig
from automl_prune.io import write_text
from automl_prune.measure.accuracy import evaluate_accuracy
from automl_prune.models import ModelSpec
from automl_prune.training import TrainConfig, train
from automl_prune.types import Budget


def _floats(text: str) -> list[float]:
    return [float(v) for v in csv_list(text)]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=csv_list, default=["fashion_cnn"], help="comma-separated model names")
    p.add_argument("--epochs", type=epochs_per_model, default={"fashion_cnn": 3.0, "resnet20": 6.0})
    p.add_argument("--budgets", type=_floats, default=[0.5, 0.25], help="FLOPs fractions of the uniform plans")
    p.add_argument("--steps", type=int, default=300, help="fine-tune steps (batch 128), equal for both arms")
    p.add_argument("--weight", type=float, default=0.5, help="distillation weight w")
    p.add_argument("--temperature", type=float, default=4.0, help="distillation temperature T")
    p.add_argument("--lr", type=float, default=0.01, help="fine-tune peak learning rate (cosine)")
    p.add_argument("--seeds", type=csv_ints, default=[0, 1, 2], help="fine-tune seeds (batch order)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--train-size", type=int, default=55000)
    p.add_argument("--val-size", type=int, default=5000)
    p.add_argument("--test-size", type=int, default=10000)
    p.add_argument("--seed", type=int, default=0, help="seed of the splits and the baselines")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="also write the markdown here (atomically)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(False, quiet=("automl_prune.training", "automl_prune.baseline", "torch_pruning"))
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    load_before = load_average()
    splits = load_splits(args)
    rows = []
    for name in args.models:
        base = train_baseline(
            ModelSpec(name, splits.in_channels, splits.num_classes),
            splits,
            TrainConfig(epochs=args.epochs.get(name, 3.0), lr=0.1, seed=args.seed),
        )
        dense = base.model.eval()
        dense_acc = evaluate_accuracy(dense, splits.test)
        for budget in args.budgets:
            evaluator = Evaluator(dense, splits, Budget(flops=budget), EvaluatorConfig(round_to=1, seed=args.seed))
            plan = evaluator.graph.uniform_plan(budget)
            start = evaluator.build(plan)
            pruned_acc = evaluate_accuracy(start, splits.test)
            epochs = args.steps / (len(splits.train) // 128)
            results: dict[float, list[float]] = {0.0: [], args.weight: []}
            seconds: dict[float, float] = {0.0: 0.0, args.weight: 0.0}
            for seed in args.seeds:
                for weight in results:
                    config = TrainConfig(
                        epochs=epochs,
                        lr=args.lr,
                        seed=seed,
                        eval_every_epoch=False,
                        distill_weight=weight,
                        distill_temperature=args.temperature,
                    )
                    t0 = time.perf_counter()
                    model = train(copy.deepcopy(start), splits, config, teacher=dense).model
                    seconds[weight] += time.perf_counter() - t0
                    results[weight].append(evaluate_accuracy(model, splits.test))
            plain, kd = results[0.0], results[args.weight]
            diffs = [b - a for a, b in zip(plain, kd)]
            rows.append(
                f"| {name} | {budget:.0%} | {dense_acc:.4f} | {pruned_acc:.4f} | "
                f"{statistics.mean(plain):.4f} +- {statistics.pstdev(plain):.4f} | "
                f"{statistics.mean(kd):.4f} +- {statistics.pstdev(kd):.4f} | "
                f"{statistics.mean(diffs) * 100:+.2f} +- {statistics.pstdev(diffs) * 100:.2f} "
                f"({sum(d > 0 for d in diffs)}/{len(diffs)} seeds better) | "
                f"{seconds[0.0] / len(args.seeds):.0f} / {seconds[args.weight] / len(args.seeds):.0f} |"
            )
            print(rows[-1], flush=True)
    header = [
        f"Machine: {cpu_model()}, {os.cpu_count()} logical cores; torch {torch.__version__}, {args.threads} thread(s); "
        f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; load average {load_before} at start, "
        f"{load_average()} at end; {time.perf_counter() - started:.0f} s.",
        "",
        f"Command: `python benchmarks/distillation.py {shlex.join(argv if argv is not None else sys.argv[1:])}`",
        "",
        f"Fashion-MNIST ({len(splits.train)} train / {len(splits.search_val)} search-val / {len(splits.test)} test); "
        f"uniform l1 plans with BN re-estimated; {args.steps} fine-tune steps (batch 128, cosine from lr {args.lr:g}) "
        f"for both arms; distillation w={args.weight:g}, T={args.temperature:g}; seeds {args.seeds}.",
        "",
        "| model | FLOPs | dense test | pruned, no fine-tune | labels only | distilled | distilled - labels (pp) "
        "| s per fine-tune (labels / distilled) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    text = "\n".join(header + rows) + "\n"
    print(text)
    if args.out is not None:
        write_text(args.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

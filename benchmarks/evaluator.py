"""Benchmark of the plan evaluator: where an evaluation's time goes, and how well its score ranks plans.

Two parts, both on baselines trained on Fashion-MNIST (trained once with
:func:`automl_prune.baseline.train_baseline` and cached):

1. **Cost breakdown** of :meth:`Evaluator.evaluate` on fresh (uncached) random feasible
   plans: time in :func:`automl_prune.pruning.apply` (deep copy, criterion, dependency-graph
   rebuild and surgery; the dependency-graph rebuild is also shown on its own), the BN
   recalibration forward passes, the scoring forward passes, and everything else (cost
   model, cache key, reward). "Overhead besides forward passes" is ``apply + else`` as a
   share of the whole evaluation. The time of a cache hit is measured on the same plans.
   The components are timed by wrapping the functions the evaluator calls, so the measured
   path is exactly :meth:`Evaluator.evaluate`.
2. **Rank correlation** of the evaluator's score with accuracy after fine-tuning: N random
   feasible plans under a FLOPs budget are scored raw (``bn_recalibration=False``, AMC's
   protocol) and with BN recalibration, then every pruned model (the recalibrated one, so
   stale BN statistics do not leak into the fine-tuned result) is fine-tuned with the same
   short budget and its test accuracy measured. Prints Spearman's rho of each score with
   the fine-tuned accuracy, and the uniform L1 plan's raw vs recalibrated score.

Example (defaults: about 5-10 minutes on one CPU thread; the first run also trains the baselines)::

    python benchmarks/evaluator.py
    python benchmarks/evaluator.py --parts breakdown --breakdown-evals 30
    python benchmarks/evaluator.py --parts correlation --models fashion_cnn --plans 10 --out corr.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import logging
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch_pruning as tp
from _common import (
    DEFAULT_EPOCHS,
    cpu_model,
    csv_list,
    epochs_per_model,
    evaluator_config,
    load_average,
    load_splits,
    setup_logging,
)

import automl_prune.evaluator as evaluator_module
from automl_prune.baseline import train_baseline
from automl_prune.data import DataSplits
from automl_prune.evaluator import Evaluator
from automl_prune.io import write_text
from automl_prune.measure.accuracy import evaluate_accuracy
from automl_prune.models import ModelSpec, build_model
from automl_prune.search_spaces import SearchSpace
from automl_prune.training import TrainConfig, train
from automl_prune.types import Budget, Plan

logger = logging.getLogger("benchmarks.evaluator")

# --------------------------------------------------------------------------- arguments


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--parts",
        type=csv_list,
        default=["breakdown", "correlation"],
        help="which parts to run: breakdown, correlation",
    )
    p.add_argument("--breakdown-models", type=csv_list, default=["fashion_cnn"], help="models for the cost breakdown")
    p.add_argument("--breakdown-evals", type=int, default=20, help="fresh evaluations timed per model")
    p.add_argument(
        "--breakdown-untrained",
        action="store_true",
        help="time the breakdown on randomly initialised models (same cost, no baseline training needed)",
    )
    p.add_argument(
        "--models", type=csv_list, default=["fashion_cnn", "resnet20"], help="models for the rank correlation"
    )
    p.add_argument("--plans", type=int, default=30, help="random feasible plans per model for the rank correlation")
    p.add_argument("--flops", type=float, default=0.5, help="FLOPs budget (fraction of the dense model's)")
    p.add_argument("--eval-size", type=int, default=2000, help="search-val images scored per plan")
    p.add_argument("--recal-batches", type=int, default=8, help="BN recalibration batches")
    p.add_argument("--batch-size", type=int, default=128, help="evaluator batch size (recalibration and scoring)")
    p.add_argument("--criterion", default="l1", help="importance criterion of the evaluator")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST directory (default: the dataset's default)")
    p.add_argument("--train-size", type=int, default=12000, help="training images (subset of the train split)")
    p.add_argument("--val-size", type=int, default=2000, help="search-val images held out of the training data")
    p.add_argument("--test-size", type=int, default=2000, help="test images for fine-tuned accuracies")
    p.add_argument(
        "--epochs", type=epochs_per_model, default=DEFAULT_EPOCHS, help="baseline epochs per model, MODEL=EPOCHS,..."
    )
    p.add_argument("--train-lr", type=float, default=0.05, help="baseline learning rate")
    p.add_argument(
        "--finetune-epochs", type=float, default=0.2, help="fine-tune epochs per pruned model (fractions allowed)"
    )
    p.add_argument("--finetune-lr", type=float, default=0.01, help="fine-tune learning rate")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=0, help="seed of data splits, training, plans and fine-tuning")
    p.add_argument("--out", type=Path, default=None, help="also write the markdown report here (atomically)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = p.parse_args(argv)
    unknown = set(args.parts) - {"breakdown", "correlation"}
    if unknown:
        p.error(f"unknown parts {sorted(unknown)}; use breakdown, correlation")
    if not 0.0 < args.flops < 1.0:
        p.error("--flops must be in (0, 1)")
    if min(args.plans, args.breakdown_evals, args.eval_size, args.recal_batches, args.threads) < 1:
        p.error("sizes and --threads must be >= 1")
    return args


# --------------------------------------------------------------------------- shared helpers


def baseline(name: str, splits: DataSplits, args: argparse.Namespace) -> torch.nn.Module:
    """The cached (or freshly trained) dense baseline of ``name``."""
    epochs = args.epochs.get(name, 3)
    started = time.perf_counter()
    base = train_baseline(
        ModelSpec(name, splits.in_channels, splits.num_classes),
        splits,
        TrainConfig(epochs=epochs, lr=args.train_lr, seed=args.seed),
    )
    logger.info(
        "%s: baseline %s (%.0f s), %g epochs",
        name,
        "cached" if base.cached else "trained",
        time.perf_counter() - started,
        epochs,
    )
    return base.model


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN when either side is constant."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")

    def ranks(v: np.ndarray) -> np.ndarray:
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=float)
        for value in np.unique(v):  # average ranks of ties
            tied = v == value
            r[tied] = r[tied].mean()
        return r

    return float(np.corrcoef(ranks(x), ranks(y))[0, 1])


# --------------------------------------------------------------------------- part 1: cost breakdown


class _Timers:
    """Accumulates wall time of wrapped functions by label."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*a: Any, **kw: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - start

        return timed

    def reset(self) -> None:
        self.seconds.clear()


def breakdown(name: str, splits: DataSplits, args: argparse.Namespace) -> dict[str, Any]:
    """Time the components of ``args.breakdown_evals`` fresh evaluations and of cache hits."""
    if args.breakdown_untrained:  # the cost of an evaluation does not depend on the weights
        torch.manual_seed(args.seed)
        model = build_model(ModelSpec(name, splits.in_channels, splits.num_classes))
    else:
        model = baseline(name, splits, args)
    ev = Evaluator(model, splits, Budget(flops=args.flops), evaluator_config(args))
    space = SearchSpace(ev)
    rng = np.random.default_rng(args.seed)
    plans: list[Plan] = []
    keys: set[tuple] = set()
    while len(plans) < args.breakdown_evals + 1:  # distinct structures, so every evaluation is a cache miss
        plan = space.sample(rng)
        if ev.structure_key(plan) not in keys:
            keys.add(ev.structure_key(plan))
            plans.append(plan)
    ev.evaluate(plans[0])  # warm-up (first-call allocations), not timed
    timers = _Timers()
    originals = (
        evaluator_module.apply,
        evaluator_module.recalibrate_batchnorm,
        evaluator_module.evaluate_accuracy,
        tp.DependencyGraph.build_dependency,
    )
    evaluator_module.apply = timers.wrap("apply", originals[0])
    evaluator_module.recalibrate_batchnorm = timers.wrap("recalibration", originals[1])
    evaluator_module.evaluate_accuracy = timers.wrap("scoring", originals[2])
    tp.DependencyGraph.build_dependency = timers.wrap("dependency graph", originals[3])
    totals = []
    try:
        for plan in plans[1:]:
            start = time.perf_counter()
            evaluation = ev.evaluate(plan)
            totals.append(time.perf_counter() - start)
            if evaluation.cached or not evaluation.feasible:
                logger.warning("unexpected evaluation: %s", evaluation)
    finally:
        (
            evaluator_module.apply,
            evaluator_module.recalibrate_batchnorm,
            evaluator_module.evaluate_accuracy,
            tp.DependencyGraph.build_dependency,
        ) = originals
    hits = []
    for plan in plans[1:]:
        start = time.perf_counter()
        evaluation = ev.evaluate(plan)
        hits.append(time.perf_counter() - start)
        assert evaluation.cached
    n = len(totals)
    total = sum(totals)
    parts = {k: v for k, v in timers.seconds.items()}
    other = total - parts.get("apply", 0.0) - parts.get("recalibration", 0.0) - parts.get("scoring", 0.0)
    return {
        "model": name,
        "n": n,
        "total_ms": 1e3 * total / n,
        "apply_ms": 1e3 * parts.get("apply", 0.0) / n,
        "graph_ms": 1e3 * parts.get("dependency graph", 0.0) / n,
        "recal_ms": 1e3 * parts.get("recalibration", 0.0) / n,
        "score_ms": 1e3 * parts.get("scoring", 0.0) / n,
        "other_ms": 1e3 * other / n,
        "overhead": (parts.get("apply", 0.0) + other) / total,
        "hit_us": 1e6 * statistics.median(hits),
        "median_ms": 1e3 * statistics.median(totals),
        "groups": len(ev.graph.groups),
    }


def breakdown_markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """Part 1 as markdown."""
    lines = [
        f"### Cost of one evaluation (FLOPs <= {args.flops:.0%}, eval_size {args.eval_size}, "
        f"{args.recal_batches} recalibration batches of {args.batch_size}, criterion {args.criterion}, {args.threads} thread(s)"
        + (", untrained weights" if args.breakdown_untrained else "")
        + ")",
        "",
        "Mean over fresh (uncached) random feasible plans; ms per evaluation and share of it.",
        "",
        "| model | groups | evals | total (ms) | median (ms) | apply() | of which dep.-graph rebuild | BN recalibration fwd | scoring fwd | everything else | overhead besides forward passes | cache hit (us) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        t = r["total_ms"]

        def cell(ms: float, total: float = t) -> str:
            return f"{ms:.1f} ({ms / total:.0%})"

        lines.append(
            f"| {r['model']} | {r['groups']} | {r['n']} | {t:.1f} | {r['median_ms']:.1f} | {cell(r['apply_ms'])} | "
            f"{cell(r['graph_ms'])} | {cell(r['recal_ms'])} | {cell(r['score_ms'])} | {cell(r['other_ms'])} | "
            f"**{r['overhead']:.1%}** | {r['hit_us']:.0f} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- part 2: rank correlation


def correlation(name: str, splits: DataSplits, args: argparse.Namespace) -> dict[str, Any]:
    """Score random plans raw and recalibrated, fine-tune each, and correlate."""
    model = baseline(name, splits, args)
    budget = Budget(flops=args.flops)
    recal = Evaluator(model, splits, budget, evaluator_config(args, recalibrate=True))
    raw = Evaluator(model, splits, budget, evaluator_config(args, recalibrate=False))
    space = SearchSpace(recal)
    rng = np.random.default_rng(args.seed)
    finetune = TrainConfig(epochs=args.finetune_epochs, lr=args.finetune_lr, seed=args.seed)
    dense_test = evaluate_accuracy(model, splits.test)

    def finetuned(plan: Plan) -> float:
        tuned = train(recal.build(plan), splits, finetune, description=f"finetune {name}").model
        return evaluate_accuracy(tuned, splits.test)

    plans, raw_acc, rec_acc, tuned_acc, ratios = [], [], [], [], []
    started = time.perf_counter()
    for i in range(args.plans):
        plan = space.sample(rng)
        plans.append(plan)
        r, c = raw.evaluate(plan), recal.evaluate(plan)
        raw_acc.append(r.accuracy)
        rec_acc.append(c.accuracy)
        ratios.append(c.flops_ratio)
        tuned_acc.append(finetuned(plan))
        logger.info(
            "%s plan %d/%d: raw %.4f, recalibrated %.4f, fine-tuned %.4f (FLOPs %.3f)",
            name,
            i + 1,
            args.plans,
            raw_acc[-1],
            rec_acc[-1],
            tuned_acc[-1],
            ratios[-1],
        )
    uniform = recal.graph.uniform_plan(args.flops)
    return {
        "model": name,
        "n": args.plans,
        "dense_test": dense_test,
        "rho_raw": spearman(raw_acc, tuned_acc),
        "rho_rec": spearman(rec_acc, tuned_acc),
        "rho_raw_rec": spearman(raw_acc, rec_acc),
        "mean_raw": float(np.mean(raw_acc)),
        "mean_rec": float(np.mean(rec_acc)),
        "min_raw": float(np.min(raw_acc)),
        "max_raw": float(np.max(raw_acc)),
        "min_rec": float(np.min(rec_acc)),
        "max_rec": float(np.max(rec_acc)),
        "mean_tuned": float(np.mean(tuned_acc)),
        "std_tuned": float(np.std(tuned_acc)),
        "min_tuned": float(np.min(tuned_acc)),
        "max_tuned": float(np.max(tuned_acc)),
        "top_raw": tuned_acc[int(np.argmax(raw_acc))],
        "top_rec": tuned_acc[int(np.argmax(rec_acc))],
        "mean_ratio": float(np.mean(ratios)),
        "uniform_raw": raw.evaluate(uniform).accuracy,
        "uniform_rec": recal.evaluate(uniform).accuracy,
        "uniform_tuned": finetuned(uniform),
        "uniform_ratio": recal.cost(uniform).flops / recal.graph.flops,
        "seconds": time.perf_counter() - started,
    }


def correlation_markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """Part 2 as markdown."""
    lines = [
        f"### Rank correlation of the evaluator's score with fine-tuned test accuracy (FLOPs <= {args.flops:.0%})",
        "",
        f"Random feasible plans (`SearchSpace.sample`, seed {args.seed}); score = accuracy on {args.eval_size} search-val "
        f"images, raw (`bn_recalibration=False`) or after BN recalibration ({args.recal_batches} x {args.batch_size}); "
        f"fine-tune = {args.finetune_epochs:g} epoch of {args.train_size} train images at lr {args.finetune_lr:g} "
        f"(same for every plan), test accuracy on {args.test_size} test images.",
        "",
        "| model | plans | dense test | Spearman raw vs FT | Spearman recal. vs FT | Spearman raw vs recal. | mean raw (min-max) | mean recal. (min-max) | FT test mean +- std (min-max) | FT of top-raw plan | FT of top-recal. plan | time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['n']} | {r['dense_test']:.4f} | {r['rho_raw']:.3f} | **{r['rho_rec']:.3f}** | {r['rho_raw_rec']:.3f} | "
            f"{r['mean_raw']:.4f} ({r['min_raw']:.3f}-{r['max_raw']:.3f}) | {r['mean_rec']:.4f} ({r['min_rec']:.3f}-{r['max_rec']:.3f}) | "
            f"{r['mean_tuned']:.4f} +- {r['std_tuned']:.4f} ({r['min_tuned']:.3f}-{r['max_tuned']:.3f}) | "
            f"{r['top_raw']:.4f} | {r['top_rec']:.4f} | {r['seconds']:.0f} |"
        )
    lines += [
        "",
        f"Uniform {args.criterion} plan at {args.flops:.0%} FLOPs:",
        "",
        "| model | FLOPs ratio | raw search-val acc. | recalibrated search-val acc. | FT test acc. |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['uniform_ratio']:.3f} | {r['uniform_raw']:.4f} | {r['uniform_rec']:.4f} | {r['uniform_tuned']:.4f} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    """Run the selected parts and print (and optionally write) the markdown report."""
    args = parse_args(argv)
    setup_logging(args.verbose, ("automl_prune.baseline", "automl_prune.training", "automl_prune.data"))
    torch.set_num_threads(args.threads)
    load_start, started = load_average(), time.perf_counter()
    splits = load_splits(args)
    sections = []
    if "breakdown" in args.parts:
        sections.append(breakdown_markdown([breakdown(m, splits, args) for m in args.breakdown_models], args))
        print(sections[-1], flush=True)
    if "correlation" in args.parts:
        sections.append(correlation_markdown([correlation(m, splits, args) for m in args.models], args))
        print(sections[-1], flush=True)
    header = (
        f"Machine: {cpu_model()}, {os.cpu_count()} logical cores; torch {torch.__version__}, {args.threads} thread(s); "
        f"{dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; load average {load_start} at start, {load_average()} at end; "
        f"{time.perf_counter() - started:.0f} s.\n\nCommand: `python benchmarks/evaluator.py {shlex.join(sys.argv[1:] if argv is None else argv)}`"
    )
    print("\n" + header)
    if args.out is not None:
        write_text(args.out, header + "\n\n" + "\n\n".join(sections) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

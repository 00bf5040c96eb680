"""Benchmark: do searched pruning plans beat the uniform plan?

For every model (trained once on Fashion-MNIST with :func:`automl_prune.baseline.train_baseline`
and cached), every budget (FLOPs fractions and CPU latency budgets given as a fraction of the
dense model's measured batch-1 latency) and every strategy, it runs
``get_strategy(name).search(evaluator, space, max_evaluations, seed)`` with a fresh
evaluator cache, and reports for the best plan found:

- its search-val score (accuracy after BN recalibration, what the search maximised) and its
  raw score (the same plan scored by a ``bn_recalibration=False`` evaluator, AMC's protocol);
- its test accuracy after the same short fine-tune for every plan (fine-tuning starts from
  the exact scored, recalibrated model; same data order and learning rate for every plan);
- its FLOPs ratio (and, for latency budgets, predicted and measured batch-1 latency);
- evaluations per second of the search, and the share of the search's wall time spent
  inside the evaluator (the rest is the agent: environment steps, network updates, bounds).

``uniform`` is deterministic and runs once per budget (its single evaluation); ``random`` is
the control. Means and standard deviations are over search seeds; the fine-tune seed is
fixed, so differences come from the plans. Example::

    python benchmarks/search_vs_uniform.py --models fashion_cnn --evaluations 40 --seeds 0,1 --out search.md
    python benchmarks/search_vs_uniform.py   # the issue's full grid: 2 models x 3 budgets x 5 strategies x 3 seeds x 100
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import (
    DEFAULT_EPOCHS,
    csv_ints,
    csv_list,
    epochs_per_model,
    evaluator_config,
    load_average,
    load_splits,
    run_header,
    setup_logging,
)

from automl_prune.baseline import train_baseline
from automl_prune.data import DataSplits
from automl_prune.errors import InvalidValueError
from automl_prune.evaluator import Evaluator
from automl_prune.finalists import choose_finalist, match_measured_latency
from automl_prune.io import write_text
from automl_prune.measure.accuracy import evaluate_accuracy
from automl_prune.models import ModelSpec
from automl_prune.runtimes import DEFAULT_RUNTIME
from automl_prune.search_spaces import SearchSpace
from automl_prune.searchers.global_pruning import GlobalStrategy
from automl_prune.strategy import STRATEGIES, get_strategy
from automl_prune.training import TrainConfig, train
from automl_prune.types import Budget, Plan

logger = logging.getLogger("benchmarks.search_vs_uniform")

# --------------------------------------------------------------------------- arguments


def _budgets(value: str) -> list[tuple[str, float]]:
    """``flops:0.5,flops:0.25,latency:0.6`` -> [(kind, fraction)]."""
    out = []
    for item in csv_list(value):
        kind, sep, fraction = item.partition(":")
        if not sep or kind not in ("flops", "latency"):
            raise argparse.ArgumentTypeError(f"expected flops:FRACTION or latency:FRACTION, got {item!r}")
        f = float(fraction)
        if not 0.0 < f < 1.0:
            raise argparse.ArgumentTypeError(f"budget fraction must be in (0, 1), got {item!r}")
        out.append((kind, f))
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options; the defaults are the issue's full grid."""
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--models", type=csv_list, default=["fashion_cnn", "resnet20"], help="comma-separated model names")
    p.add_argument(
        "--budgets",
        type=_budgets,
        default=[("flops", 0.5), ("flops", 0.25), ("latency", 0.6)],
        help="flops:F (fraction of dense FLOPs) or latency:F (fraction of the dense model's measured batch-1 latency "
        "on the default runtime, i.e. a speed-up budget of 1/F)",
    )
    p.add_argument(
        "--strategies", type=csv_list, default=["uniform", "random", "ddpg", "ppo", "reinforce"], help="strategies"
    )
    p.add_argument("--evaluations", type=int, default=100, help="evaluation budget per search")
    p.add_argument("--seeds", type=csv_ints, default=[0, 1, 2], help="search seeds (uniform runs once)")
    p.add_argument("--eval-size", type=int, default=2000, help="search-val images scored per plan")
    p.add_argument("--recal-batches", type=int, default=8, help="BN recalibration batches")
    p.add_argument("--batch-size", type=int, default=128, help="evaluator batch size")
    p.add_argument("--criterion", default="l1", help="importance criterion of the evaluator")
    p.add_argument("--min-keep", type=float, default=0.2, help="smallest keep ratio of any group")
    p.add_argument("--latency-threads", type=int, default=1, help="CPU threads latency budgets are measured with")
    p.add_argument("--finalists", type=int, default=8, help="finalists measured under latency budgets")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST directory (default: the dataset's default)")
    p.add_argument("--train-size", type=int, default=12000, help="training images (subset of the train split)")
    p.add_argument("--val-size", type=int, default=2000, help="search-val images held out of the training data")
    p.add_argument("--test-size", type=int, default=5000, help="test images for fine-tuned accuracies")
    p.add_argument(
        "--epochs", type=epochs_per_model, default=DEFAULT_EPOCHS, help="baseline epochs per model, MODEL=EPOCHS,..."
    )
    p.add_argument("--train-lr", type=float, default=0.05, help="baseline learning rate")
    p.add_argument("--finetune-epochs", type=float, default=0.3, help="fine-tune epochs of every best plan")
    p.add_argument("--finetune-lr", type=float, default=0.01, help="fine-tune learning rate")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=0, help="seed of data splits, baselines, evaluator and fine-tuning")
    p.add_argument("--out", type=Path, default=None, help="also write the markdown report here (atomically)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = p.parse_args(argv)
    unknown = [s for s in args.strategies if s not in STRATEGIES]
    if unknown:
        p.error(STRATEGIES.unknown_message(unknown[0]))
    if not args.seeds:
        p.error("--seeds needs at least one seed")
    if min(args.evaluations, args.eval_size, args.recal_batches, args.threads, args.latency_threads) < 1:
        p.error("sizes and thread counts must be >= 1")
    return args


# --------------------------------------------------------------------------- helpers


def budget_label(kind: str, fraction: float, dense_ms: float | None = None) -> str:
    """``FLOPs 50%`` or ``latency 60% (of 1.23 ms, onnxruntime)``."""
    if kind == "flops":
        return f"FLOPs {fraction:.0%}"
    of = f" of {dense_ms:.3g} ms" if dense_ms is not None else ""
    return f"latency {fraction:.0%}{of} ({DEFAULT_RUNTIME})"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN for a single value)."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else math.nan)


def fmt(mean: float, std: float, digits: int = 4) -> str:
    """``0.8123 +- 0.0040`` (the std left out when NaN)."""
    if math.isnan(mean):
        return ""
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} +- {std:.{digits}f}"


# --------------------------------------------------------------------------- the benchmark


def finetuned_test(ev: Evaluator, plan: Plan, splits: DataSplits, args: argparse.Namespace, label: str) -> float:
    """Test accuracy of ``plan``'s scored model after the benchmark's fine-tune (same recipe for every plan)."""
    finetune = TrainConfig(epochs=args.finetune_epochs, lr=args.finetune_lr, seed=args.seed)
    tuned = train(ev.build(plan), splits, finetune, description=f"finetune {label}").model
    return evaluate_accuracy(tuned, splits.test)


def matched(
    ev: Evaluator, space: SearchSpace, target_ratio: float, splits: DataSplits, args: argparse.Namespace
) -> dict[str, Any]:
    """Uniform and global pruning placed at the searched plan's *measured* latency (bisection on measurements)."""
    low = float(space.min_keep.max())
    out: dict[str, Any] = {}
    uniform, m = match_measured_latency(
        ev,
        lambda x: space.plan_from_keeps([space.snap(low + x * (1 - low), i) for i in range(space.dim)]),
        target_ratio,
    )
    out["uniform_matched"] = {"test": finetuned_test(ev, uniform, splits, args, "uniform@"), "ratio": m.ratio}
    ranking = GlobalStrategy().ranking(ev, space)
    plan, m = match_measured_latency(ev, ranking.keeping, target_ratio)
    out["global_matched"] = {"test": finetuned_test(ev, plan, splits, args, "global@"), "ratio": m.ratio}
    return out


def run_one(
    strategy: str,
    seed: int,
    ev: Evaluator,
    raw: Evaluator,
    space: SearchSpace,
    splits: DataSplits,
    args: argparse.Namespace,
    measure: bool,
) -> dict[str, Any]:
    """One search and the evaluation of its best plan (for latency budgets: the best measured finalist)."""
    ev._cache.clear()  # every search pays for its own evaluations (the cache is per evaluator, shared across searches here)
    result = get_strategy(strategy).search(ev, space, max_evaluations=args.evaluations, seed=seed)
    plan: Plan = result.best_plan
    best = result.best_evaluation
    measured = None
    if measure:  # what ships under a latency budget: the best finalist whose measurement meets it
        choice = choose_finalist(ev, result.history, args.finalists, progress=False)
        if choice is not None:
            plan, best = choice.plan, choice.finalists[choice.chosen].evaluation
            measured = choice.finalists[choice.chosen].measured
    in_evaluator = sum(e.seconds for _, e in result.history)
    row = {
        "strategy": strategy,
        "seed": seed,
        "score": best.accuracy,
        "raw": raw.evaluate(plan).accuracy,
        "test": finetuned_test(ev, plan, splits, args, strategy),
        "flops_ratio": best.flops_ratio,
        "feasible": best.feasible,
        "latency_pred": best.latency_ms,
        "latency_meas": measured.stats.median_ms if measured is not None else None,
        "ratio_meas": measured.ratio if measured is not None else None,
        "evaluations": result.evaluations,
        "fresh": sum(1 for _, e in result.history if not e.cached),
        "wall": result.wall_time,
        "evals_per_s": result.evaluations / max(result.wall_time, 1e-9),
        "evaluator_share": in_evaluator / max(result.wall_time, 1e-9),
        "keeps": [round(plan.keep_ratio(g), 2) for g in space.groups],
    }
    if measured is not None and strategy not in ("uniform", "global"):
        row.update(matched(ev, space, measured.ratio, splits, args))
    logger.info(
        "%s seed %d: score %.4f raw %.4f test %.4f FLOPs %.3f, %d evals in %.1f s",
        strategy,
        seed,
        row["score"],
        row["raw"],
        row["test"],
        row["flops_ratio"],
        row["evaluations"],
        row["wall"],
    )
    return row


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (model, budget, strategy, seed); returns per-run rows."""
    splits = load_splits(args)
    rows: list[dict[str, Any]] = []
    for name in args.models:
        started = time.perf_counter()
        base = train_baseline(
            ModelSpec(name, splits.in_channels, splits.num_classes),
            splits,
            TrainConfig(epochs=args.epochs.get(name, 3), lr=args.train_lr, seed=args.seed),
        )
        model = base.model
        dense_test = evaluate_accuracy(model, splits.test)
        logger.info(
            "%s: baseline %s (%.0f s), test %.4f",
            name,
            "cached" if base.cached else "trained",
            time.perf_counter() - started,
            dense_test,
        )
        raw = Evaluator(model, splits, Budget(flops=1.0), evaluator_config(args, recalibrate=False))
        for kind, fraction in args.budgets:
            if kind == "flops":
                budget = Budget(flops=fraction)
            else:  # a fraction of the dense model's latency on the default runtime: a speed-up budget
                budget = Budget(speedup=1.0 / fraction, threads=args.latency_threads)
            common = {"model": name, "dense_test": dense_test}
            try:
                ev = Evaluator(model, splits, budget, evaluator_config(args, recalibrate=True))
                space = SearchSpace(ev, min_keep=args.min_keep)
            except InvalidValueError as exc:
                label = budget_label(kind, fraction)
                logger.warning("%s, %s: skipped: %s", name, label, exc)
                rows.append({**common, "budget": label, "strategy": "(budget unreachable)", "error": str(exc)})
                continue
            dense_ms = ev.latency_model.dense_ms if ev.latency_model is not None else None
            common.update({"budget": budget_label(kind, fraction, dense_ms), "dense_ms": dense_ms})
            for strategy in args.strategies:
                for seed in args.seeds[:1] if strategy == "uniform" else args.seeds:
                    rows.append(
                        {**common, **run_one(strategy, seed, ev, raw, space, splits, args, measure=kind == "latency")}
                    )
    return rows


# --------------------------------------------------------------------------- report


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """Summary table (means over seeds) and per-run details."""
    lines = [
        f"Fashion-MNIST ({args.train_size} train / {args.eval_size} search-val scored / {args.test_size} test images); "
        f"{args.evaluations} evaluations per search; seeds {','.join(map(str, args.seeds))}; criterion {args.criterion}, "
        f"min_keep {args.min_keep:g}; BN recalibration {args.recal_batches} x {args.batch_size}; every best plan fine-tuned "
        f"{args.finetune_epochs:g} epoch at lr {args.finetune_lr:g}; {args.threads} thread(s). "
        "Scores are search-val accuracies of the best plan (recalibrated: what the search maximised; raw: same plan, no "
        "recalibration); 'FT test' is test accuracy after the fine-tune; deltas are against the uniform plan's, in "
        "percentage points; mean +- std over seeds.",
        "",
        "| model | budget | strategy | runs | search-val (recal.) | search-val (raw) | FT test | FT test - uniform (pp) | FT test - uniform at the same measured latency (pp) | FT test - global at the same measured latency (pp) | FLOPs ratio | evals/s | time in evaluator |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["budget"]), []).append(r)
    for (model, budget), items in groups.items():
        if "error" in items[0]:
            lines.append(f"| {model} | {budget} | budget unreachable | 0 | | | | | | | | | |")
            continue
        uniform = [r["test"] for r in items if r["strategy"] == "uniform"]
        dense = items[0]
        lines.append(f"| {model} | {budget} | dense | 1 | | | {dense['dense_test']:.4f} | | | | 1.000 | | |")
        for strategy in dict.fromkeys(r["strategy"] for r in items):
            runs = [r for r in items if r["strategy"] == strategy]
            delta = fmt(*mean_std([100 * (r["test"] - uniform[0]) for r in runs]), digits=2) if uniform else ""
            at_same = [
                fmt(*mean_std([100 * (r["test"] - r[key]["test"]) for r in runs if key in r]), digits=2)
                for key in ("uniform_matched", "global_matched")
            ]
            lines.append(
                f"| {model} | {budget} | {strategy} | {len(runs)} | {fmt(*mean_std([r['score'] for r in runs]))} | "
                f"{fmt(*mean_std([r['raw'] for r in runs]))} | {fmt(*mean_std([r['test'] for r in runs]))} | "
                f"{delta if strategy != 'uniform' else '0'} | {at_same[0]} | {at_same[1]} | "
                f"{fmt(*mean_std([r['flops_ratio'] for r in runs]), digits=3)} | "
                f"{statistics.fmean(r['evals_per_s'] for r in runs):.2f} | {statistics.fmean(r['evaluator_share'] for r in runs):.0%} |"
            )
    lines += [
        "",
        "Per run (keep ratios in group order; latencies at batch 1 in ms, predicted by the latency model / measured "
        "as a finalist; for latency budgets, the measured latency over the dense model's of the plan, and of the uniform "
        "and global plans placed at it by bisection on measurements):",
        "",
        "| model | budget | strategy | seed | search-val (recal.) | raw | FT test | FLOPs ratio | latency pred / meas | measured ratio (uniform, global at it: ratio, FT test) | evals (fresh) | wall (s) | keep ratios |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['budget']} | - | | | | | | | | | | {r['error']} |")
            continue
        lat = f"{r['latency_pred']:.3g} / {r['latency_meas']:.3g}" if r["latency_meas"] is not None else ""
        ratio = f"{r['ratio_meas']:.3f}" if r.get("ratio_meas") is not None else ""
        for key in ("uniform_matched", "global_matched"):
            if key in r:
                ratio += f"; {r[key]['ratio']:.3f}, {r[key]['test']:.4f}"
        keeps = " ".join(f"{k:.2f}" for k in r["keeps"])
        if len(r["keeps"]) > 24:
            keeps = f"mean {np.mean(r['keeps']):.2f}, min {min(r['keeps']):.2f}, max {max(r['keeps']):.2f} ({len(r['keeps'])} groups)"
        lines.append(
            f"| {r['model']} | {r['budget']} | {r['strategy']} | {r['seed']} | {r['score']:.4f} | {r['raw']:.4f} | {r['test']:.4f} | "
            f"{r['flops_ratio']:.3f} | {lat} | {ratio} | {r['evaluations']} ({r['fresh']}) | {r['wall']:.1f} | {keeps} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the markdown and optionally write it."""
    args = parse_args(argv)
    setup_logging(
        args.verbose,
        (
            "automl_prune.baseline",
            "automl_prune.training",
            "automl_prune.data",
            "automl_prune.evaluator",
            "automl_prune.measure.latency",
            "automl_prune.measure.latency_model",
            "automl_prune.finalists",
        ),
    )
    torch.set_num_threads(args.threads)
    load_start, started = load_average(), time.perf_counter()
    table = markdown(run(args), args)
    header = run_header("search_vs_uniform.py", argv, args.threads, load_start, started)
    print(table + "\n\n" + header)
    if args.out is not None:
        write_text(args.out, header + "\n\n" + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

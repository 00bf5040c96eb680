"""Benchmark: deployment runtimes, channel widths, and the speed-up pruned plans really give.

For every model (trained on Fashion-MNIST and cached) and every runtime (onnxruntime,
frozen TorchScript, eager torch with channels_last) at batch 1 and 64 it prints markdown:

1. the dense model's latency on each runtime, measured in interleaved rounds;
2. channel widths: the speed-up over dense of the largest uniform plan within 50% of the
   FLOPs when kept channel counts are rounded to 1, 4, 8, 16 or 32, per runtime;
3. the speed-up of 50% and 25% FLOPs plans, uniform and searched (``--strategy``, default
   DDPG, with the runtime's default channel multiple), per runtime, against the targets of
   the deployment issue: a 50% plan at least 1.6x faster than dense at batch 64 on the
   default runtime, and never slower than dense.

Every speed-up is the median over interleaved rounds of dense time / pruned time, so a
machine that slows down during the run does not bias it; a measurement that stayed noisy
after repeats is marked. Nothing is hard-coded. Example::

    python benchmarks/runtimes.py --out runtimes.md
    python benchmarks/runtimes.py --models fashion_cnn --runtimes onnxruntime --evaluations 20
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from _common import DEFAULT_EPOCHS, cpu_model, csv_list, int_at_least, load_average, load_splits, setup_logging
from tqdm import tqdm

from automl_prune.baseline import train_baseline
from automl_prune.evaluator import Evaluator, EvaluatorConfig
from automl_prune.io import write_text
from automl_prune.measure.latency import LatencyStats, measure_interleaved, round_ratio
from automl_prune.models import ModelSpec
from automl_prune.pruning import rebuild_structure
from automl_prune.runtimes import DEFAULT_RUNTIME, RUNTIMES, Runner, fold_batchnorm, get_runtime, random_input
from automl_prune.search_spaces import SearchSpace
from automl_prune.strategy import get_strategy
from automl_prune.training import TrainConfig
from automl_prune.types import Budget

logger = logging.getLogger("benchmarks.runtimes")

MULTIPLES = (1, 4, 8, 16, 32)
TARGET_SPEEDUP = 1.6


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--models", type=csv_list, default=["fashion_cnn", "resnet20", "mobilenetv2"])
    p.add_argument("--runtimes", type=csv_list, default=RUNTIMES.names())
    p.add_argument("--batch-sizes", type=lambda v: [int(x) for x in csv_list(v)], default=[1, 64])
    p.add_argument("--budgets", type=lambda v: [float(x) for x in csv_list(v)], default=[0.5, 0.25])
    p.add_argument("--multiples", type=lambda v: [int(x) for x in csv_list(v)], default=list(MULTIPLES))
    p.add_argument("--strategy", default="ddpg", help="strategy of the searched plans")
    p.add_argument("--evaluations", type=int_at_least(1), default=40, help="evaluations per search")
    p.add_argument("--eval-size", type=int_at_least(1), default=1000, help="search-val images per evaluation")
    p.add_argument("--threads", type=int_at_least(1), default=2, help="intra-op threads of every runtime")
    p.add_argument("--rounds", type=int_at_least(2), default=5, help="interleaved rounds per measurement")
    p.add_argument("--train-size", type=int, default=12000)
    p.add_argument("--val-size", type=int, default=2000)
    p.add_argument("--test-size", type=int, default=2000)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="also write the markdown here (atomically)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def speedup(
    runtime: str, dense: torch.nn.Module, pruned: torch.nn.Module, shape: tuple[int, ...], args
) -> tuple[float, LatencyStats, LatencyStats]:
    """(dense / pruned median over interleaved rounds, dense stats, pruned stats)."""
    rt = get_runtime(runtime)
    with rt.compile(dense, shape, "cpu", args.threads) as a, rt.compile(pruned, shape, "cpu", args.threads) as b:
        stats = measure_interleaved({"dense": a, "pruned": b}, rounds=args.rounds, reference="dense")
    return 1.0 / round_ratio(stats["pruned"], stats["dense"]), stats["dense"], stats["pruned"]


def contiguous_runner(model: torch.nn.Module, shape: tuple[int, ...], threads: int) -> Runner:
    """Eager torch as the torch runtime runs it (BatchNorm folded), but in the default contiguous memory format."""
    folded = fold_batchnorm(model)
    x = random_input(shape)

    def call() -> None:
        with torch.inference_mode():
            folded(x)

    return Runner("torch", torch.device("cpu"), threads, shape, call)


def flag(s: LatencyStats) -> str:
    return " (noisy)" if s.noisy else ""


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose, ("automl_prune.baseline", "automl_prune.training", "automl_prune.measure.latency"))
    torch.set_num_threads(args.threads)
    started, load_start = time.perf_counter(), load_average()
    splits = load_splits(args)
    dense_rows, width_rows, plan_rows = [], [], []
    bar = tqdm(desc="measurements", unit="meas", file=sys.stderr)
    for name in args.models:
        base = train_baseline(
            ModelSpec(name, splits.in_channels, splits.num_classes),
            splits,
            TrainConfig(epochs=DEFAULT_EPOCHS.get(name, 1.0), lr=0.05, seed=args.seed),
        )
        model = base.model.eval()
        sample = tuple(splits.input_shape(1)[1:])
        # 1. dense latency per runtime, all runtimes interleaved
        for b in args.batch_sizes:
            runners = {rt: get_runtime(rt).compile(model, (b, *sample), "cpu", args.threads) for rt in args.runtimes}
            if "torch" in args.runtimes:  # the torch runtime runs channels_last: compare with contiguous
                runners["torch, contiguous"] = contiguous_runner(model, (b, *sample), args.threads)
            stats = measure_interleaved(runners, rounds=args.rounds)
            for r in runners.values():
                r.close()
            eager = stats.get("torch")
            for rt, s in stats.items():
                vs = f"x{eager.median_ms / s.median_ms:.2f}" if eager is not None else ""
                dense_rows.append(
                    f"| {name} | {b} | {rt} | {s.median_ms:.4g} ({s.p10_ms:.4g}-{s.p90_ms:.4g}){flag(s)} | {vs} |"
                )
            bar.update(1)
        # 2. channel widths: largest uniform plan within 50% FLOPs, per multiple
        for multiple in args.multiples:
            ev = Evaluator(
                model, splits, Budget(flops=0.5), EvaluatorConfig(round_to=multiple, eval_size=args.eval_size)
            )
            space = SearchSpace(ev)
            plan = space.repair(space.plan_from_keeps([1.0] * space.dim))
            pruned = rebuild_structure(model, ev.graph, plan, multiple)
            widths = sorted(set(ev.graph.kept_channels(plan, multiple).values()))
            cells = []
            for rt in args.runtimes:
                for b in args.batch_sizes:
                    x, _, p = speedup(rt, model, pruned, (b, *sample), args)
                    cells.append(f"x{x:.2f}{flag(p)}")
                    bar.update(1)
            width_rows.append(
                f"| {name} | {multiple} | {ev.graph.flops_ratio(plan, multiple):.3f} | "
                f"{' '.join(map(str, widths[:8]))}{' ...' if len(widths) > 8 else ''} | {' | '.join(cells)} |"
            )
        # 3. 50% / 25% plans, uniform and searched, at the runtime's default multiple
        multiple = get_runtime(DEFAULT_RUNTIME).preferred_multiple()
        for fraction in args.budgets:
            ev = Evaluator(
                model, splits, Budget(flops=fraction), EvaluatorConfig(round_to=multiple, eval_size=args.eval_size)
            )
            space = SearchSpace(ev)
            uniform = space.repair(space.plan_from_keeps([1.0] * space.dim))
            result = get_strategy(args.strategy).search(ev, space, args.evaluations, seed=args.seed)
            for label, plan in (("uniform", uniform), (args.strategy, result.best_plan)):
                pruned = rebuild_structure(model, ev.graph, plan, multiple)
                cells = []
                for rt in args.runtimes:
                    for b in args.batch_sizes:
                        x, _, p = speedup(rt, model, pruned, (b, *sample), args)
                        mark = ""
                        if x < 1.0:
                            mark = " SLOWER"
                        elif rt == DEFAULT_RUNTIME and b == 64 and fraction == 0.5 and x < TARGET_SPEEDUP:
                            mark = " (<1.6)"
                        cells.append(f"x{x:.2f}{mark}{flag(p)}")
                        bar.update(1)
                plan_rows.append(
                    f"| {name} | {fraction:.0%} | {label} | {ev.graph.flops_ratio(plan, multiple):.3f} | {' | '.join(cells)} |"
                )
    bar.close()
    cols = " | ".join(f"{rt} b{b}" for rt in args.runtimes for b in args.batch_sizes)
    sep = "|".join(["---:"] * (len(args.runtimes) * len(args.batch_sizes)))
    lines = [
        f"Machine: {cpu_model()}, {os.cpu_count()} logical cores; torch {torch.__version__}; {args.threads} intra-op "
        f"thread(s) for every runtime; {dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; load average {load_start} at "
        f"start, {load_average()} at end; {time.perf_counter() - started:.0f} s.",
        "",
        f"Command: `python benchmarks/runtimes.py {shlex.join(sys.argv[1:] if argv is None else argv)}`",
        "",
        "Dense models (28x28x1 inputs), median of interleaved rounds (p10-p90 of all runs), and the speed-up over "
        "eager torch (the torch runtime: BatchNorm folded, channels_last; 'torch, contiguous' is the same in the "
        "default memory format):",
        "",
        "| model | batch | runtime | ms | vs torch |",
        "|---|---:|---|---:|---:|",
        *dense_rows,
        "",
        "Channel widths: the largest uniform plan within 50% of the FLOPs when kept channel counts are multiples of "
        "`round_to` (groups no larger than it use half of it); speed-up over dense:",
        "",
        f"| model | round_to | FLOPs ratio | kept widths | {cols} |",
        f"|---|---:|---:|---|{sep}|",
        *width_rows,
        "",
        f"Pruned plans at the default multiple ({get_runtime(DEFAULT_RUNTIME).preferred_multiple()} here): the largest "
        f"uniform plan within the FLOPs budget, and the best plan of a {args.strategy} search ({args.evaluations} "
        f"evaluations, {args.eval_size} search-val images); speed-up over dense. SLOWER marks a plan slower than dense; "
        "(<1.6) a 50% plan below the 1.6x target at batch 64 on the default runtime.",
        "",
        f"| model | FLOPs budget | plan | FLOPs ratio | {cols} |",
        f"|---|---:|---|---:|{sep}|",
        *plan_rows,
    ]
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        write_text(args.out, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

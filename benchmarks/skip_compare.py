"""Benchmark: static skips, dynamic SkipNet and two-stage N2N against the uniform plan, at equal mean FLOPs.

The comparison of the SkipNet/N2N issue, with the fine-tune recipe of ``search_quality.py``.
Fashion-MNIST 55,000 train / 5,000 search-val / 10,000 test, the dense baseline of
``search_quality.py`` (trained once, cached; ``--cache-dir benchmarks/results/cache`` uses the
checkpoints kept in the repository), and for every model, FLOPs budget and seed:

- ``uniform``: the uniform plan at the budget (the reference);
- ``static_skip``: the static skip search (SkipNet's recurrent gate by REINFORCE, one set of
  removed blocks for every input, the rest shrunk uniformly into the budget) with
  ``--evaluations`` cheap scores;
- ``n2n``: two-stage N2N (``reinforce``: removal first, then shrinkage) with N2N's reward,
  every student fine-tuned ``--n2n-steps`` steps with distillation from the dense model before
  it is scored (``configs/n2n.yaml``), ``--evaluations`` scores; its reward values compression, so
  its plan may come in below the budget (the table gives every plan's FLOPs share);
- ``dynamic``: dynamic SkipNet (:mod:`automl_prune.dynamic`): a gate per residual block, soft
  pre-training then hybrid RL for as many steps as the fine-tune recipe takes, the threshold
  calibrated on search-val to the budget as a *mean* FLOPs share.

The three plans are fine-tuned with the recipe (``--finetune-epochs`` on all 55,000 images from
the model the search scored, labels only) and tested on all 10,000 test images; the gated model
trained as long is tested as it is (its mean FLOPs per test image reported). Every unit of work is
stored in ``--state`` as it ends (resumable; ``--report-only`` writes the table from it)::

    python benchmarks/skip_compare.py --models resnet20 --budgets 0.5,0.25 --seeds 0,1,2 \\
        --state benchmarks/results/skip_compare.json --out skip_compare.md
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from _common import csv_ints, csv_list, int_at_least, setup_logging
from search_quality import State, add_cache_dir_argument, finetune_test, recorded_baseline, run_and_report

from automl_prune import dynamic
from automl_prune.data import DataSplits, load_dataset
from automl_prune.evaluator import Evaluator, EvaluatorConfig
from automl_prune.search_spaces import SearchSpace
from automl_prune.strategy import get_strategy
from automl_prune.types import Budget

logger = logging.getLogger("benchmarks.skip_compare")

METHODS = ("uniform", "static_skip", "n2n", "dynamic")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options; the defaults are the issue's protocol."""
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--models", type=csv_list, default=["resnet20", "resnet56"], help="comma-separated zoo models")
    p.add_argument("--budgets", type=lambda v: [float(x) for x in csv_list(v)], default=[0.5, 0.25])
    p.add_argument("--methods", type=csv_list, default=list(METHODS), help=f"of {', '.join(METHODS)}")
    p.add_argument("--seeds", type=csv_ints, default=[0, 1, 2])
    p.add_argument("--evaluations", type=int_at_least(1), default=100, help="cheap scores per search")
    p.add_argument("--n2n-steps", type=int_at_least(0), default=20, help="distillation steps before each N2N score")
    p.add_argument("--default-epochs", type=float, default=8.0, help="baseline epochs (as search_quality.py)")
    p.add_argument("--train-lr", type=float, default=0.1, help="baseline peak learning rate")
    p.add_argument("--eval-size", type=int_at_least(1), default=2000, help="search-val images per cheap score")
    p.add_argument("--recal-batches", type=int_at_least(1), default=8, help="BN recalibration batches")
    p.add_argument("--min-keep", type=float, default=0.1, help="smallest keep ratio of any group")
    p.add_argument("--finetune-epochs", type=float, default=1.0, help="epochs of the fine-tune recipe")
    p.add_argument("--finetune-lr", type=float, default=0.01, help="peak learning rate of the fine-tune recipe")
    p.add_argument("--distill-temperature", type=float, default=4.0, help="distillation temperature")
    p.add_argument("--threads", type=int_at_least(1), default=2, help="torch intra-op threads")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST directory")
    add_cache_dir_argument(p)
    p.add_argument("--state", type=Path, default=Path("skip_compare.json"), help="results so far (resumable)")
    p.add_argument("--report-only", action="store_true", help="write the report from --state without computing")
    p.add_argument("--out", type=Path, default=None, help="also write the markdown report here (atomically)")
    args = p.parse_args(argv)
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"unknown method {unknown[0]!r}; valid methods: {', '.join(METHODS)}")
    if any(not 0.0 < b <= 1.0 for b in args.budgets):
        p.error("--budgets are FLOPs fractions in (0, 1]")
    args.arms = ["labels"]  # the recipe of search_quality.py's labels-only arm
    return args


def _evaluator(model: torch.nn.Module, data: DataSplits, fraction: float, args, **config: Any) -> Evaluator:
    base = {"eval_size": args.eval_size, "recalibration_batches": args.recal_batches}
    return Evaluator(model, data, Budget(flops=fraction), EvaluatorConfig(**{**base, **config}))


def plan_cell(method: str, seed: int, model, data: DataSplits, fraction: float, args) -> dict[str, Any]:
    """One plan (uniform, static_skip or n2n), fine-tuned with the recipe and tested."""
    ev = _evaluator(model, data, fraction, args)
    started = time.perf_counter()
    if method == "uniform":
        plan = get_strategy("uniform").search(ev, SearchSpace(ev, min_keep=args.min_keep), 1, seed=seed).best_plan
        evaluations = 1
    else:
        scorer = ev
        if method == "n2n":  # N2N's students: distilled before they are scored, N2N's reward
            scorer = _evaluator(
                model, data, fraction, args, reward="n2n", finetune_steps=args.n2n_steps, distill_weight=0.5
            )
        name = "reinforce" if method == "n2n" else method
        space = SearchSpace(scorer, min_keep=args.min_keep, skip_gates=True)
        result = get_strategy(name).search(scorer, space, max_evaluations=args.evaluations, seed=seed)
        plan, evaluations = result.best_plan, result.evaluations
    search_wall = time.perf_counter() - started
    cheap = ev.evaluate(plan)
    test = finetune_test(ev, plan, data, model, "labels", seed, args)
    return {
        "test": test,
        "flops_share": cheap.flops_ratio,
        "cheap": cheap.accuracy,
        "removed": ev.graph.skipped_blocks(plan),
        "evaluations": evaluations,
        "search_wall": search_wall,
    }


def dynamic_cell(seed: int, model, data: DataSplits, fraction: float, args) -> dict[str, Any]:
    """Dynamic SkipNet trained for as many steps as the recipe's fine-tune, tested on every test image."""
    net = dynamic.GatedNetwork(model, data.train.images[:1])
    steps = round(args.finetune_epochs * len(data.train) / 128)
    pretrain = min(100, steps // 4)
    config = dynamic.GateConfig(
        pretrain_steps=pretrain, rl_steps=steps - pretrain, batch_size=128, target_flops=fraction, seed=seed
    )
    dynamic.train_gated(net, data, config)
    stats = dynamic.gate_statistics(net, data.test)
    shares = sorted(stats.flops_shares)
    return {
        "test": stats.accuracy,
        "flops_share": stats.mean_flops_share,
        "flops_p10_p90": [shares[len(shares) // 10], shares[9 * len(shares) // 10]],
        "floor_share": net.floor_share(),
        "threshold": stats.threshold,
        "block_run_rate": stats.block_run_rate,
        "steps": steps,
    }


def run(args: argparse.Namespace, state: State) -> None:
    """Fill the state with every (model, budget, seed, method)."""
    torch.set_num_threads(args.threads)
    data = load_dataset("fashion-mnist", args.data_dir, val_size=5000, seed=0)
    for name in args.models:
        model = recorded_baseline(state, name, data, args.default_epochs, args).model.eval()
        for fraction in args.budgets:
            for seed in args.seeds:
                for method in args.methods:
                    key = f"{name}/flops{fraction:g}/seed{seed}/{method}"
                    if method == "dynamic":
                        state.get(key, dynamic_cell, seed, model, data, fraction, args)
                    else:
                        state.get(key, plan_cell, method, seed, model, data, fraction, args)


def _ms(values: Sequence[float], scale: float = 1.0, digits: int = 2) -> str:
    vals = [scale * v for v in values]
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{statistics.fmean(vals):.{digits}f} +- {statistics.stdev(vals):.{digits}f}"


def report(state: dict[str, Any], args: argparse.Namespace) -> str:
    """The markdown table: test accuracy, FLOPs share and the paired difference to uniform."""
    cells: dict[tuple[str, str, str], dict[str, dict[str, Any]]] = {}
    for key, value in state.items():
        if key.endswith("/baseline"):  # the baseline's record (same_baseline), not a cell
            continue
        name, budget, seed, method = key.split("/")
        cells.setdefault((name, budget, method), {})[seed] = value
    lines = [
        f"Fashion-MNIST (55000 train / 5000 search-val / 10000 test); {args.evaluations} cheap scores per search; "
        f"fine-tune recipe {args.finetune_epochs:g} epoch(s) at lr {args.finetune_lr:g}, labels only; the gated "
        "model trained as many steps. FLOPs: share of the dense model (mean per test image for `dynamic`). "
        "Differences to uniform paired by seed, in percentage points.",
        "",
        "| model | budget | method | seeds | test accuracy (%) | - uniform (pp) | FLOPs share | removed blocks |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for (name, budget, method), by_seed in sorted(
        cells.items(), key=lambda kv: (kv[0][0], kv[0][1], METHODS.index(kv[0][2]))
    ):
        uniform = cells.get((name, budget, "uniform"), {})
        diffs = [100 * (v["test"] - uniform[s]["test"]) for s, v in by_seed.items() if s in uniform]
        removed = ""
        if method == "dynamic":
            rates = [statistics.fmean(v["block_run_rate"]) for v in by_seed.values()]
            removed = f"blocks run on {_ms(rates, 100, 0)}% of inputs (mean)"
        elif method != "uniform":
            removed = "; ".join(f"{s}: {len(v['removed'])}" for s, v in sorted(by_seed.items()))
        difference = "0" if method == "uniform" else _ms(diffs) if diffs else ""
        lines.append(
            f"| {name} | {budget.removeprefix('flops')} | {method} | {len(by_seed)} | "
            f"{_ms([v['test'] for v in by_seed.values()], 100)} | {difference} | "
            f"{_ms([v['flops_share'] for v in by_seed.values()], 1, 3)} | {removed} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Run (or resume) the comparison and print its table."""
    args = parse_args(argv)
    setup_logging(False, ("automl_prune.baseline", "automl_prune.training", "automl_prune.evaluator"))
    return run_and_report("skip_compare.py", argv, args, run, report)


if __name__ == "__main__":
    sys.exit(main())

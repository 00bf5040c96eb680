"""Benchmark: does a policy learned at one budget speed up a search at another (AMC's transfer)?

For every agent and seed: the agent learns at ``--source`` FLOPs (``--evaluations`` evaluations)
and its policy is kept (what ``policy.pt`` holds); then two searches at ``--target`` FLOPs with
the same seed and evaluation count, one from scratch and one started from that policy
(``search.init_policy``: the networks start from the saved weights and DDPG skips its random
warm-up). Each search pays for its own evaluations (fresh evaluator cache). Reported per arm:
the evaluations needed to reach 99% of the best score either arm of the seed found (the
reference), the best score, and the mean score of the first and of the last 20 evaluations.

The score is the cheap one every search ranks by (BN-recalibrated search-val accuracy of the
pruned, un-fine-tuned model); the baseline is the converged resnet20 of the search-quality
benchmark (55,000 training images, 8 epochs; cached after its first training).

    python benchmarks/transfer.py --out transfer.md
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from _common import csv_ints, csv_list, int_at_least, load_average, run_header, setup_logging

from automl_prune.baseline import train_baseline
from automl_prune.data import load_dataset
from automl_prune.evaluator import Evaluator, EvaluatorConfig
from automl_prune.io import write_text
from automl_prune.models import ModelSpec
from automl_prune.search_spaces import SearchSpace
from automl_prune.strategy import make_strategy
from automl_prune.training import TrainConfig
from automl_prune.types import Budget, SearchResult

logger = logging.getLogger("benchmarks.transfer")

REACH = 0.99
"""Share of the reference score an arm must reach."""
WINDOW = 20
"""Evaluations in the "first" and "last" means."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options; the defaults are the saved-policies issue's protocol."""
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", default="resnet20", help="zoo model")
    p.add_argument("--epochs", type=float, default=8.0, help="baseline epochs (the search-quality baseline)")
    p.add_argument("--train-lr", type=float, default=0.1, help="baseline peak learning rate")
    p.add_argument("--agents", type=csv_list, default=["ddpg"], help="learning agents (comma-separated)")
    p.add_argument("--source", type=float, default=0.5, help="FLOPs fraction the policy is learned at")
    p.add_argument("--target", type=float, default=0.25, help="FLOPs fraction it is transferred to")
    p.add_argument("--evaluations", type=int_at_least(1), default=100, help="evaluations of every search")
    p.add_argument("--seeds", type=csv_ints, default=[0, 1, 2], help="seeds")
    p.add_argument("--eval-size", type=int_at_least(1), default=2000, help="search-val images per score")
    p.add_argument("--threads", type=int_at_least(1), default=2, help="torch intra-op threads")
    p.add_argument("--state", type=Path, default=Path("transfer.json"), help="results so far (resumable)")
    p.add_argument("--out", type=Path, default=None, help="also write the markdown report here (atomically)")
    return p.parse_args(argv)


def curve(result: SearchResult) -> list[float]:
    """The score of every evaluation in order (0 for an infeasible or failed one)."""
    return [e.accuracy if e.feasible else 0.0 for _, e in result.history]


def run(args: argparse.Namespace, state: dict[str, Any]) -> None:
    """Fill ``state`` with every (agent, seed)'s source, scratch and transfer curves."""
    data = load_dataset("fashion-mnist", val_size=5000, seed=0)
    spec = ModelSpec(args.model, data.in_channels, data.num_classes)
    model = train_baseline(spec, data, TrainConfig(epochs=args.epochs, lr=args.train_lr)).model
    config = EvaluatorConfig(eval_size=args.eval_size)
    evaluators = {f: Evaluator(model, data, Budget(flops=f), config) for f in (args.source, args.target)}
    spaces = {f: SearchSpace(ev) for f, ev in evaluators.items()}

    def search(agent: str, fraction: float, seed: int, policy: dict[str, Any] | None) -> Any:
        strategy = make_strategy(agent)
        if policy is not None:
            strategy.start_from(policy)
        evaluators[fraction].clear_cache()  # every search pays for its own evaluations
        result = strategy.search(evaluators[fraction], spaces[fraction], args.evaluations, seed=seed)
        return strategy, result

    for agent in args.agents:
        for seed in args.seeds:
            key = f"{agent}/seed{seed}"
            if key in state:
                continue
            logger.info("%s: learning at %g FLOPs", key, args.source)
            learner, source = search(agent, args.source, seed, None)
            policy = learner.policy_state()
            logger.info("%s: %g FLOPs from scratch", key, args.target)
            _, scratch = search(agent, args.target, seed, None)
            logger.info("%s: %g FLOPs from the %g policy", key, args.target, args.source)
            _, transfer = search(agent, args.target, seed, policy)
            state[key] = {
                "source": curve(source),
                "scratch": curve(scratch),
                "transfer": curve(transfer),
                "wall": [source.wall_time, scratch.wall_time, transfer.wall_time],
            }
            write_text(args.state, json.dumps(state, indent=1))


def reached(scores: list[float], threshold: float) -> int | None:
    """1-based index of the first evaluation scoring at least ``threshold`` (None if none does)."""
    return next((i + 1 for i, s in enumerate(scores) if s >= threshold), None)


def _ms(values: Sequence[float], digits: int = 4) -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def markdown(state: dict[str, Any], args: argparse.Namespace) -> str:
    """Per-seed rows and a per-agent summary."""
    lines = [
        f"{args.model} on Fashion-MNIST; policy learned at {args.source:g} FLOPs, searches at {args.target:g} FLOPs; "
        f"{args.evaluations} evaluations per search; reference = best score either arm of the seed found.",
        "",
        f"| agent | seed | arm | evaluations to {REACH:.0%} of reference | best | mean of first {WINDOW} | "
        f"mean of last {WINDOW} |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    summary: dict[tuple[str, str], dict[str, list[float]]] = {}
    for key, cell in sorted(state.items()):
        agent, seed = key.split("/")
        reference = max(max(cell["scratch"]), max(cell["transfer"]))
        for arm in ("scratch", "transfer"):
            scores = cell[arm]
            hit = reached(scores, REACH * reference)
            row = summary.setdefault((agent, arm), {"hit": [], "best": [], "first": [], "last": [], "missed": []})
            row["best"].append(max(scores))
            row["first"].append(statistics.mean(scores[:WINDOW]))
            row["last"].append(statistics.mean(scores[-WINDOW:]))
            if hit is None:
                row["missed"].append(1)
            else:
                row["hit"].append(hit)
            lines.append(
                f"| {agent} | {seed[4:]} | {arm} | {hit if hit is not None else 'not reached'} | {max(scores):.4f} | "
                f"{statistics.mean(scores[:WINDOW]):.4f} | {statistics.mean(scores[-WINDOW:]):.4f} |"
            )
    lines += [
        "",
        f"| agent | arm | evaluations to {REACH:.0%} (mean ± std) | best | mean of first {WINDOW} | "
        f"mean of last {WINDOW} |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for (agent, arm), row in sorted(summary.items()):
        hits = _ms(row["hit"], 1) + (f" ({len(row['missed'])} not reached)" if row["missed"] else "")
        lines.append(f"| {agent} | {arm} | {hits} | {_ms(row['best'])} | {_ms(row['first'])} | {_ms(row['last'])} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run (or resume) the benchmark and print the report."""
    args = parse_args(argv)
    setup_logging(False, quiet=("automl_prune",))
    torch.set_num_threads(args.threads)
    started, load_start = time.perf_counter(), load_average()
    state = json.loads(args.state.read_text()) if args.state.is_file() else {}
    run(args, state)
    report = run_header("transfer.py", argv, args.threads, load_start, started) + "\n\n" + markdown(state, args)
    print(report)
    if args.out is not None:
        write_text(args.out, report + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

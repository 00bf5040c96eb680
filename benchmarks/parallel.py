"""Evaluations per second of a search with 1 and 2 Ray workers, and the parallel efficiency.

Each worker runs with one torch thread and holds the model and data once. The strategy is
`random` asking a worker-sized batch at a time; the driver's cache is cleared between
runs so every evaluation is fresh. A serial in-process run (1 and 2 torch threads) is
shown for reference. Then:

- every agent (``--agents``) with 1 and 2 workers: REINFORCE scores an update's episodes
  and PPO a rollout's episodes together on the workers; DDPG scores one plan at a time;
- one deliberately slow plan (``--slow-seconds`` longer than the others) in a stream of
  ``random`` plans asked 8 at a time, on 2 workers: the pool gives each plan to the next
  free worker, so the other worker keeps going while the slow plan runs.

With ``--busy N`` it measures instead on a loaded machine: ``N`` CPU-bound processes (at the
default niceness, as any other job on a shared machine) run beside a serial search and a search
on 2 Ray workers started at Ray's default worker niceness (15) and at the niceness a local
search uses (0).

    python benchmarks/parallel.py --evaluations 24
    python benchmarks/parallel.py --busy 2 --evaluations 8
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone

import numpy as np
import torch
from _common import cpu_model, csv_ints

from automl_prune.baseline import train_baseline
from automl_prune.data import load_dataset
from automl_prune.evaluator import Evaluator, EvaluatorConfig
from automl_prune.models import ModelSpec
from automl_prune.parallel import EvaluatorSpec, RayEvaluatorPool, spec_for
from automl_prune.search_spaces import SearchSpace
from automl_prune.strategy import get_strategy
from automl_prune.training import TrainConfig
from automl_prune.types import Budget, Plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="fashion_cnn")
    parser.add_argument("--evaluations", type=int, default=24)
    parser.add_argument("--eval-size", type=int, default=2000)
    parser.add_argument("--workers", type=csv_ints, default=[1, 2], help="worker counts to measure (comma-separated)")
    parser.add_argument("--agents", default="reinforce,ddpg,ppo", help="agents measured with 1 and 2 workers")
    parser.add_argument("--slow-seconds", type=float, default=5.0, help="extra time of the one slow plan")
    parser.add_argument(
        "--busy", type=int, default=0, help="measure beside this many CPU-bound processes (niceness 15 vs 0) only"
    )
    args = parser.parse_args()

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    data = load_dataset("fashion-mnist")
    spec = ModelSpec(args.model, data.in_channels, data.num_classes)
    model = train_baseline(spec, data, TrainConfig(epochs=3)).model
    evaluator = Evaluator(model, data, Budget(flops=0.5), EvaluatorConfig(eval_size=args.eval_size))
    space = SearchSpace(evaluator)
    if args.busy > 0:
        under_load(args, spec, evaluator, space)
        return
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        evaluator.clear_cache()
        start = time.perf_counter()
        get_strategy("random", batch_size=1).search(evaluator, space, args.evaluations, seed=0)
        rows.append((f"serial, {threads} torch thread(s)", args.evaluations / (time.perf_counter() - start)))
    torch.set_num_threads(1)
    per_worker = {}
    for workers in args.workers:
        with RayEvaluatorPool(spec_for(evaluator, spec, "fashion-mnist"), workers=workers) as pool:
            pool.evaluate_many([space.plan_from_keeps([1.0] * space.dim)] * workers)  # warm the workers up
            evaluator.clear_cache()
            start = time.perf_counter()
            get_strategy("random", batch_size=workers).search(
                evaluator, space, args.evaluations, seed=0, evaluate_many=pool.evaluate_many_cached(evaluator)
            )
            rate = args.evaluations / (time.perf_counter() - start)
        per_worker[workers] = rate
        rows.append((f"Ray, {workers} worker(s) x 1 thread", rate))
    agent_rows = []
    for agent in [a for a in args.agents.split(",") if a]:
        rates = []
        for workers in (1, 2):
            with RayEvaluatorPool(spec_for(evaluator, spec, "fashion-mnist"), workers=workers) as pool:
                pool.evaluate_many([space.plan_from_keeps([1.0] * space.dim)] * workers)
                evaluator.clear_cache()
                start = time.perf_counter()
                get_strategy(agent).search(
                    evaluator, space, args.evaluations, seed=0, evaluate_many=pool.evaluate_many_cached(evaluator)
                )
                rates.append(args.evaluations / (time.perf_counter() - start))
        agent_rows.append((agent, *rates))
    slow_rows = []
    if args.slow_seconds > 0:
        base = spec_for(evaluator, spec, "fashion-mnist")
        first = space.sample(np.random.default_rng(0))  # the first plan `random` asks with seed 0
        for slow in (False, True):
            slowed = SlowPlan(**vars(base), seconds=args.slow_seconds if slow else 0.0, plan=first)
            with RayEvaluatorPool(slowed, workers=2) as pool:
                pool.evaluate_many([space.plan_from_keeps([1.0] * space.dim)] * 2)
                evaluator.clear_cache()
                start = time.perf_counter()
                get_strategy("random", batch_size=8).search(
                    evaluator, space, args.evaluations, seed=0, evaluate_many=pool.evaluate_many_cached(evaluator)
                )
                elapsed = time.perf_counter() - start
                slow_rows.append((slow, args.evaluations / elapsed, elapsed, pool.placements))
    print_header(args, f"load average {os.getloadavg()[0]:.2f}")
    print()
    print("| setting | evaluations/s |")
    print("|---|---:|")
    for name, rate in rows:
        print(f"| {name} | {rate:.2f} |")
    if 1 in per_worker and 2 in per_worker:
        print()
        print(
            f"Parallel efficiency with 2 workers: {per_worker[2] / (2 * per_worker[1]):.0%} "
            f"(speed-up x{per_worker[2] / per_worker[1]:.2f} over 1 worker)"
        )

    if agent_rows:
        print()
        print("| agent | evaluations/s, 1 worker | 2 workers | speed-up |")
        print("|---|---:|---:|---:|")
        for agent, one, two in agent_rows:
            print(f"| {agent} | {one:.2f} | {two:.2f} | x{two / one:.2f} |")
    if slow_rows:
        print()
        print(f"`random` asking 8 plans at a time on 2 workers, {args.evaluations} evaluations:")
        print()
        print("| stream | evaluations/s | wall s | plans on worker 0 / 1 |")
        print("|---|---:|---:|---:|")
        for slow, rate, elapsed, placements in slow_rows:
            counts = [sum(1 for p in placements[2:] if p.worker == w) for w in (0, 1)]
            name = f"one plan {args.slow_seconds:g} s slower" if slow else "no slow plan"
            print(f"| {name} | {rate:.2f} | {elapsed:.1f} | {counts[0]} / {counts[1]} |")


def print_header(args: argparse.Namespace, load: str) -> None:
    """The machine, date, ``load`` and setting lines above the tables."""
    print(f"- Machine: {cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}")
    print(f"- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {load}")
    print(
        f"- {args.model} on Fashion-MNIST, FLOPs <= 50%, eval_size {args.eval_size}, {args.evaluations} fresh evaluations per row"
    )


@contextlib.contextmanager
def busy_processes(count: int) -> Iterator[None]:
    """``count`` CPU-bound processes at the default niceness, for as long as the block runs."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        time.sleep(2.0)  # let the load settle
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def under_load(args: argparse.Namespace, spec: ModelSpec, evaluator: Evaluator, space: SearchSpace) -> None:
    """Serial vs 2 Ray workers at worker niceness 15 and 0, beside ``args.busy`` busy processes."""
    rows = []
    with busy_processes(args.busy):
        torch.set_num_threads(2)
        evaluator.clear_cache()
        start = time.perf_counter()
        get_strategy("random", batch_size=1).search(evaluator, space, args.evaluations, seed=0)
        rows.append(("serial, 2 torch threads", args.evaluations / (time.perf_counter() - start)))
        torch.set_num_threads(1)
        for niceness in (15, 0):
            os.environ["RAY_worker_niceness"] = str(niceness)  # read by the raylet the pool starts
            started = time.perf_counter()
            pool = RayEvaluatorPool(spec_for(evaluator, spec, "fashion-mnist"), workers=2, start_timeout=1800)
            with pool:
                pool.evaluate_many([space.plan_from_keeps([1.0] * space.dim)] * 2)  # warm the workers up
                print(f"workers at niceness {niceness} up after {time.perf_counter() - started:.0f} s", flush=True)
                niceness_seen = {os.getpriority(os.PRIO_PROCESS, pid) for pid in pool.worker_pids()}
                evaluator.clear_cache()
                start = time.perf_counter()
                get_strategy("random", batch_size=2).search(
                    evaluator, space, args.evaluations, seed=0, evaluate_many=pool.evaluate_many_cached(evaluator)
                )
                rate = args.evaluations / (time.perf_counter() - start)
            rows.append((f"Ray, 2 workers x 1 thread, workers at niceness {sorted(niceness_seen)}", rate))
        load = os.getloadavg()[0]
    print_header(args, f"{args.busy} busy processes, load average {load:.2f}")
    print()
    print("| setting | evaluations/s | vs serial |")
    print("|---|---:|---:|")
    serial = rows[0][1]
    for name, rate in rows:
        print(f"| {name} | {rate:.3f} | x{rate / serial:.2f} |")


@dataclasses.dataclass
class SlowPlan(EvaluatorSpec):
    """An evaluator spec whose evaluators take ``seconds`` longer to score one given plan."""

    seconds: float = 0.0
    plan: Plan | None = None

    def build(self) -> Evaluator:
        evaluator = super().build()
        evaluate, seconds, slow = evaluator.evaluate, self.seconds, self.plan

        def evaluate_slowly(plan: Plan) -> object:
            if seconds and plan == slow:
                time.sleep(seconds)
            return evaluate(plan)

        evaluator.evaluate = evaluate_slowly
        return evaluator


if __name__ == "__main__":
    main()

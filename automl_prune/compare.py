"""Compare strategies on equal budgets: every (strategy, seed) search runs as its own Ray task.

Each task builds its evaluator from the same :class:`~automl_prune.parallel.EvaluatorSpec`
(so every strategy scores plans identically and no cache is shared between them) and
runs one search with the same evaluation budget; up to ``workers`` tasks run at once.
With ``workers=1`` the searches run one after another in this process, each with a fresh
evaluator cache.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from automl_prune.errors import InvalidValueError
from automl_prune.evaluator import Evaluator
from automl_prune.parallel import EvaluatorSpec, connect_ray, start_local_ray
from automl_prune.progress import Progress
from automl_prune.search_spaces import SearchSpace
from automl_prune.strategy import STRATEGIES, make_strategy
from automl_prune.types import SearchResult

logger = logging.getLogger(__name__)


def _search(
    evaluator: Evaluator,
    strategy: str,
    seed: int,
    evaluations: int,
    space_kwargs: dict[str, Any],
    options: Mapping[str, Any],
    on_evaluation: Callable[[], None] | None = None,
) -> SearchResult:
    kwargs = dict(space_kwargs)
    kwargs["skip_gates"] = kwargs.get("skip_gates", False) or strategy == "skipnet"
    callbacks = [] if on_evaluation is None else [lambda session, plan, evaluation: on_evaluation()]
    return make_strategy(strategy, options).search(
        evaluator, SearchSpace(evaluator, **kwargs), evaluations, seed=seed, callbacks=callbacks
    )


class _Counter:
    """Evaluations done by every search of a comparison (a Ray actor the searches report to)."""

    def __init__(self) -> None:
        self.count = 0

    def add(self, n: int = 1) -> None:
        self.count += n

    def total(self) -> int:
        return self.count


def _remote_search(
    spec: EvaluatorSpec,
    strategy: str,
    seed: int,
    evaluations: int,
    space_kwargs: dict[str, Any],
    options: Mapping[str, Any],
    threads: int,
    counter: Any = None,
) -> SearchResult:
    torch.set_num_threads(threads)
    report = None if counter is None else (lambda: counter.add.remote(1))
    return _search(spec.build(), strategy, seed, evaluations, space_kwargs, options, report)


def run_comparison(
    spec: EvaluatorSpec,
    strategies: Sequence[str],
    seeds: Sequence[int],
    evaluations: int,
    space_kwargs: dict[str, Any] | None = None,
    workers: int = 1,
    address: str | None = None,
    evaluator: Evaluator | None = None,
    cpus_per_worker: int = 1,
    gpus_per_worker: float = 0.0,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, list[SearchResult]]:
    """Run every strategy with every seed on the same evaluation budget.

    Args:
        spec: How to build the evaluator (model, data, budget, scoring).
        strategies: Registered strategy names.
        seeds: Seeds, the same set for every strategy.
        evaluations: Evaluation budget of each search.
        space_kwargs: ``SearchSpace`` options (``min_keep``, ``levels``, ``skip_gates``).
        workers: Searches run at once on Ray; 1 runs them here, one after another.
        address: Ray cluster address; None starts Ray locally.
        evaluator: An evaluator already built from ``spec`` (used when ``workers == 1``).
        cpus_per_worker: CPUs each search task reserves on Ray.
        gpus_per_worker: GPU fraction each search task reserves on Ray.
        options: Strategy name -> its options (``search.<name>.*``); defaults where absent.

    Returns:
        Strategy name -> one result per seed, in seed order.
    """
    for name in strategies:
        STRATEGIES.get(name)
    if not seeds:
        raise InvalidValueError("give at least one seed")
    space_kwargs = dict(space_kwargs or {})
    options = {name: dict((options or {}).get(name, {})) for name in strategies}
    jobs = [(s, seed) for s in strategies for seed in seeds]
    results: dict[str, list[SearchResult]] = {s: [] for s in strategies}
    bar = Progress(len(jobs) * evaluations, "compare", "eval")
    bar.set_postfix(searches=f"0/{len(jobs)}")
    try:
        if workers <= 1 and address is None:
            local = evaluator or spec.build()
            for i, (strategy, seed) in enumerate(jobs):
                local.clear_cache()
                results[strategy].append(
                    _search(local, strategy, seed, evaluations, space_kwargs, options[strategy], bar.update)
                )
                bar.set_postfix(searches=f"{i + 1}/{len(jobs)}")
            return results
        import ray

        started = not ray.is_initialized()
        if started:
            if address is None:
                start_local_ray(workers, cpus_per_worker)
            else:
                connect_ray(address)
        try:
            task = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker)(_remote_search)
            spec_ref = ray.put(spec)
            counter = ray.remote(num_cpus=0)(_Counter).remote()
            refs = {
                task.remote(spec_ref, s, seed, evaluations, space_kwargs, options[s], cpus_per_worker, counter): (
                    s,
                    seed,
                )
                for s, seed in jobs
            }
            done: dict[tuple[str, int], SearchResult] = {}
            pending = list(refs)
            while pending:
                ready, pending = ray.wait(pending, num_returns=1, timeout=2.0)
                for ref in ready:
                    done[refs[ref]] = ray.get(ref)
                bar.update(ray.get(counter.total.remote()) - bar.n)
                bar.set_postfix(searches=f"{len(done)}/{len(jobs)}")
            for strategy, seed in jobs:
                results[strategy].append(done[(strategy, seed)])
        finally:
            if started:
                ray.shutdown()
    finally:
        bar.close()
    return results

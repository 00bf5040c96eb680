"""Strategy comparison on equal budgets, as a Ray Tune experiment (``automl-prune compare``).

Each (strategy, seed) is one Tune trial with its own resources (``parallel.cpus_per_worker``,
``parallel.gpus_per_worker``); as many run at once as the Ray cluster has room for
(``parallel.workers`` on this machine, or an existing cluster by ``parallel.ray_address``).
A trial builds the evaluator from the same :class:`~automl_prune.parallel.EvaluatorSpec`,
runs the strategy with its options and reports after every evaluation (``evaluations``,
``best_score`` so far, ...), so Tune writes its standard per-trial files: ``progress.csv``,
``result.json`` and TensorBoard event files of the best-so-far score against evaluations,
under ``OUT/trials/compare/<label>_seed<seed>/``. The last report carries the whole search
(``search.json`` in the trial's checkpoint), from which ``comparison.md/.csv`` and the plots
are written. A trial whose worker dies is retried (``FailureConfig``); an interrupted or
crashed comparison resumes with ``Tuner.restore`` and runs only the trials that had not
finished.

A strategy may appear several times with other options: ``ddpg(warmup_episodes=100)`` or
``optuna(sampler=cmaes)`` in ``compare.strategies`` (options are the strategy's
``search.<name>.*`` keys, validated like them; the rest keep the config's values), so an
ablation is one command.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from automl_prune.errors import AutomlPruneError, InvalidValueError
from automl_prune.parallel import EvaluatorSpec, connect_ray, fit_tuner, start_local_ray
from automl_prune.progress import Progress
from automl_prune.strategy import STRATEGIES, make_strategy, space_for
from automl_prune.strategy_options import split_variant
from automl_prune.types import SearchResult

__all__ = ["EXPERIMENT", "Entry", "parse_entries", "run_comparison"]

logger = logging.getLogger(__name__)

EXPERIMENT = "compare"
"""Name of the Tune experiment under ``OUT/trials``."""
SEARCH_FILE = "search.json"
MAX_FAILURES = 2
"""Retries of a trial whose worker died or raised."""


@dataclass(frozen=True)
class Entry:
    """One strategy of a comparison: its label as given, its registry name and its full options."""

    label: str
    strategy: str
    options: dict[str, Any] = field(default_factory=dict)


def parse_entries(texts: Sequence[str], search: Any) -> list[Entry]:
    """``compare.strategies`` as entries: ``name`` or ``name(key=value, ...)`` with the strategy's option keys.

    Args:
        texts: The entries as written.
        search: The config's ``search`` section (the options not given keep its values).

    Raises:
        UnknownNameError: An unknown strategy (listing the valid ones).
        InvalidValueError: An unknown option (naming the nearest) or a bad value.
    """
    from automl_prune.config import OPTIONS, check_value, unknown_key_error

    entries = []
    for text in texts:
        name, given = split_variant(text)
        STRATEGIES.get(name)
        options = search.options_of(name)
        for key, raw in given.items():
            path = f"search.{name}.{key}"
            if path not in OPTIONS:
                raise unknown_key_error(path, f"option in compare.strategies '{text}':")
            options[key] = check_value(OPTIONS[path], raw, f"'{key}' in compare.strategies '{text}'")
        label = name if not given else f"{name}({', '.join(f'{k}={v}' for k, v in given.items())})"
        entries.append(Entry(label, name, options))
    labels = [e.label for e in entries]
    if len(set(labels)) != len(labels):
        raise InvalidValueError(f"compare.strategies names an entry twice: {', '.join(labels)}")
    return entries


def _dirname(label: str, seed: int) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", label).strip("_") + f"_seed{seed}"


def _trial(params: dict[str, Any], *, spec: EvaluatorSpec) -> None:
    """One (strategy, seed) search, run by Ray Tune: a report per evaluation, the whole search in the last one."""
    import ray
    from ray import tune

    torch.set_num_threads(int(params["threads"]))
    entry = params["entry"]
    evaluator = spec.build()
    space = space_for(entry["strategy"], evaluator, **params["space"])  # static_skip gets its skip gates
    pending: list[dict[str, Any]] = []

    def on_evaluation(session: Any, plan: Any, evaluation: Any) -> None:
        if pending:
            tune.report(pending.pop())
        best = session.best()
        pending.append(
            {
                "evaluations": session.used,
                "best_score": best[1].reward if best else math.nan,
                "best_accuracy": best[1].accuracy if best else math.nan,
                "accuracy": evaluation.accuracy,
                "flops_ratio": evaluation.flops_ratio,
                "feasible": evaluation.feasible,
            }
        )

    strategy = make_strategy(entry["strategy"], entry["options"])
    result = strategy.search(
        evaluator, space, int(params["evaluations"]), seed=int(params["seed"]), callbacks=[on_evaluation]
    )
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / SEARCH_FILE).write_text(json.dumps(result.to_dict()))
        final = pending.pop() if pending else {"evaluations": 0}
        node = ray.get_runtime_context().get_node_id()  # which cluster node ran the trial
        tune.report(
            {**final, "wall_time": result.wall_time, "node": node}, checkpoint=tune.Checkpoint.from_directory(tmp)
        )


def _progress(total: int) -> Any:
    """A Tune callback that counts evaluations (one report each) on a progress bar."""
    from ray import tune

    class Counted(tune.Callback):
        def __init__(self) -> None:
            self.bar = Progress(total, "compare", "eval")
            self.finished = 0

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            self.bar.update(1)
            if math.isfinite(result.get("best_accuracy", math.nan)):
                self.bar.set_postfix(last_best=f"{result['best_accuracy']:.4f}")

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.finished += 1
            self.bar.set_postfix(searches=f"{self.finished}/{len(trials)}")

        def on_experiment_end(self, trials: list, **info: Any) -> None:
            self.bar.close()

    return Counted()


def run_comparison(
    spec: EvaluatorSpec,
    entries: Sequence[Entry],
    seeds: Sequence[int],
    evaluations: int,
    out: str | Path,
    space_kwargs: Mapping[str, Any] | None = None,
    workers: int = 1,
    address: str | None = None,
    cpus_per_worker: int = 1,
    gpus_per_worker: float = 0.0,
) -> dict[str, list[SearchResult]]:
    """Run every entry with every seed on the same evaluation budget, as one Tune experiment in ``out/trials``.

    An experiment already in ``out/trials`` (an interrupted comparison) is restored: its finished
    trials are kept, the others run (again).

    Args:
        spec: How a trial builds the evaluator (model, data, budget, scoring).
        entries: The strategies with their options (:func:`parse_entries`).
        seeds: Seeds, the same set for every entry.
        evaluations: Evaluation budget of each search.
        out: The comparison's directory.
        space_kwargs: ``SearchSpace`` options (``min_keep``, ``skip_gates``).
        workers: Trials at once on this machine (when Ray is started here).
        address: An existing Ray cluster; None starts Ray here.
        cpus_per_worker: CPUs (and torch threads) each trial reserves.
        gpus_per_worker: GPU fraction each trial reserves.

    Returns:
        Entry label -> one result per seed, in the order of ``seeds``.

    Raises:
        AutomlPruneError: A trial still failed after its retries (the comparison can be resumed).
    """
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's console tables off: progress comes from our bar
    import ray
    from ray import tune

    if not seeds:
        raise InvalidValueError("give at least one seed")
    if not entries:
        raise InvalidValueError("give at least one strategy")
    storage = (Path(out) / "trials").resolve()
    experiment = storage / EXPERIMENT
    started = not ray.is_initialized()
    if started:
        if address is None:
            start_local_ray(workers, cpus_per_worker)
        else:
            connect_ray(address)
    try:
        trainable = tune.with_resources(
            tune.with_parameters(_trial, spec=spec), {"cpu": cpus_per_worker, "gpu": gpus_per_worker}
        )
        if tune.Tuner.can_restore(str(experiment)):
            logger.warning("resuming the comparison in %s: finished trials are kept", experiment)
            tuner = tune.Tuner.restore(
                str(experiment), trainable, resume_errored=True, restart_errored=False, resume_unfinished=True
            )
        else:
            tuner = tune.Tuner(
                trainable,
                param_space={
                    "entry": tune.grid_search(
                        [{"label": e.label, "strategy": e.strategy, "options": e.options} for e in entries]
                    ),
                    "seed": tune.grid_search(list(seeds)),
                    "evaluations": evaluations,
                    "space": dict(space_kwargs or {}),
                    "threads": cpus_per_worker,
                },
                tune_config=tune.TuneConfig(
                    trial_dirname_creator=lambda t: _dirname(t.config["entry"]["label"], t.config["seed"]),
                    reuse_actors=True,
                ),
                run_config=tune.RunConfig(
                    name=EXPERIMENT,
                    storage_path=str(storage),
                    verbose=0,
                    failure_config=tune.FailureConfig(max_failures=MAX_FAILURES),
                    callbacks=[_progress(len(entries) * len(seeds) * evaluations)],
                ),
            )
        grid = fit_tuner(tuner)  # a Ctrl-C leaves the experiment's state saved: resumable
    finally:
        if started:
            ray.shutdown()
    done: dict[tuple[str, int], SearchResult] = {}
    failed = []
    for result in grid:
        if result.error is not None:
            failed.append(f"{Path(result.path).name}: {str(result.error).strip().splitlines()[-1]}")
            continue
        label, seed = result.config["entry"]["label"], int(result.config["seed"])
        done[(label, seed)] = SearchResult.from_dict(
            json.loads((Path(result.checkpoint.path) / SEARCH_FILE).read_text())
        )
    if failed:
        raise AutomlPruneError(
            f"{len(failed)} trial(s) failed after {MAX_FAILURES} retries; the first: {failed[0]} "
            f"(finished trials are kept: `automl-prune compare --resume {out}` runs the others again)"
        )
    return {e.label: [done[(e.label, seed)] for seed in seeds] for e in entries}

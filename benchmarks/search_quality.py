"""Benchmark: search quality on converged baselines, with and without refinement and distillation.

The protocol of the refinement issue. Fashion-MNIST split 55,000 train / 5,000 search-val /
10,000 test; dense baselines trained to a plateau (the search-val curve's last epochs are
printed); for every model, FLOPs budget, seed and strategy:

1. the search, with a fresh evaluator cache and an equal count of cheap evaluations
   (BN-recalibrated search-val accuracy); ``uniform`` and ``global`` give a single plan;
2. the refinement of its best distinct plans (:func:`automl_prune.refine.refine`: successive
   halving of short fine-tunes scored on search-val, run as Ray Tune trials);
3. the plan the cheap score picks and the plan the refinement picks, each fine-tuned with one
   recipe (``--finetune-epochs`` on all 55,000 images from the model the search scored), with
   labels only and with distillation from the dense model, tested on all 10,000 test images.

The uniform plan is also refined alone, through every rung, on the same batches
(``MODEL/flopsF/seedS/reference`` in the state), and so is the global plan where the
``continued`` arm ran (``MODEL/flopsF/seedS/global/reference``). The pick ``refined+rules`` is
what the main job ships with ``search.refine_rules`` at its default (the uniform and global
plans as references that run every rung): the refinement's pick, or the rule's plan whose
last-rung score is higher; ``refined+uniform`` is the same with the uniform plan alone (the
earlier default).

A strategy named ``NAME+depth`` (``optuna+depth``) searches which residual blocks to remove
(skip gates) as well as keep ratios, as a strategy that needs skip gates (``static_skip``) always
does; its rows carry that name. A strategy named ``NAME@N`` (``static_skip@300``) searches with N
cheap evaluations instead of ``--evaluations``, so searches of two lengths share one record and
are paired with the same ``uniform`` and ``global`` fine-tunes.
The choice of a plan never looks at the test set. The table gives mean +- std over seeds and
the paired difference (same seed, same fine-tune arm) to ``uniform`` and to ``global``; a second
table gives every seed's accuracy and differences, a third distilled minus labels-only accuracy of
the same plan and seed, and a last one which seeds, strategies and fine-tune arms the state holds
per (model, budget), marking a grid run with fewer strategies than the protocol's as reduced. For the
``--rank-strategy`` search of every (budget, seed), every refined candidate is also fine-tuned
(labels only), giving the Spearman rank correlation of the cheap score and of the first-rung
refined score with the fine-tuned test accuracy; over the plans of the ``continued`` arm (what
ships), the same for the cheap and the last-rung score.

Every unit of work (a search, a refinement, a fine-tune) is stored in ``--state`` as it ends, so
an interrupted run continues where it stopped and a grid can be filled over several sessions;
the report is written from whatever the state holds. Training a baseline is not bit-reproducible
(three trainings of resnet20's recipe tested 93.46, 93.48 and 93.51%), so the state records the
baseline it was measured on and refuses another; ``--cache-dir benchmarks/results/cache`` uses the
recorded checkpoints kept in the repository, so a grid continues on any machine. Example (a small
check, then the grid)::

    python benchmarks/search_quality.py --models fashion_cnn --budgets 0.25 --seeds 0 --evaluations 20 \\
        --epochs fashion_cnn=1 --finetune-epochs 0.1 --refine-steps 10,30 --state /tmp/sq.json
    python benchmarks/search_quality.py --state search_quality.json --out search_quality.md
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from _common import csv_ints, csv_list, epochs_per_model, int_at_least, load_average, run_header, setup_logging
from scipy.stats import spearmanr

from automl_prune.baseline import train_baseline
from automl_prune.data import DataSplits, load_dataset
from automl_prune.evaluator import Evaluator, EvaluatorConfig
from automl_prune.finalists import candidates as best_distinct
from automl_prune.io import write_text
from automl_prune.measure.accuracy import evaluate_accuracy
from automl_prune.models import ModelSpec
from automl_prune.refine import Candidate, RefineConfig, Refinement, refine
from automl_prune.search_spaces import SearchSpace
from automl_prune.strategy import STRATEGIES, get_strategy
from automl_prune.training import TrainConfig, train
from automl_prune.types import Budget, Plan

logger = logging.getLogger("benchmarks.search_quality")

SINGLE_PLAN = ("uniform", "global")
"""Rules that give one plan: nothing to refine, and their cheap and refined choices coincide."""
PROTOCOL_STRATEGIES = ("uniform", "global", "random", "ddpg", "ppo", "reinforce", "abc", "optuna")
"""The issue's strategies; a (model, budget) with fewer is reported as a reduced grid."""
DEPTH = "+depth"
"""Suffix of a strategy that also searches which blocks to remove (skip gates), e.g. ``optuna+depth``."""
LENGTH = "@"
"""Separator of a strategy's own count of cheap evaluations, e.g. ``static_skip@300``."""
ARMS = {"labels": 0.0, "distilled": 0.5, "continued": 0.0}
"""Fine-tune arms: the distillation weight of each (temperature ``--distill-temperature``)."""
CONTINUED = "continued"
"""The arm that fine-tunes a refined plan from its weights after the refinement's last rung (labels only), as
the main job does (``finetune.from_refinement``); uniform and global are refined alone for it."""


# --------------------------------------------------------------------------- arguments


def _floats(value: str) -> list[float]:
    out = [float(v) for v in csv_list(value)]
    if not out or any(not 0.0 < f < 1.0 for f in out):
        raise argparse.ArgumentTypeError(f"expected FLOPs fractions in (0, 1), got {value!r}")
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options; the defaults are the issue's protocol."""
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--models", type=csv_list, default=["resnet20", "mobilenetv2"], help="comma-separated zoo models")
    p.add_argument("--budgets", type=_floats, default=[0.25, 0.125], help="FLOPs fractions of the dense model")
    p.add_argument(
        "--strategies",
        type=csv_list,
        default=list(PROTOCOL_STRATEGIES),
        help=f"strategies; NAME{DEPTH} also searches which residual blocks to remove, NAME{LENGTH}N runs N evaluations",
    )
    p.add_argument("--evaluations", type=int_at_least(1), default=300, help="cheap evaluations per search")
    p.add_argument("--seeds", type=csv_ints, default=[0, 1, 2], help="search, refinement and fine-tune seeds")
    p.add_argument("--epochs", type=epochs_per_model, default={}, help="baseline epochs per model, MODEL=EPOCHS,...")
    p.add_argument("--default-epochs", type=float, default=8.0, help="baseline epochs of models not in --epochs")
    p.add_argument("--train-lr", type=float, default=0.1, help="baseline peak learning rate")
    p.add_argument("--eval-size", type=int_at_least(1), default=2000, help="search-val images per cheap score")
    p.add_argument("--recal-batches", type=int_at_least(1), default=8, help="BN recalibration batches")
    p.add_argument("--criterion", default="l1", help="importance criterion")
    p.add_argument("--min-keep", type=float, default=0.1, help="smallest keep ratio of any group")
    p.add_argument("--round-to", type=int_at_least(1), default=1, help="channel multiple of pruned widths")
    p.add_argument("--refine-top", type=int_at_least(0), default=8, help="distinct plans refined (0 = no refinement)")
    p.add_argument("--refine-steps", type=csv_ints, default=[50, 150, 450], help="cumulative fine-tune steps per rung")
    p.add_argument("--finetune-epochs", type=float, default=1.0, help="epochs of the fine-tune recipe")
    p.add_argument("--finetune-lr", type=float, default=0.01, help="peak learning rate of the fine-tune recipe")
    p.add_argument("--arms", type=csv_list, default=list(ARMS), help="fine-tune arms: labels, distilled, continued")
    p.add_argument("--distill-temperature", type=float, default=4.0, help="distillation temperature")
    p.add_argument("--rank-strategy", default="random", help="whose refined candidates are all fine-tuned (Spearman)")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST directory (default: the dataset's default)")
    add_cache_dir_argument(p)
    p.add_argument("--threads", type=int_at_least(1), default=2, help="torch intra-op threads")
    p.add_argument("--state", type=Path, default=Path("search_quality.json"), help="results so far (resumable)")
    p.add_argument("--work-dir", type=Path, default=None, help="refinement run directories (default: beside --state)")
    p.add_argument("--report-only", action="store_true", help="write the report from --state without computing")
    p.add_argument("--out", type=Path, default=None, help="also write the markdown report here (atomically)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = p.parse_args(argv)
    unknown = [s for s in [*args.strategies, args.rank_strategy] if base_strategy(s) not in STRATEGIES]
    if unknown:
        p.error(STRATEGIES.unknown_message(unknown[0]))
    for name in args.strategies:
        try:
            evaluations_of(name, args.evaluations)
        except ValueError:
            p.error(
                f"bad strategy entry {name!r}: after {LENGTH!r} give a positive count of evaluations, e.g. optuna@300"
            )
    bad_arms = [a for a in args.arms if a not in ARMS]
    if bad_arms:
        p.error(f"unknown fine-tune arm {bad_arms[0]!r}; valid arms: {', '.join(ARMS)}")
    if not args.seeds:
        p.error("--seeds needs at least one seed")
    if args.refine_steps != sorted(set(args.refine_steps)) or min(args.refine_steps) < 1:
        p.error("--refine-steps must be increasing positive step counts, e.g. 50,150,450")
    if args.work_dir is None:
        args.work_dir = args.state.with_suffix(".runs")
    return args


def base_strategy(name: str) -> str:
    """The registered strategy behind a grid entry (``optuna+depth@300`` -> ``optuna``)."""
    return name.partition(LENGTH)[0].removesuffix(DEPTH)


def evaluations_of(name: str, default: int) -> int:
    """The cheap evaluations of a grid entry: N for ``NAME@N``, else ``default``.

    Raises:
        ValueError: The count after ``@`` is not a positive integer.
    """
    _, sep, count = name.partition(LENGTH)
    if not sep:
        return default
    if not count.isdigit() or int(count) < 1:
        raise ValueError(f"not a positive count of evaluations: {count!r}")
    return int(count)


def searches_depth(name: str) -> bool:
    """Whether a grid entry's search space has skip gates (blocks to remove) besides keep ratios."""
    return name.partition(LENGTH)[0].endswith(DEPTH) or STRATEGIES.get(base_strategy(name)).needs_skip_gates


# --------------------------------------------------------------------------- state


class State:
    """Results by key, saved atomically after every unit of work."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, key: str, compute: Callable[..., Any], *args: Any) -> Any:
        """The stored result of ``key``, ``compute(*args)`` saved first when missing."""
        if key not in self.data:
            started = time.perf_counter()
            value = compute(*args)
            logger.info("%s: done in %.0f s", key, time.perf_counter() - started)
            self.data[key] = value
            write_text(self.path, json.dumps(self.data, indent=1, sort_keys=True) + "\n")
        return self.data[key]


def plan_key(plan: Plan) -> str:
    """A short stable name of a plan (fine-tunes of equal plans are shared)."""
    return hashlib.sha256(json.dumps(plan.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- the benchmark


def finetune_test(
    ev: Evaluator,
    plan: Plan,
    data: DataSplits,
    teacher: torch.nn.Module,
    arm: str,
    seed: int,
    args,
    start: dict[str, torch.Tensor] | None = None,
) -> float:
    """Test accuracy of ``plan``'s scored model (with the weights ``start`` if given) after the recipe's fine-tune in ``arm``."""
    model = ev.build(plan)
    if start is not None:
        model.load_state_dict(start)
    config = TrainConfig(
        epochs=args.finetune_epochs,
        lr=args.finetune_lr,
        seed=seed,
        eval_every_epoch=False,
        distill_weight=ARMS[arm],
        distill_temperature=args.distill_temperature,
    )
    tuned = train(model, data, config, description=f"finetune ({arm})", teacher=teacher).model
    return evaluate_accuracy(tuned, data.test)


def baseline_record(base: Any, epochs: float, data: DataSplits) -> dict[str, Any]:
    """The baseline's epochs, test accuracy and search-val curve."""
    return {
        "epochs": epochs,
        "test": evaluate_accuracy(base.model, data.test),
        "curve": [r.get("val_accuracy") for r in base.info.meta.get("history", [])],
    }


def add_cache_dir_argument(p: argparse.ArgumentParser) -> None:
    """The ``--cache-dir`` option of the benchmarks that keep a record of their baselines."""
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="baseline cache (default: the user cache); benchmarks/results/cache holds the recorded ones",
    )


def recorded_baseline(state: State, name: str, data: DataSplits, epochs: float, args: argparse.Namespace) -> Any:
    """The baseline of ``name`` from ``args.cache_dir`` (trained there if missing), checked against the record."""
    base = train_baseline(
        ModelSpec(name, data.in_channels, data.num_classes),
        data,
        TrainConfig(epochs=epochs, lr=args.train_lr),
        args.cache_dir,
    )
    same_baseline(state, name, base, epochs, data)
    return base


def same_baseline(state: State, name: str, base: Any, epochs: float, data: DataSplits) -> None:
    """Record the baseline of ``name`` the first time; afterwards refuse one that differs from the record.

    A baseline trained again (another machine, a cleared cache) can differ in its last digits, and the
    stored results were measured on the recorded one: mixing the two would pair plans of different models.

    Raises:
        SystemExit: The baseline at hand scores otherwise than the recorded one on the test set.
    """
    key = f"{name}/baseline"
    had = key in state.data
    record = state.get(key, baseline_record, base, epochs, data)
    if had:
        test = evaluate_accuracy(base.model, data.test)
        if test != record["test"] or epochs != record["epochs"]:
            raise SystemExit(
                f"the {name} baseline at hand ({epochs:g} epochs, test {test:.4f}, {base.path}) is not the one the "
                f"results in {state.path} were measured on ({record['epochs']:g} epochs, test {record['test']:.4f}): "
                "give --cache-dir the cache that holds that checkpoint (benchmarks/results/cache keeps the "
                "recorded ones), or another --state to start a new record"
            )


def search_cell(strategy: str, seed: int, ev: Evaluator, space: SearchSpace, args) -> dict[str, Any]:
    """One search: its best plan by the cheap score and its best distinct plans (for refinement)."""
    ev._cache.clear()  # every search pays for its own evaluations
    evaluations = evaluations_of(strategy, args.evaluations)
    result = get_strategy(base_strategy(strategy)).search(ev, space, max_evaluations=evaluations, seed=seed)
    pool = best_distinct(ev, result.history, max(args.refine_top, 1))
    if not pool:  # no clean plan within the budget: the search's own best (reported as such)
        pool = [(result.best_plan, result.best_evaluation)]
    return {
        "evaluations": result.evaluations,
        "wall": result.wall_time,
        "pool": [{"plan": p.to_dict(), "cheap": e.accuracy, "flops_ratio": e.flops_ratio} for p, e in pool],
    }


def refinement_of(plans: list[Plan], ev: Evaluator, data: DataSplits, seed: int, run_dir: Path, args) -> Refinement:
    """The refinement of ``plans`` in ``run_dir`` (read back when it finished there, else run)."""
    cands = [Candidate(p, ev.evaluate(p)) for p in plans]
    config = RefineConfig(top=len(cands), steps=tuple(args.refine_steps), seed=seed)
    return refine(cands, [ev.build(p) for p in plans], data.train, data.search_val, config, run_dir)


def refine_cell(search: dict[str, Any], ev: Evaluator, data: DataSplits, seed: int, run_dir: Path, args) -> dict:
    """The refinement of a search's pool: each candidate's rung scores and the chosen index."""
    refinement = refinement_of([Plan.from_dict(c["plan"]) for c in search["pool"]], ev, data, seed, run_dir, args)
    return {
        "chosen": refinement.chosen,
        "scores": [{str(k): v for k, v in c.scores.items()} for c in refinement.candidates],
    }


def reference_cell(search: dict[str, Any], ev: Evaluator, data: DataSplits, seed: int, run_dir: Path, args) -> dict:
    """A rule's plan (uniform: the reference the main job refines beside the finalists) refined alone: its scores."""
    plan = Plan.from_dict(search["pool"][0]["plan"])
    refinement = refinement_of([plan], ev, data, seed, run_dir, args)
    return {"plan": plan.to_dict(), "scores": {str(k): v for k, v in refinement.candidates[0].scores.items()}}


def refined_start(
    plans: list[Plan], index: int, recorded: dict[str, float], ev: Evaluator, data: DataSplits, seed: int, run_dir, args
) -> dict[str, torch.Tensor]:
    """Plan ``index``'s weights after its last rung of the refinement of ``plans`` (refined again if its run is gone)."""
    refinement = refinement_of(plans, ev, data, seed, run_dir, args)
    scores = {str(k): v for k, v in refinement.candidates[index].scores.items()}
    if scores != recorded:
        logger.warning("%s: refined again with other scores (%s, recorded %s)", run_dir, scores, recorded)
    weights = refinement.weights(index)
    if weights is None:
        raise SystemExit(
            f"{run_dir}: the refinement holds no checkpoint of plan {index}; remove the directory and rerun"
        )
    return weights


REFERENCES = {"refined+uniform": ("uniform",), "refined+rules": ("uniform", "global")}
"""The main job's picks with the rules' plans as references (``search.refine_rules``): which rules run the rungs."""


def reference_key(prefix: str, rule: str) -> str:
    """State key of ``rule``'s plan refined alone for ``prefix`` (its run directory is the key with ``_`` for ``/``)."""
    return f"{prefix}/reference" if rule == "uniform" else f"{prefix}/{rule}/reference"


def single_plan_rule(strategy: str) -> str:
    """The rule whose refined-alone record a single-plan strategy (``uniform``, ``global``) continues from."""
    return "uniform" if base_strategy(strategy) == "uniform" else strategy


def reference_dir(args: argparse.Namespace, key: str) -> Path:
    """The run directory of the refinement recorded under ``key`` (a :func:`reference_key`)."""
    return args.work_dir / key.replace("/", "_")


def reference_record(state: dict[str, Any], prefix: str, rule: str) -> dict[str, Any] | None:
    """The record of ``rule``'s plan refined alone (plan and rung scores) for ``prefix``, or None."""
    return state.get(reference_key(prefix, rule))


def reference_picks(
    state: dict[str, Any], prefix: str, search: dict[str, Any], refined: dict[str, Any]
) -> dict[str, tuple[dict[str, Any], dict[str, float], str]]:
    """What the main job ships with each set of rules as references, by pick name.

    Each value is (pool entry, rung scores, source): the refined pick (source ``""``), or the rule
    whose plan, refined alone on the same batches, scores higher at the last rung (the first such
    rule on a tie, as the main job orders them). A pick is left out where a rule's record is missing.
    """
    index = refined["chosen"]
    chosen = (search["pool"][index], refined["scores"][index], "")
    out = {}
    for name, rules in REFERENCES.items():
        records = [
            (rule, reference_record(state, prefix, rule), state.get(f"{prefix}/{rule}/search")) for rule in rules
        ]
        if any(r is None or s is None for _, r, s in records):
            continue
        best = chosen
        if chosen[1]:
            last = max(chosen[1], key=int)
            for rule, record, rule_search in records:
                if record["scores"].get(last, -1.0) > best[1].get(last, -1.0):
                    best = (rule_search["pool"][0], record["scores"], rule)
        out[name] = best
    return out


def run(args: argparse.Namespace, state: State) -> None:
    """Fill the state with every (model, budget, seed, strategy) of the grid."""
    data = load_dataset("fashion-mnist", args.data_dir, val_size=5000, seed=0)
    logger.info("data: %d train / %d search-val / %d test", len(data.train), len(data.search_val), len(data.test))
    for name in args.models:
        epochs = args.epochs.get(name, args.default_epochs)
        model = recorded_baseline(state, name, data, epochs, args).model
        for fraction in args.budgets:
            ev = Evaluator(
                model,
                data,
                Budget(flops=fraction),
                EvaluatorConfig(
                    criterion=args.criterion,
                    eval_size=args.eval_size,
                    recalibration_batches=args.recal_batches,
                    round_to=args.round_to,
                ),
            )
            spaces: dict[bool, SearchSpace] = {}  # with and without skip gates, each built when first needed
            for seed in args.seeds:
                for strategy in args.strategies:
                    cell = f"{name}/flops{fraction:g}/seed{seed}/{strategy}"
                    depth = searches_depth(strategy)
                    if depth not in spaces:
                        spaces[depth] = SearchSpace(ev, min_keep=args.min_keep, skip_gates=depth)
                    space = spaces[depth]
                    search = state.get(f"{cell}/search", search_cell, strategy, seed, ev, space, args)
                    chosen = {"cheap": 0}
                    if args.refine_top and base_strategy(strategy) not in SINGLE_PLAN and len(search["pool"]) > 1:
                        run_dir = args.work_dir / cell.replace("/", "_")
                        refined = state.get(f"{cell}/refine", refine_cell, search, ev, data, seed, run_dir, args)
                        chosen["refined"] = refined["chosen"]
                        prefix = f"{name}/flops{fraction:g}/seed{seed}"
                        if False not in spaces:
                            spaces[False] = SearchSpace(ev, min_keep=args.min_keep, skip_gates=False)
                        uniform = state.get(
                            f"{prefix}/uniform/search", search_cell, "uniform", seed, ev, spaces[False], args
                        )
                        key = reference_key(prefix, "uniform")
                        state.get(key, reference_cell, uniform, ev, data, seed, reference_dir(args, key), args)
                    plans = [Plan.from_dict(c["plan"]) for c in search["pool"]]
                    wanted = {(i, arm) for i in chosen.values() for arm in args.arms if arm != CONTINUED}
                    if strategy == args.rank_strategy and "refined" in chosen:
                        wanted |= {(i, "labels") for i in range(len(plans))}
                    for i, arm in sorted(wanted):
                        key = f"{name}/flops{fraction:g}/seed{seed}/finetune/{arm}/{plan_key(plans[i])}"
                        state.get(key, finetune_test, ev, plans[i], data, model, arm, seed, args)
                    if CONTINUED in args.arms:
                        continued_cells(state, cell, search, ev, data, model, seed, args)


def continued_cells(
    state: State, cell: str, search: dict[str, Any], ev: Evaluator, data: DataSplits, teacher, seed: int, args
) -> None:
    """The ``continued`` arm of a grid entry: its shipped plans fine-tuned from their weights after the last rung.

    uniform and global are refined alone (through every rung, on the same batches) for it; a
    searched strategy's refined pick continues from its refinement, and where a rule's reference
    leads that refinement's last rung (the ``refined+uniform`` and ``refined+rules`` picks), the
    rule's plan from its own.
    """
    prefix, _, strategy = cell.rpartition("/")
    todo: list[tuple[list[Plan], int, dict[str, float], Path]] = []
    if base_strategy(strategy) in SINGLE_PLAN:
        plan = Plan.from_dict(search["pool"][0]["plan"])
        key = reference_key(prefix, single_plan_rule(strategy))
        run_dir = reference_dir(args, key)
        record = state.get(key, reference_cell, search, ev, data, seed, run_dir, args)
        todo.append(([plan], 0, record["scores"], run_dir))
    else:
        refined = state.data.get(f"{cell}/refine")
        if refined is None:
            return
        plans = [Plan.from_dict(c["plan"]) for c in search["pool"]]
        index = refined["chosen"]
        todo.append((plans, index, refined["scores"][index], args.work_dir / cell.replace("/", "_")))
        for entry, scores, rule in reference_picks(state.data, prefix, search, refined).values():
            if rule:  # a rule's plan ships: it continues from its own refinement
                run_dir = reference_dir(args, reference_key(prefix, rule))
                todo.append(([Plan.from_dict(entry["plan"])], 0, scores, run_dir))
    for plans, index, recorded, run_dir in todo:
        key = f"{prefix}/finetune/{CONTINUED}/{plan_key(plans[index])}"
        if key not in state.data:
            start = refined_start(plans, index, recorded, ev, data, seed, run_dir, args)
            state.get(key, finetune_test, ev, plans[index], data, teacher, CONTINUED, seed, args, start)


# --------------------------------------------------------------------------- report


def _ms(values: Sequence[float], digits: int = 4, scale: float = 1.0) -> str:
    vals = [scale * v for v in values]
    if not vals:
        return ""
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{statistics.fmean(vals):.{digits}f} +- {statistics.stdev(vals):.{digits}f}"


def _arms_text(args: argparse.Namespace) -> str:
    return ", ".join(
        "labels only"
        if arm == "labels"
        else "continued: labels only, from the plan's weights after the refinement's last rung (uniform and "
        "global refined alone for it)"
        if arm == CONTINUED
        else f"distilled from the dense model (w {ARMS[arm]:g}, T {args.distill_temperature:g})"
        for arm in args.arms
    )


def rows_of(state: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per (model, budget, seed, strategy, choice, arm) that has its fine-tuned test accuracy.

    A row's ``refined`` holds the rung scores of its plan: from its strategy's refinement, or for a
    single-plan strategy from its plan refined alone (empty where neither ran).
    """
    rows = []
    for key, search in state.items():
        parts = key.split("/")
        if len(parts) != 5 or parts[4] != "search":
            continue
        name, budget, seed, strategy = parts[:4]
        refined = state.get(f"{name}/{budget}/{seed}/{strategy}/refine")
        scores = refined["scores"] if refined is not None else [{} for _ in search["pool"]]
        if refined is None and base_strategy(strategy) in SINGLE_PLAN:
            alone = reference_record(state, f"{name}/{budget}/{seed}", single_plan_rule(strategy))
            scores = [alone["scores"] if alone is not None else {}]
        choices = {"cheap": (search["pool"][0], scores[0])}
        if refined is not None:
            index = refined["chosen"]
            choices["refined"] = (search["pool"][index], scores[index])
            for pick, (entry, rung_scores, _) in reference_picks(
                state, f"{name}/{budget}/{seed}", search, refined
            ).items():
                choices[pick] = (entry, rung_scores)
        for choice, (c, rung_scores) in choices.items():
            plan = Plan.from_dict(c["plan"])
            for arm in ARMS:
                if arm == CONTINUED and choice == "cheap" and base_strategy(strategy) not in SINGLE_PLAN:
                    continue  # a searched plan continues from its refinement only where that refinement picked it
                test = state.get(f"{name}/{budget}/{seed}/finetune/{arm}/{plan_key(plan)}")
                if test is None:
                    continue
                rows.append(
                    {
                        "model": name,
                        "budget": budget,
                        "seed": seed,
                        "strategy": strategy,
                        "choice": choice,
                        "arm": arm,
                        "plan": plan_key(plan),
                        "test": test,
                        "cheap": c["cheap"],
                        "flops_ratio": c["flops_ratio"],
                        "refined": rung_scores,
                    }
                )
    return rows


def rank_rows(
    state: dict[str, Any], args: argparse.Namespace
) -> dict[tuple[str, str], list[tuple[float, float | None, float]]]:
    """Per (model, budget): (cheap score, first-rung score, fine-tuned test) of every plan fine-tuned with labels."""
    out: dict[tuple[str, str], list[tuple[float, float | None, float]]] = {}
    seen: set[str] = set()
    for key, search in state.items():
        parts = key.split("/")
        if len(parts) != 5 or parts[4] != "search":
            continue
        name, budget, seed, strategy = parts[:4]
        refined = state.get(f"{name}/{budget}/{seed}/{strategy}/refine")
        for i, c in enumerate(search["pool"]):
            ft = f"{name}/{budget}/{seed}/finetune/labels/{plan_key(Plan.from_dict(c['plan']))}"
            if ft not in state or ft in seen:
                continue
            seen.add(ft)
            first = None
            if refined is not None and refined["scores"][i]:
                first = refined["scores"][i][min(refined["scores"][i], key=int)]
            out.setdefault((name, budget), []).append((c["cheap"], first, state[ft]))
    return out


def continued_rank_rows(rows: list[dict[str, Any]]) -> dict[tuple[str, str], list[tuple[float, float | None, float]]]:
    """Per (model, budget): (cheap score, last-rung score, test) of every plan fine-tuned in the ``continued`` arm.

    A plan counts once per seed; its last-rung score is that of the refinement it continued from
    (the row's ``refined``).
    """
    out: dict[tuple[str, str], list[tuple[float, float | None, float]]] = {}
    seen: set[tuple[str, str, str, str]] = set()
    for r in rows:
        ident = (r["model"], r["budget"], r["seed"], r["plan"])
        if r["arm"] != CONTINUED or ident in seen:
            continue
        seen.add(ident)
        scores = r["refined"]
        last = scores[max(scores, key=int)] if scores else None
        out.setdefault((r["model"], r["budget"]), []).append((r["cheap"], last, r["test"]))
    return out


def _spearman_cells(triples: list[tuple[float, float | None, float]]) -> str:
    """``plans | cheap rho | rung rho`` table cells of (cheap, rung score, test) triples.

    A correlation of fewer than three plans reads ``-`` (too few to rank).
    """

    def rho(pairs: list[tuple[float, float]]) -> str:
        if len(pairs) < 3:
            return "-"
        value = spearmanr([a for a, _ in pairs], [b for _, b in pairs]).statistic
        return "-" if math.isnan(value) else f"{value:.2f}"

    with_rung = [(t[1], t[2]) for t in triples if t[1] is not None]
    return f"{len(triples)} ({len(with_rung)} refined) | {rho([(t[0], t[2]) for t in triples])} | {rho(with_rung)}"


def _spearman_rows(by_budget: dict[tuple[str, str], list[tuple[float, float | None, float]]]) -> list[str]:
    """Spearman table rows per (model, budget), and a pooled row per model with several budgets."""
    lines = []
    for model in sorted({m for m, _ in by_budget}):
        budgets = sorted((b for m, b in by_budget if m == model), key=lambda b: -float(b[5:]))
        sets = [(b[5:], by_budget[(model, b)]) for b in budgets]
        if len(sets) > 1:
            sets.append(("all (pooled)", [t for _, triples in sets for t in triples]))
        for label, triples in sets:
            lines.append(f"| {model} | {label} | {_spearman_cells(triples)} |")
    return lines


def _group_key(row: dict[str, Any]) -> tuple[str, str, str, str, str]:
    """A table row's identity: (model, budget, strategy, pick, fine-tune arm)."""
    return (row["model"], row["budget"], row["strategy"], row["choice"], row["arm"])


def _table_order(args: argparse.Namespace) -> Callable[[tuple[str, str, str, str, str]], tuple]:
    """Sort key for :func:`_group_key` tuples: model, budget descending, arm (labels first), strategy order, pick."""
    order = {s: i for i, s in enumerate(args.strategies)}
    arms = {a: i for i, a in enumerate(ARMS)}
    picks = {p: i for i, p in enumerate(("cheap", "refined", *REFERENCES))}
    return lambda k: (k[0], -float(k[1][5:]), arms.get(k[4], -1), order.get(k[2], 99), picks.get(k[3], 99), k[3])


def _paired(row: dict[str, Any], ref: str, index: dict[tuple, dict[str, Any]]) -> float | None:
    """``row``'s test accuracy minus that of ``ref``'s plan on the same seed and arm (None without one)."""
    other = index.get((row["model"], row["budget"], row["seed"], ref, row["arm"]))
    return None if other is None else row["test"] - other["test"]


def per_seed_table(
    rows: list[dict[str, Any]], index: dict[tuple, dict[str, Any]], args: argparse.Namespace
) -> list[str]:
    """Markdown lines: each row's fine-tuned test accuracy per seed, with its paired differences.

    Args:
        rows: Rows from :func:`rows_of`.
        index: The cheap-pick rows keyed by (model, budget, seed, strategy, arm), where uniform and global are found.
        args: The parsed arguments (the strategy order).
    """
    seeds = sorted({r["seed"] for r in rows}, key=lambda s: int(s[4:]))
    lines = [
        "Per seed: fine-tuned test accuracy in %, then the paired difference to uniform / to global in pp:",
        "",
        "| model | budget | strategy | pick | fine-tune | " + " | ".join(seeds) + " |",
        "|---|---|---|---|---|" + "---:|" * len(seeds),
    ]
    cells: dict[tuple, dict[str, str]] = {}
    for r in rows:
        diffs = [_paired(r, ref, index) for ref in SINGLE_PLAN]
        text = " / ".join("-" if d is None else f"{100.0 * d:+.2f}" for d in diffs)
        cells.setdefault(_group_key(r), {})[r["seed"]] = f"{100.0 * r['test']:.2f} ({text})"
    for key in sorted(cells, key=_table_order(args)):
        model, budget, strategy, choice, arm = key
        values = " | ".join(cells[key].get(seed, "") for seed in seeds)
        lines.append(f"| {model} | {budget[5:]} | {strategy} | {choice} | {arm} | {values} |")
    return lines


def coverage_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    """Markdown lines: which seeds, strategies and fine-tune arms each (model, budget) holds.

    A (model, budget) with fewer strategies than the protocol's is marked as a reduced grid.
    """
    cells: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        cells.setdefault((r["model"], r["budget"]), []).append(r)
    order = _table_order(args)
    lines = ["| model | budget | seeds | strategies | fine-tune arms (rows per seed) |", "|---|---|---|---|---|"]
    for model, budget in sorted(cells, key=lambda k: order((*k, "", "", ""))):
        items = cells[(model, budget)]
        seeds = sorted({r["seed"] for r in items}, key=lambda s: int(s[4:]))
        names = sorted({r["strategy"] for r in items}, key=lambda s: order((model, budget, s, "", "")))
        missing = [s for s in PROTOCOL_STRATEGIES if s not in names]
        text = ", ".join(names) + (f" (reduced grid: without {', '.join(missing)})" if missing else " (all)")
        counts = Counter((r["arm"], r["seed"]) for r in items)
        arms = ", ".join(
            f"{arm} ({' / '.join(str(counts[arm, s]) for s in seeds)})"
            for arm in ARMS
            if any(counts[arm, s] for s in seeds)
        )
        lines.append(f"| {model} | {budget[5:]} | {', '.join(s[4:] for s in seeds)} | {text} | {arms} |")
    return lines


def distillation_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    """Markdown lines: distilled minus labels-only test accuracy of the same plan and seed (empty without pairs)."""
    labels = {(r["model"], r["budget"], r["seed"], r["strategy"], r["choice"]): r for r in rows if r["arm"] == "labels"}
    groups: dict[tuple, list[float]] = {}
    pooled: dict[tuple, float] = {}  # each distinct plan once per (model, budget, seed)
    for r in rows:
        other = labels.get((r["model"], r["budget"], r["seed"], r["strategy"], r["choice"]))
        if r["arm"] != "distilled" or other is None or r["choice"] in REFERENCES:  # its plans are in the others
            continue
        delta = 100.0 * (r["test"] - other["test"])
        groups.setdefault((r["model"], r["budget"], r["strategy"], r["choice"]), []).append(delta)
        pooled[(r["model"], r["budget"], r["seed"], r["plan"])] = delta
    for (model, budget, _seed, _plan), delta in pooled.items():
        groups.setdefault((model, budget, "distinct plans", ""), []).append(delta)
    if not groups:
        return []
    order = _table_order(args)
    lines = [
        "Distillation at equal steps: the same plan and seed fine-tuned with distillation minus labels only (pp); "
        "'wins' counts the pairs where distillation is higher:",
        "",
        "| model | budget | strategy | pick | pairs | distilled - labels (pp) | wins |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for key in sorted(groups, key=lambda k: order((k[0], k[1], k[2], k[3], ""))):
        deltas = groups[key]
        model, budget, strategy, choice = key
        lines.append(
            f"| {model} | {budget[5:]} | {strategy} | {choice} | {len(deltas)} | {_ms(deltas, 2)} | "
            f"{sum(d > 0 for d in deltas)} |"
        )
    return lines


def markdown(state: dict[str, Any], args: argparse.Namespace) -> str:
    """The summary table, paired differences, Spearman correlations and baseline curves."""
    rows = rows_of(state, args)
    lines = [
        f"Fashion-MNIST (55000 train / 5000 search-val, {args.eval_size} scored per cheap evaluation / 10000 test); "
        f"{args.evaluations} cheap evaluations per search; criterion {args.criterion}, min_keep {args.min_keep:g}, "
        f"round_to {args.round_to}; refinement of the best {args.refine_top} distinct plans in rungs of "
        f"{', '.join(map(str, args.refine_steps))} cumulative steps; fine-tune recipe {args.finetune_epochs:g} epoch "
        f"at lr {args.finetune_lr:g} ({_arms_text(args)}); test on all 10000 images. 'pick' is how the plan was chosen (cheap score or "
        "refined score, both on search-val; refined+uniform: the refined pick, or the uniform plan where it scored "
        "higher after the same rungs; refined+rules: the same with the uniform and global plans, what the main job "
        "ships). Differences are paired by seed and fine-tune arm, in percentage points."
        + (
            f" Strategies named NAME{DEPTH} (and static_skip) also chose residual blocks to remove."
            if any(searches_depth(r["strategy"]) for r in rows)
            else ""
        )
        + (
            f" A strategy named NAME{LENGTH}N searched with N cheap evaluations."
            if any(LENGTH in r["strategy"] for r in rows)
            else ""
        ),
        "",
        "| model | budget | strategy | pick | fine-tune | seeds | search-val cheap | FT test | - uniform (pp) | - global (pp) | FLOPs ratio |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    index = {(r["model"], r["budget"], r["seed"], r["strategy"], r["arm"]): r for r in rows if r["choice"] == "cheap"}
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(_group_key(r), []).append(r)
    for key in sorted(groups, key=_table_order(args)):
        model, budget, strategy, choice, arm = key
        items = groups[key]
        diffs = {}
        for ref in SINGLE_PLAN:
            paired = [d for d in (_paired(r, ref, index) for r in items) if d is not None]
            diffs[ref] = _ms(paired, 2, 100.0) if strategy != ref else "0"
        lines.append(
            f"| {model} | {budget[5:]} | {strategy} | {choice} | {arm} | {len(items)} | "
            f"{_ms([r['cheap'] for r in items])} | {_ms([r['test'] for r in items])} | {diffs['uniform']} | "
            f"{diffs['global']} | {_ms([r['flops_ratio'] for r in items], 3)} |"
        )
    lines += ["", *per_seed_table(rows, index, args)]
    distilled = distillation_table(rows, args)
    if distilled:
        lines += ["", *distilled]
    lines += ["", "What the state holds:", "", *coverage_table(rows, args)]
    lines += [
        "",
        "Rank correlation with the fine-tuned test accuracy (labels-only fine-tune), per model and budget; the pooled "
        "row mixes budgets, whose accuracy levels differ, so it rewards telling the budgets apart:",
        "",
    ]
    lines += [
        "| model | budget | plans | Spearman: cheap score | Spearman: first-rung refined score |",
        "|---|---|---:|---:|---:|",
    ]
    lines += _spearman_rows(rank_rows(state, args))
    continued = continued_rank_rows(rows)
    if continued:
        lines += [
            "",
            "Rank correlation with the test accuracy of what ships (the continued arm: each plan fine-tuned from its "
            "weights after the last rung), per model and budget, a plan counted once per seed; last-rung scores of "
            "different seeds come from refinements on different batches:",
            "",
            "| model | budget | plans | Spearman: cheap score | Spearman: last-rung refined score |",
            "|---|---|---:|---:|---:|",
            *_spearman_rows(continued),
        ]
    lines += ["", "Dense baselines (search-val accuracy after each epoch; test accuracy at the end):", ""]
    for key, value in state.items():
        if key.endswith("/baseline"):
            curve = ", ".join(f"{v:.4f}" for v in value["curve"][-4:] if v is not None)
            lines.append(
                f"- {key.split('/')[0]}: {value['epochs']:g} epochs, last epochs {curve}; test {value['test']:.4f}"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run (or continue) the grid, print the report and optionally write it."""
    args = parse_args(argv)
    setup_logging(
        args.verbose,
        ("automl_prune.baseline", "automl_prune.training", "automl_prune.data", "automl_prune.evaluator"),
    )
    torch.set_num_threads(args.threads)
    return run_and_report("search_quality.py", argv, args, run, markdown)


def run_and_report(
    script: str,
    argv: Sequence[str] | None,
    args: argparse.Namespace,
    compute: Callable[[argparse.Namespace, State], None],
    table_of: Callable[[dict[str, Any], argparse.Namespace], str],
) -> int:
    """Fill ``--state`` with ``compute`` (unless ``--report-only``), print the table and write it to ``--out``."""
    state = State(args.state)
    load_start, started = load_average(), time.perf_counter()
    if not args.report_only:
        compute(args, state)
    header = run_header(script, argv, args.threads, load_start, started)
    table = table_of(state.data, args).rstrip("\n")
    print(table + "\n\n" + header)
    if args.out is not None:
        write_text(args.out, header + "\n\n" + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

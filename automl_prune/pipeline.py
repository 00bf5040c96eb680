"""The main job: from a config to a searched, pruned, fine-tuned, exported and reported model.

Stages, each usable alone and all run by :func:`run_job` (``automl-prune search``):

1. :func:`load_data` and :func:`dense_model`: the dataset, and the dense baseline (trained and
   cached on first use, or ``model.checkpoint``); copied into the run as ``baseline.pt``.
2. :func:`make_evaluator` / :func:`run_search`: the search under the budget with the
   configured strategy, logged to ``evaluations.jsonl`` (resumable). A latency budget first
   fits a latency model on plans measured on the budget's runtime (``latency_model.json``),
   and ends with measured finalists (``finalists.json``): the plan that ships is the best one
   whose measured latency meets the budget. :func:`refine_outcome` then fine-tunes the best
   distinct plans briefly in rounds of successive halving, as Ray Tune trials, and ships the
   best by that score (``refine.json``, ``refine.png``). Every search saves its
   accuracy-vs-cost front (``pareto.json``, ``pareto.png``), then ``plan.json`` and ``result.json``.
3. :func:`prune_and_finetune`: the chosen plan's model exactly as the search scored it (same
   criterion, rounding and BN re-estimation), fine-tuned (distilled from the dense model when
   ``finetune.distill_weight`` > 0); exported as ``model.pt``, ``model.ts`` and ``model.onnx``
   (and the baseline as ``baseline.ts`` / ``baseline.onnx``).
4. :func:`automl_prune.run_report.write_run_report`: baseline vs pruned, measured again from the
   files in the run directory (``report.md``, ``report.json`` and PNG plots).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from automl_prune.baseline import copy_checkpoint, train_baseline
from automl_prune.checkpoint import CheckpointInfo, load_checkpoint
from automl_prune.config import Config, check_names
from automl_prune.data import DataSplits, load_dataset
from automl_prune.errors import InvalidValueError, SearchFailedError
from automl_prune.evaluator import Evaluator, EvaluatorConfig
from automl_prune.finalists import FinalistChoice
from automl_prune.graph import structure_notes
from automl_prune.io import write_json
from automl_prune.measure.latency_model import LatencyModel
from automl_prune.models import ModelSpec
from automl_prune.progress import Progress
from automl_prune.runs import RunDirectory
from automl_prune.search_spaces import SearchSpace
from automl_prune.seeding import seed_everything
from automl_prune.training import TrainConfig
from automl_prune.types import FAILED_PREFIX, Budget, Evaluation, Plan, SearchResult

if TYPE_CHECKING:
    from automl_prune.parallel import EvaluatorSpec
    from automl_prune.refine import RefineConfig, Refinement

logger = logging.getLogger(__name__)

Stage = Callable[[str], None]
"""Receives one line per stage started (the CLI prints it)."""


def _log_stage(text: str) -> None:
    logger.info(text)


# --------------------------------------------------------------------------- conversions
def budget_of(config: Config) -> Budget:
    """The :class:`Budget` of a config."""
    return Budget(**dataclasses.asdict(config.budget))  # the section has exactly Budget's fields


def train_config_of(config: Config) -> TrainConfig:
    """The baseline's :class:`TrainConfig`."""
    t = config.train
    return TrainConfig(
        epochs=t.epochs, lr=t.lr, batch_size=t.batch_size, weight_decay=t.weight_decay, bn_l1=t.bn_l1, seed=config.seed
    )


def finetune_config_of(config: Config) -> TrainConfig:
    """The fine-tune's :class:`TrainConfig` (requires ``finetune.epochs > 0``)."""
    f = config.finetune
    return TrainConfig(
        epochs=f.epochs,
        lr=f.lr,
        batch_size=f.batch_size,
        weight_decay=f.weight_decay,
        seed=config.seed,
        distill_weight=f.distill_weight,
        distill_temperature=f.distill_temperature,
    )


def round_to_of(config: Config) -> int:
    """The channel multiple of the run: ``prune.round_to``, or what the budget's runtime is fast at."""
    from automl_prune.runtimes import get_runtime

    if config.prune.round_to is not None:
        return config.prune.round_to
    return get_runtime(config.budget.runtime).preferred_multiple(config.budget.device)


def evaluator_config_of(config: Config, reward_of: str | None = None) -> EvaluatorConfig:
    """How the search scores plans (with the reward of ``reward_of``'s strategy when ``search.reward`` is unset)."""
    s = config.search
    return EvaluatorConfig(
        criterion=config.scoring_criterion,
        reward=config.reward_of(reward_of),
        eval_size=s.eval_size,
        bn_recalibration=s.bn_recalibration,
        recalibration_batches=s.recalibration_batches,
        criterion_batches=config.prune.criterion_batches,
        finetune_steps=s.fitness_finetune_steps,
        distill_weight=config.finetune.distill_weight,
        distill_temperature=config.finetune.distill_temperature,
        round_to=round_to_of(config),
        seed=config.seed,
        latency_plans=s.latency_plans,
        latency_margin=s.latency_margin,
        cache_dir=config.cache_dir,
        device=compute_device(config),
    )


def compute_device(config: Config) -> str:
    """Where training, fine-tuning and scoring compute: ``device``, with ``auto`` = CUDA when available.

    Raises:
        InvalidValueError: An unknown device, or CUDA asked for where torch has none.
    """
    from automl_prune.runtimes import resolve_device

    if config.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return str(resolve_device(config.device))
    except InvalidValueError as exc:
        raise InvalidValueError(f"{exc} (--device cpu, or --device auto to use CUDA only when present)") from None


def cache_dir_of(config: Config) -> Path | None:
    """The configured cache root (None = the default)."""
    return Path(config.cache_dir) if config.cache_dir else None


def set_threads(config: Config) -> None:
    """Apply ``threads`` to torch (no-op when unset) and ``amp`` to this process and the workers it starts."""
    from automl_prune.precision import set_mixed_precision

    set_mixed_precision(config.amp)
    if config.threads:
        torch.set_num_threads(config.threads)


def preflight(config: Config, replacing: str | os.PathLike[str] | None = None) -> None:
    """Checks that need no data or model: registered names, the device and the runtime. Run before writing anything.

    Args:
        config: The run's config.
        replacing: The run directory a new run replaces (``--overwrite``), if any.

    Raises:
        UnknownNameError: A strategy, reward, criterion or dataset name is unknown.
        InvalidValueError: A strategy option its strategy refuses, ``budget.device`` is cuda on a machine without CUDA, the
            runtime cannot run there (not installed, no CUDA provider), or ``search.init_policy`` is a policy
            in the directory being replaced.
        AutomlPruneError: Nothing listens at ``parallel.ray_address``.
    """
    from automl_prune.compare import Entry, parse_entries
    from automl_prune.runtimes import check_runtime
    from automl_prune.strategy import make_strategy

    check_names(config)
    entries = [Entry(config.search.strategy, config.search.strategy, config.search.options_of(config.search.strategy))]
    for entry in [*entries, *parse_entries(config.compare.strategies, config.search)]:
        try:
            make_strategy(entry.strategy, entry.options)  # refuses a bad option before any work
        except InvalidValueError as exc:
            where = "search" if entry.label == entry.strategy else "compare.strategies"
            raise InvalidValueError(f"{where}.{entry.label}: {exc}") from None
    if config.search.init_policy:
        from automl_prune.policies import load_policy, policy_file

        load_policy(config.search.init_policy, config.search.strategy)
        source = policy_file(config.search.init_policy).resolve()
        if replacing is not None and source.parent == Path(replacing).resolve():
            raise InvalidValueError(
                f"search.init_policy is '{source}', which --overwrite would delete with the rest of the run in "
                f"'{replacing}'; copy it elsewhere first or choose another --out"
            )
    if config.budget.device == "cuda" and not torch.cuda.is_available():
        raise InvalidValueError(
            "budget.device is cuda but CUDA is not available here; use --budget.device cpu or run on a GPU machine"
        )
    check_runtime(config.budget.runtime, config.budget.device)
    if config.parallel.ray_address:
        from automl_prune.parallel import probe_ray_address

        probe_ray_address(config.parallel.ray_address)


# --------------------------------------------------------------------------- stages
def load_data(config: Config) -> DataSplits:
    """The configured dataset's splits."""
    d = config.data
    return load_dataset(d.dataset, d.data_dir, val_size=d.val_size, seed=config.seed, image_size=d.image_size)


def dense_model(config: Config, data: DataSplits) -> tuple[nn.Module, CheckpointInfo, Path]:
    """The dense model to prune: ``model.checkpoint``, or the cached/trained baseline.

    Returns:
        (model, its checkpoint info, the checkpoint file).

    Raises:
        InvalidValueError: The checkpoint is already pruned, or does not match the data.
    """
    if config.model.checkpoint and config.model.weights:
        raise InvalidValueError(
            "give model.checkpoint (an automl-prune checkpoint) or model.weights (weights trained elsewhere), not both"
        )
    if config.model.checkpoint:
        path = Path(config.model.checkpoint)
        model, info = load_checkpoint(path)
        check_dense(info, path)
        check_data_fits(info, data, path)
        return model, info, path
    spec = model_spec_of(config, data)
    if config.model.weights:
        return import_weights(spec, config.model.weights, data, cache_dir_of(config))
    baseline = train_baseline(spec, data, train_config_of(config), cache_dir_of(config), compute_device(config))
    return baseline.model, baseline.info, baseline.path


def model_spec_of(config: Config, data: DataSplits) -> ModelSpec:
    """The dense model's spec: ``model.name`` and ``model.kwargs`` sized for ``data``."""
    return ModelSpec(config.model.name, data.in_channels, data.num_classes, dict(config.model.kwargs))


@dataclass
class TrainedCheckpoint:
    """What :func:`train_checkpoint` wrote and measured."""

    path: Path
    model: str
    dataset: str
    cached: bool
    val_accuracy: float
    test_accuracy: float
    seconds: float


def train_checkpoint(config: Config, out: str | Path) -> TrainedCheckpoint:
    """``automl-prune train``: train (or load the cached) baseline and copy its checkpoint to ``out/model.pt``."""
    import time

    check_names(config)
    set_threads(config)
    data = load_data(config)
    spec = model_spec_of(config, data)
    out = output_dir(out)
    start = time.perf_counter()
    baseline = train_baseline(spec, data, train_config_of(config), cache_dir_of(config), compute_device(config))
    copy_checkpoint(baseline.path, out / "model.pt")
    meta = baseline.info.meta
    return TrainedCheckpoint(
        out / "model.pt",
        spec.name,
        data.name,
        baseline.cached,
        meta["val_accuracy"],
        meta["test_accuracy"],
        time.perf_counter() - start,
    )


def import_weights(
    spec: ModelSpec, weights: str | Path, data: DataSplits, cache_dir: Path | None = None
) -> tuple[nn.Module, CheckpointInfo, Path]:
    """A model trained elsewhere as a dense automl-prune checkpoint (cached by file content and spec).

    Raises:
        InvalidValueError: Missing file.
        CheckpointError: Unsafe, unreadable or mismatching weights.
    """
    import hashlib

    from automl_prune.baseline import cache_root
    from automl_prune.checkpoint import save_checkpoint
    from automl_prune.models import build_model
    from automl_prune.weights import load_weights

    source = Path(weights)
    if not source.is_file():
        raise InvalidValueError(f"model.weights file '{source}' does not exist; pass a local state_dict file")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    key = hashlib.sha256(
        json.dumps([digest, spec.to_dict(), list(data.input_shape(1))], sort_keys=True).encode()
    ).hexdigest()[:12]
    path = (cache_dir or cache_root()) / "imported" / f"{spec.name.replace(':', '_').replace('.', '_')}-{key}.pt"
    if path.is_file():
        model, info = load_checkpoint(path)
        return model, info, path
    model = load_weights(build_model(spec), source, spec.name).eval()
    info = CheckpointInfo(
        spec=spec,
        input_shape=data.input_shape(1),
        meta={"dataset": data.name, "weights": str(source.resolve()), "weights_sha256": digest},
    )
    save_checkpoint(path, model, info)
    logger.info("imported %s weights from %s", spec.name, source)
    return model, info, path


def check_dense(info: CheckpointInfo, path: str | Path) -> None:
    """Raise a clear error when the checkpoint at ``path`` is already pruned (plans apply to dense models)."""
    if info.plan is not None and (info.plan.keep_ratios or info.plan.skip):
        raise InvalidValueError(f"checkpoint '{path}' is already pruned; give its dense baseline instead")


def check_data_fits(info: CheckpointInfo, data: DataSplits, path: str | Path) -> None:
    """Raise a clear error when the data's input shape is not the checkpoint's."""
    if tuple(info.input_shape[1:]) != tuple(data.input_shape(1)[1:]):
        raise InvalidValueError(
            f"checkpoint '{path}' takes inputs {tuple(info.input_shape[1:])} but {data.name} gives "
            f"{tuple(data.input_shape(1)[1:])}; set --data.dataset (and --data.image_size) to the model's data"
        )


def worker_spec_of(config: Config, evaluator: Evaluator, model_spec: ModelSpec) -> EvaluatorSpec:
    """What a Ray worker needs to rebuild ``evaluator`` (the data is reloaded there from the config)."""
    from automl_prune.parallel import spec_for

    d = config.data
    par = config.parallel
    return spec_for(
        evaluator,
        model_spec,
        d.dataset,
        device="cuda" if par.gpus_per_worker > 0 and evaluator.device.type == "cuda" else "cpu",
        data_dir=d.data_dir,
        val_size=d.val_size,
        data_seed=config.seed,
        image_size=d.image_size,
    )


def make_evaluator(
    config: Config,
    model: nn.Module,
    data: DataSplits,
    latency_model: LatencyModel | None = None,
    reward_of: str | None = None,
) -> Evaluator:
    """The evaluator of the search (a latency budget fits its latency model first, unless given one).

    ``reward_of`` names the strategy whose own reward applies when ``search.reward`` is unset
    (default: ``search.strategy``).
    """
    return Evaluator(
        model, data, budget_of(config), evaluator_config_of(config, reward_of), latency_model=latency_model
    )


LATENCY_MODEL_FILE = "latency_model.json"


def run_latency_model(run: RunDirectory) -> LatencyModel | None:
    """The latency model a run fitted (so that a resumed run predicts exactly as before), or None."""

    path = run.path / LATENCY_MODEL_FILE
    if not path.is_file():
        return None
    try:
        return LatencyModel.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, InvalidValueError) as exc:
        raise InvalidValueError(f"'{path}' is damaged ({exc}); rerun the search into a new --out") from None


def make_space(config: Config, evaluator: Evaluator) -> SearchSpace:
    """The search space (skip gates when asked for or the strategy needs them); fails here when no plan can meet the budget."""
    from automl_prune.strategy import space_for

    s = config.search
    return space_for(s.strategy, evaluator, min_keep=s.min_keep, skip_gates=s.skip_gates)


@dataclass
class SearchOutcome:
    """What :func:`run_search` produced.

    Attributes:
        result: The strategy's result (its best plan by the search's own, predicted, figures).
        plan: The plan that ships: the chosen finalist for a latency budget, else the best plan.
        evaluation: That plan's evaluation (with its measured latency when it was measured).
        finalists: The measured finalists of a latency budget (None otherwise).
        refinement: The refinement of the best plans by short fine-tunes (None when off or
            when fewer than two distinct plans could ship).
    """

    result: SearchResult
    plan: Plan
    evaluation: Evaluation
    finalists: FinalistChoice | None = None
    refinement: Refinement | None = None

    @property
    def budget_met(self) -> bool | None:
        """Whether the shipped plan's measured latency meets the budget (None when not measured)."""
        return None if self.finalists is None else self.finalists.met


def run_search(
    config: Config,
    run: RunDirectory,
    evaluator: Evaluator,
    space: SearchSpace,
    spec: ModelSpec,
    progress: bool = True,
    stage: Stage | None = None,
) -> SearchOutcome:
    """Search with the configured strategy, logging every evaluation into ``run``.

    Evaluations already in the run's log are preloaded, so a resumed run repeats none of them.
    A latency budget's best distinct plans are then measured on the runtime
    (:func:`automl_prune.finalists.choose_finalist`, ``finalists.json``). Writes the search's
    accuracy-vs-cost front (``pareto.json``, ``pareto.png``), ``plan.json`` (the plan that
    ships) and ``result.json``.
    """
    from automl_prune.finalists import choose_finalist
    from automl_prune.pareto import front, write_front
    from automl_prune.policies import load_policy, save_policy
    from automl_prune.strategy import make_strategy

    s, par = config.search, config.parallel
    for plan, evaluation in run.logged():
        evaluator.preload(plan, evaluation)
    if run.records:
        logger.warning("resuming %s: %d of %d evaluations already done", run.path, len(run.records), s.evaluations)
    bar = Progress(s.evaluations, f"search {s.strategy}", "eval", enabled=progress)

    def show(session: Any, plan: Plan, evaluation: Any) -> None:
        best = session.best()
        bar.update(1)
        if best is not None:
            bar.set_postfix(best_acc=f"{best[1].accuracy:.4f}")

    pool = None
    log = None
    try:
        evaluate_many = None
        if par.workers > 1 or par.ray_address:
            from automl_prune.parallel import RayEvaluatorPool

            pool = RayEvaluatorPool(
                worker_spec_of(config, evaluator, spec),
                workers=par.workers,
                address=par.ray_address,
                cpus_per_worker=par.cpus_per_worker,
                gpus_per_worker=par.gpus_per_worker,
                task_timeout=par.task_timeout,
                start_timeout=par.worker_timeout,
            )
            evaluate_many = pool.evaluate_many_cached(evaluator)
        strategy = make_strategy(s.strategy, s.options_of(s.strategy), par.workers)
        if pool is not None and strategy.sequential_reason:
            logger.warning(
                "%s scores one plan at a time (%s): the %d workers take turns and do not speed it up",
                s.strategy,
                strategy.sequential_reason,
                par.workers,
            )
        if s.init_policy:
            state, about = load_policy(s.init_policy, s.strategy)
            strategy.start_from(state)
            logger.info(
                "%s starts from the policy of %s (%s, learned under %s in %s evaluations)",
                s.strategy,
                s.init_policy,
                about.get("model", "?"),
                about.get("budget", "?"),
                about.get("evaluations", "?"),
            )
        log = run.callback(s.strategy, placements=getattr(evaluate_many, "placements", None))
        result = strategy.search(
            evaluator, space, s.evaluations, seed=config.seed, callbacks=[log, show], evaluate_many=evaluate_many
        )
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            if any(pool.stats.to_dict().values()):
                logger.warning("Ray worker faults this session: %s", pool.stats.to_dict())
        if log is not None:
            log.close()
    failures = [e for _, e in result.history if e.failed]
    if failures and len(failures) == len(result.history):
        first = failures[0].reason.removeprefix(FAILED_PREFIX).lstrip(": ")
        raise SearchFailedError(
            f"all {len(failures)} evaluations failed, nothing exported; the first: {first} "
            f"(logged in {run.path / 'evaluations.jsonl'}, which --resume replays as they are: fix the cause, "
            "then run the command again with --overwrite)"
        )
    if failures:
        logger.warning(
            "%d of %d evaluations failed; the first: %s", len(failures), len(result.history), failures[0].reason
        )
    state = strategy.policy_state()
    if state is not None:
        save_policy(
            run.path,
            s.strategy,
            state,
            {"model": spec.name, "budget": evaluator.budget.describe(), "evaluations": result.evaluations},
        )
    outcome = SearchOutcome(result, result.best_plan, result.best_evaluation)
    measured: dict[int, float] = {}
    if evaluator.latency_model is not None and s.finalists > 0:
        if stage is not None:
            stage(f"      measuring up to {s.finalists} finalists on {evaluator.budget.where()}")
        stored = run.path / "finalists.json"
        earlier = json.loads(stored.read_text()) if stored.is_file() else None
        choice = choose_finalist(evaluator, result.history, s.finalists, progress=progress, stored=earlier)
        if choice is not None:
            write_json(stored, choice.to_dict())  # before the refinement, so that a resume refines the same plans
            chosen = choice.finalists[choice.chosen]
            evaluation = dataclasses.replace(chosen.evaluation, measured_latency_ms=chosen.measured_ms)
            outcome = SearchOutcome(result, chosen.plan, evaluation, choice)
            first = {}
            for i, (plan, _) in enumerate(result.history):
                first.setdefault(evaluator.structure_key(plan), i)
            for f in choice.finalists:
                measured[first[evaluator.structure_key(f.plan)]] = f.measured_ms
    outcome = refine_outcome(config, run, evaluator, outcome, stage, space)
    if outcome.finalists is not None:
        write_json(run.path / "finalists.json", outcome.finalists.to_dict())
    write_front(
        run.path,
        {**front(result.history, measured, key=evaluator.structure_key), "round_to": evaluator.config.round_to},
    )
    write_json(run.path / "plan.json", outcome.plan.to_dict())
    write_json(
        run.path / "result.json",
        {
            "strategy": result.strategy,
            "seed": result.seed,
            "budget": evaluator.budget.to_dict(),
            "limits": evaluator.limits,
            "round_to": evaluator.config.round_to,
            "evaluations": result.evaluations,
            "failed_evaluations": len(failures),
            "first_failure": failures[0].reason if failures else None,
            "worker_faults": pool.stats.to_dict() if pool is not None else None,
            "wall_time": result.wall_time,
            "dense": evaluator.dense.to_dict(),
            "latency_model": evaluator.latency_model.to_dict() if evaluator.latency_model is not None else None,
            "best_plan": result.best_plan.to_dict(),
            "best": result.best_evaluation.to_dict(),
            "chosen_plan": outcome.plan.to_dict(),
            "chosen": outcome.evaluation.to_dict(),
            "refined_score": outcome.refinement.score if outcome.refinement is not None else None,
            "budget_met_measured": outcome.budget_met,
            "history": [{"plan": p.to_dict(), "evaluation": e.to_dict()} for p, e in result.history],
        },
    )
    return outcome


def refine_config_of(config: Config) -> RefineConfig:
    """The refinement settings: ``search.refine_*`` and the fine-tune section's optimiser and distillation."""
    from automl_prune.refine import RefineConfig

    s, f = config.search, config.finetune
    return RefineConfig(
        top=s.refine_top,
        steps=tuple(s.refine_steps),
        lr=f.lr,
        batch_size=f.batch_size,
        weight_decay=f.weight_decay,
        distill_weight=f.distill_weight,
        distill_temperature=f.distill_temperature,
        seed=config.seed,
        cpus_per_trial=config.parallel.cpus_per_worker,
        device=compute_device(config),
        gpus_per_trial=config.parallel.gpus_per_worker or 0.25,
    )


def refine_outcome(
    config: Config,
    run: RunDirectory,
    evaluator: Evaluator,
    outcome: SearchOutcome,
    stage: Stage | None = None,
    space: SearchSpace | None = None,
) -> SearchOutcome:
    """Refine the best distinct plans that can ship (:mod:`automl_prune.refine`) and ship the best refined one.

    The candidates are the finalists whose measurement meets a latency budget (outside the noise
    band when some do: :meth:`FinalistChoice.shippable`), or else the best
    distinct plans that meet every term as scored (a predicted latency against its tightened limit,
    when no finalist was measured). Without measured finalists, each rule of ``search.refine_rules``
    adds its plan at the budget as a reference that runs every rung and ships if it leads the
    last one (a finalist, or an earlier rule's plan, with its channel counts becomes the reference
    instead); the plans are the rules' on ``space``, the space searched (built from the config
    when not given). Fewer than two candidates: nothing to refine.
    """
    from automl_prune.finalists import candidates
    from automl_prune.refine import Candidate, refine

    rc = refine_config_of(config)
    if rc.top == 0:
        return outcome
    choice = outcome.finalists
    if choice is not None and not choice.met:
        logger.warning("no finalist meets the latency budget: nothing to refine")
        return outcome
    if choice is not None:
        measured = [
            (f.plan, dataclasses.replace(f.evaluation, measured_latency_ms=f.measured_ms))
            for f in (choice.finalists[i] for i in choice.shippable())
        ]
        pool = measured[: rc.top]
    else:  # nothing measured: only plans that meet every term as scored (a predicted latency included)
        pool = candidates(evaluator, [(plan, e) for plan, e in outcome.result.history if e.feasible], rc.top)
    if len(pool) < rc.top:
        logger.info("refining the %d distinct plan(s) that can ship (search.refine_top is %d)", len(pool), rc.top)
    cands = [Candidate(plan, e) for plan, e in pool]
    if choice is None and config.search.refine_rules:
        space = space or make_space(config, evaluator)
        for rule, plan, evaluation in rule_references(config, evaluator, space):
            key = evaluator.structure_key(plan)  # it runs every rung: a finalist already, or one more candidate
            reference = next((c for c in cands if evaluator.structure_key(c.plan) == key), None)
            if reference is None:
                reference = Candidate(plan, evaluation)
                cands.append(reference)
            elif reference.reference:
                logger.info("the %s plan is the %s plan: one reference", rule, reference.reference)
            reference.reference = reference.reference or rule
    if len(cands) < 2:
        return outcome
    if stage is not None:
        added = [c.reference for c in cands[len(pool) :]]
        rules = f" and the {' and '.join(added)} plan{'s' if len(added) > 1 else ''}" if added else ""
        stage(
            f"      refining {len(pool)} plans{rules}: fine-tunes of "
            f"{', '.join(map(str, rc.steps))} steps, the better half going on (search.refine_top 0 turns it off)"
        )
    starts = [evaluator.build(c.plan).cpu() for c in cands]  # trials move them to their own device
    refinement = refine(
        cands,
        starts,
        evaluator.data.train,
        evaluator.data.search_val,
        rc,
        run.path,
        teacher=evaluator.model if rc.distill_weight > 0 else None,
        ray_address=config.parallel.ray_address,
    )
    chosen = refinement.candidates[refinement.chosen]
    if chosen.reference:
        last = max(chosen.scores)
        best = max(c.scores[last] for c in refinement.candidates if not c.reference and last in c.scores)
        logger.warning(
            "no searched plan beat the %s plan after refinement (%.4f against the best searched %.4f on "
            "search-val after %d steps): the %s plan ships",
            chosen.reference,
            chosen.scores[last],
            best,
            last,
            chosen.reference,
        )
    else:
        logger.info(
            "refinement ships plan %d of %d: refined score %.4f (cheap score %.4f)",
            refinement.chosen + 1,
            len(pool),
            refinement.score or float("nan"),
            chosen.cheap,
        )
    if choice is not None:
        key = evaluator.structure_key(chosen.plan)
        choice.chosen = next(i for i, f in enumerate(choice.finalists) if evaluator.structure_key(f.plan) == key)
    return SearchOutcome(outcome.result, chosen.plan, chosen.evaluation, choice, refinement)


def rule_references(config: Config, evaluator: Evaluator, space: SearchSpace) -> list[tuple[str, Plan, Evaluation]]:
    """Each rule of ``search.refine_rules`` with its plan on ``space``, the refinement's references.

    A rule's plan is its one plan at the budget (``global`` with its ``search.global.*``
    options); one that misses the budget as scored is left out, with a line in the log.
    """
    from automl_prune.strategy import make_strategy

    out = []
    for rule in config.search.refine_rules:
        result = make_strategy(rule, config.search.options_of(rule)).search(evaluator, space, 1, seed=config.seed)
        if not result.best_evaluation.feasible:
            logger.info(
                "the %s plan misses the budget as scored (%s): no reference", rule, result.best_evaluation.reason
            )
            continue
        out.append((rule, result.best_plan, result.best_evaluation))
    return out


def cut_plan(
    config: Config,
    model: nn.Module,
    info: CheckpointInfo,
    plan: Plan,
    data: DataSplits,
    graph: Any = None,
    round_to: int | None = None,
) -> nn.Module:
    """``plan`` cut out of the dense ``model`` with ``prune.criterion`` and rounding, checked by a forward pass.

    Its BatchNorm statistics are then re-estimated on the training batches a search re-estimates
    them on (``search.bn_recalibration``, adaptive BN), so that a plan cut here is the model its
    search scored (given the same criterion) rather than one whose BN statistics still describe
    the channels that were removed.

    Raises:
        InvalidValueError: Pruning or the pruned model's forward pass fails (one line; nothing is written).
    """
    from automl_prune.evaluator import calibration_batches, recalibrate_batchnorm
    from automl_prune.export import verify_forward
    from automl_prune.pruning import apply

    p = config.prune
    batches = list(data.search_val.batches(128))[: p.criterion_batches]
    try:
        pruned = apply(
            model,
            plan,
            p.criterion,
            example_inputs=info.example_inputs(),
            graph=graph,
            round_to=round_to if round_to is not None else round_to_of(config),
            data=batches,
        )
    except InvalidValueError:
        raise
    except Exception as exc:  # noqa: BLE001 - a structure Torch-Pruning cannot cut consistently
        raise InvalidValueError(
            f"pruning {info.spec.name} with this plan failed ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); nothing was written"
        ) from None
    verify_forward(pruned, info.example_inputs(), f"the pruned {info.spec.name}")
    recalibrate_batchnorm(pruned, calibration_batches(data, evaluator_config_of(config)))
    return pruned.eval()


def prune_and_finetune(
    config: Config,
    model: nn.Module,
    info: CheckpointInfo,
    plan: Plan,
    data: DataSplits,
    evaluator: Evaluator | None = None,
    refinement: Refinement | None = None,
) -> tuple[nn.Module, CheckpointInfo]:
    """Cut ``plan`` out of the dense ``model`` and fine-tune it (distilling from ``model`` if configured).

    With the search's ``evaluator`` (and ``prune.criterion`` the criterion it scored with), the
    model that is fine-tuned is the one the search scored: :meth:`Evaluator.build` (same criterion
    data, channel rounding, BN re-estimation and fitness steps), so its search-val accuracy right
    after pruning equals the search's score. Otherwise ``prune.criterion`` cuts the plan afresh.
    Where ``refinement`` shipped this plan (and ``finetune.from_refinement`` is on), the fine-tune
    starts from its weights after the last rung: the refinement's steps are kept, not redone.

    Returns:
        (the pruned, fine-tuned model, its checkpoint info; ``meta`` records the test accuracy
        right after pruning, the search-val accuracy the search scored, where the fine-tune
        started and its settings).
    """
    from automl_prune.measure.accuracy import evaluate_accuracy

    p = config.prune
    round_to = round_to_of(config)
    seed_everything(config.seed)
    meta: dict[str, Any] = {
        **{k: v for k, v in info.meta.items() if k in ("dataset", "train")},
        "criterion": p.criterion,
    }
    if evaluator is not None and evaluator.config.criterion == p.criterion and evaluator.config.round_to == round_to:
        pruned = evaluator.build(plan)
        meta["as_scored"] = True
        meta["search_val_accuracy_after_prune"] = evaluate_accuracy(pruned, evaluator.val, evaluator.config.batch_size)
    else:
        if evaluator is not None:
            logger.info(
                "prune.criterion %s differs from the search's %s: the plan is cut afresh, not as it was scored",
                p.criterion,
                evaluator.config.criterion,
            )
        pruned = cut_plan(config, model, info, plan, data).to(compute_device(config))
        meta["as_scored"] = False
    meta["test_accuracy_before_finetune"] = evaluate_accuracy(pruned, data.test, limit=config.report.test_size)
    if config.finetune.epochs > 0:
        if config.finetune.from_refinement and meta["as_scored"]:
            meta["refined_start"] = start_from_refinement(pruned, plan, refinement, data)
        pruned, meta["finetune"] = finetune(config, pruned, data, teacher=model)
    return pruned.eval(), CheckpointInfo(info.spec, info.input_shape, plan, round_to, meta)


def start_from_refinement(
    pruned: nn.Module, plan: Plan, refinement: Refinement | None, data: DataSplits
) -> dict[str, Any] | None:
    """Load the refinement's weights of ``plan`` after its last rung into ``pruned`` (the model the search scored).

    Returns:
        The rung's step count, its refined score and the search-val accuracy of the loaded model
        (the same images: equal to the score); None where the refinement did not ship ``plan``
        or its checkpoint is gone (the fine-tune then starts from the pruned model).
    """
    from automl_prune.measure.accuracy import evaluate_accuracy

    if refinement is None or not refinement.rungs_done or refinement.plan != plan:
        return None
    weights = refinement.weights(refinement.chosen, next(pruned.parameters()).device)
    if weights is None:
        logger.warning(
            "the refinement's checkpoint of the shipped plan is gone: the fine-tune starts from the pruned model"
        )
        return None
    pruned.load_state_dict(weights)
    return {
        "steps": refinement.chosen_steps,
        "refined_score": refinement.score,
        "search_val_accuracy": evaluate_accuracy(pruned, data.search_val),
    }


def _check_teacher(distill_weight: float, has_teacher: bool) -> None:
    """Refuse distillation without a teacher, before any work is done."""
    if distill_weight > 0 and not has_teacher:
        raise InvalidValueError(
            "--finetune.distill_weight needs a teacher: give the dense checkpoint with --teacher (e.g. RUN/baseline.pt)"
        )


def finetune(
    config: Config, model: nn.Module, data: DataSplits, teacher: nn.Module | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Fine-tune ``model`` with the ``finetune`` section, distilling from ``teacher`` when ``distill_weight`` > 0.

    Returns:
        (the model of the best epoch on search-val, the settings and that best search-val accuracy).

    Raises:
        InvalidValueError: Distillation asked for without a teacher.
    """
    from automl_prune.training import train

    ft = finetune_config_of(config)
    _check_teacher(ft.distill_weight, teacher is not None)
    result = train(model, data, ft, description="fine-tune", teacher=teacher if ft.distill_weight > 0 else None)
    return result.model, {**ft.to_dict(), "best_val_accuracy": result.val_accuracy}


def output_dir(out: str | Path) -> Path:
    """``out`` as a directory, created if needed.

    Raises:
        InvalidValueError: ``out`` exists and is a file.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InvalidValueError(f"--out '{out}' exists and is not a directory; choose another path")
    out.mkdir(parents=True, exist_ok=True)
    return out


@dataclass
class PrunedCheckpoint:
    """What :func:`prune_checkpoint` wrote and measured."""

    path: Path
    plan: Plan
    criterion: str
    dense: Any  # graph.Cost
    pruned: Any  # graph.Cost
    dense_test_accuracy: float
    pruned_test_accuracy: float


def prune_checkpoint(
    config: Config,
    checkpoint: str | Path,
    out: str | Path,
    plan_file: str | Path | None = None,
    point: int | None = None,
) -> PrunedCheckpoint:
    """``automl-prune prune``: cut a plan file's plan (or the uniform plan for ``budget.flops``) out of a dense checkpoint.

    Writes ``model.pt`` and ``plan.json`` into ``out`` only once the pruned model has run a
    forward pass.

    Raises:
        InvalidValueError: A pruned checkpoint, a plan for another model, no plan and no FLOPs
            fraction, or a plan that cannot be cut (nothing is written).
    """
    from automl_prune.checkpoint import save_checkpoint
    from automl_prune.criteria import CRITERIA
    from automl_prune.graph import Cost, LayerGraph, count_cost
    from automl_prune.measure.accuracy import evaluate_accuracy
    from automl_prune.pareto import read_plan_file

    CRITERIA.get(config.prune.criterion)
    model, info = load_checkpoint(checkpoint)
    check_dense(info, checkpoint)
    data = load_data(config)
    check_data_fits(info, data, checkpoint)
    graph = LayerGraph(model, info.example_inputs())
    round_to = round_to_of(config)
    if plan_file is not None:
        plan, searched_at = read_plan_file(plan_file, point)
        graph.validate(plan)
        if searched_at is not None and searched_at != round_to:
            if config.prune.round_to is None:  # cut as it was scored, wherever `prune` runs
                logger.info("the plan was searched with channels in multiples of %d: pruning so", searched_at)
                round_to = searched_at
            else:
                logger.warning(
                    "the plan was searched with channels in multiples of %d; --prune.round_to %d gives other widths "
                    "than the ones its run scored",
                    searched_at,
                    round_to,
                )
    elif point is not None:
        raise InvalidValueError("--point needs --plan PARETO.json (a run's pareto.json)")
    elif config.budget.flops is not None and config.budget.flops <= 1:
        plan = graph.uniform_plan(config.budget.flops, round_to=round_to)
    else:
        raise InvalidValueError("give --plan FILE, or --budget.flops FRACTION for a uniform plan")
    pruned = cut_plan(config, model, info, plan, data, graph, round_to)
    out = output_dir(out)
    meta = {**info.meta, "criterion": config.prune.criterion}
    save_checkpoint(out / "model.pt", pruned, CheckpointInfo(info.spec, info.input_shape, plan, round_to, meta))
    write_json(out / "plan.json", plan.to_dict())
    return PrunedCheckpoint(
        out / "model.pt",
        plan,
        config.prune.criterion,
        Cost(graph.flops, graph.params),
        count_cost(pruned, info.example_inputs()),
        evaluate_accuracy(model, data.test),
        evaluate_accuracy(pruned, data.test),
    )


@dataclass
class FinetunedCheckpoint:
    """What :func:`finetune_checkpoint` wrote and measured."""

    path: Path
    test_before: float
    test_after: float
    best_val_accuracy: float


def finetune_checkpoint(
    config: Config, checkpoint: str | Path, out: str | Path, teacher: str | Path | None = None
) -> FinetunedCheckpoint:
    """``automl-prune finetune``: fine-tune a (pruned) checkpoint, keeping the best epoch on search-val.

    Raises:
        InvalidValueError: ``finetune.epochs`` not positive, distillation without a teacher, or
            data that does not fit the checkpoint.
    """
    from automl_prune.checkpoint import save_checkpoint
    from automl_prune.measure.accuracy import evaluate_accuracy

    if config.finetune.epochs <= 0:
        raise InvalidValueError("--finetune.epochs must be > 0 for the finetune command")
    _check_teacher(finetune_config_of(config).distill_weight, teacher is not None)
    set_threads(config)
    model, info = load_checkpoint(checkpoint)
    model = model.to(compute_device(config))
    dense = load_checkpoint(teacher)[0] if teacher is not None and config.finetune.distill_weight > 0 else None
    data = load_data(config)
    check_data_fits(info, data, checkpoint)
    before = evaluate_accuracy(model, data.test)
    tuned, settings = finetune(config, model, data, teacher=dense)
    after = evaluate_accuracy(tuned, data.test)
    out = output_dir(out)
    meta = {**info.meta, "finetune": {**settings, "test_before": before, "test_after": after}}
    save_checkpoint(
        out / "model.pt", tuned, CheckpointInfo(info.spec, info.input_shape, info.plan, info.round_to, meta)
    )
    return FinetunedCheckpoint(out / "model.pt", before, after, settings["best_val_accuracy"])


@dataclass
class JobResult:
    """What :func:`run_job` produced."""

    run_dir: Path
    search: SearchOutcome | None  # None when the run was already complete
    report: dict[str, Any] | None


def run_job(config: Config, run: RunDirectory, stage: Stage = _log_stage, progress: bool = True) -> JobResult:
    """Run every stage of the main job into ``run`` (see the module docstring).

    Args:
        config: The resolved config (already stored in the run directory).
        run: The run directory (new or resumed).
        stage: Called with a one-line description as each stage starts.
        progress: Show progress bars (they switch themselves off when stderr is not a terminal).
    """
    from automl_prune.export import export_model
    from automl_prune.run_report import write_run_report

    preflight(config)
    if not config.search.only and run.complete():
        stage(
            f"{run.path} holds a finished run: nothing to redo (`automl-prune report --run {run.path}` measures it "
            "again; `--overwrite` starts afresh)"
        )
        return JobResult(run.path, None, json.loads((run.path / "report.json").read_text()))
    set_threads(config)
    seed_everything(config.seed)
    total = 3 if config.search.only else 5
    stage(f"[1/{total}] data {config.data.dataset}, dense model {config.model.checkpoint or config.model.name}")
    data = load_data(config)
    model, info, source = dense_model(config, data)
    copy_checkpoint(source, run.path / "baseline.pt")
    budget = budget_of(config)
    known = run_latency_model(run)
    fitting = budget.has_latency and known is None
    stage(
        f"[2/{total}] evaluator under {budget.describe()}"
        + (f" (measuring {config.search.latency_plans} plans to fit the latency model)" if fitting else "")
    )
    evaluator = make_evaluator(config, model, data, latency_model=known)
    if evaluator.latency_model is not None:
        write_json(run.path / LATENCY_MODEL_FILE, evaluator.latency_model.to_dict())
        if fitting:
            stage(f"      {evaluator.latency_model.describe()}")
    for line in structure_notes(evaluator.graph):
        stage(f"      {line}")
    space = make_space(config, evaluator)
    stage(f"[3/{total}] search: {config.search.strategy}, {config.search.evaluations} evaluations")
    outcome = run_search(config, run, evaluator, space, info.spec, progress=progress, stage=stage)
    if config.search.only:
        return JobResult(run.path, outcome, None)
    ft = f"fine-tune {config.finetune.epochs:g} epochs" if config.finetune.epochs > 0 else "no fine-tune"
    stage(f"[4/{total}] prune with {config.prune.criterion}, {ft}, export")
    pruned, pruned_info = prune_and_finetune(config, model, info, outcome.plan, data, evaluator, outcome.refinement)
    paths = export_model(pruned, pruned_info, run.path, check_inputs=data.test.images[:8])
    export_model(model, info, run.path, stem="baseline", checkpoint=False, check_inputs=data.test.images[:8])
    write_json(
        run.path / "export.json",
        {"onnx_max_abs_diff": paths.onnx_max_abs_diff, "torchscript_max_abs_diff": paths.torchscript_max_abs_diff},
    )
    stage(
        f"[5/{total}] report: test accuracy and latency of baseline and pruned model on {budget.runtime} ({budget.device})"
    )
    report = write_run_report(run.path, config, data)
    return JobResult(run.path, outcome, report)


def run_compare(config: Config, out: str | Path) -> list[Any]:
    """``automl-prune compare``: every ``compare.strategies`` entry with every seed, as a Tune experiment in ``out``.

    An interrupted comparison in ``out`` resumes: finished trials are kept.

    Returns:
        One summary row per entry, as written to comparison.md/.csv.
    """
    from automl_prune.compare import parse_entries, run_comparison
    from automl_prune.report import write_comparison

    set_threads(config)
    s, c, par = config.search, config.compare, config.parallel
    entries = parse_entries(c.strategies, s)
    data = load_data(config)
    model, info, _ = dense_model(config, data)
    evaluator = make_evaluator(config, model, data, reward_of="uniform")  # one reward for every entry
    make_space(config, evaluator)  # a budget no plan can meet fails here, before any search
    results = run_comparison(
        worker_spec_of(config, evaluator, info.spec),
        entries,
        c.seeds,
        s.evaluations,
        out,
        {"min_keep": s.min_keep, "skip_gates": s.skip_gates},
        workers=par.workers,
        address=par.ray_address,
        cpus_per_worker=par.cpus_per_worker,
        gpus_per_worker=par.gpus_per_worker,
    )
    seeds = ",".join(map(str, c.seeds))
    title = (
        f"{', '.join(e.label for e in entries)} under {budget_of(config).describe()}, "
        f"{s.evaluations} evaluations, seeds {seeds}"
    )
    return write_comparison(results, out, title)


@dataclass
class SkipNetResult:
    """What :func:`run_skipnet` wrote and measured (``report`` is ``report.json``'s content)."""

    out: Path
    report: dict[str, Any]


def run_skipnet(config: Config, out: str | Path, stage: Stage = _log_stage) -> SkipNetResult:
    """``automl-prune skipnet``: dynamic SkipNet gates trained to mean FLOPs <= ``budget.flops``, against a static plan.

    The gates are trained on the dense model (:func:`automl_prune.dynamic.train_gated`), the
    threshold calibrated on search-val; the static plan removes channels uniformly (the
    ``prune.criterion``) to the gated model's mean FLOPs and is fine-tuned for as many steps.
    Both, and the dense model, are tested on the test split and timed at batch 1 on real test
    images in TorchScript and onnxruntime. Written to ``out``: ``gated.pt`` (reloadable with
    :func:`~automl_prune.dynamic.load_gated`), ``gated.ts`` and ``gated.onnx`` (both checked
    against the eager model before they are written), ``report.md``, ``report.json``, ``gates.png``.

    Raises:
        InvalidValueError: A budget other than a FLOPs fraction, or a model without skippable residual blocks.
    """
    import time

    from automl_prune import dynamic
    from automl_prune.io import atomic_path
    from automl_prune.measure.accuracy import evaluate_accuracy
    from automl_prune.measure.latency import measure_interleaved, round_ratio
    from automl_prune.runtimes import get_runtime
    from automl_prune.strategy import make_strategy
    from automl_prune.training import train

    b = config.budget
    if b.flops is None or b.flops > 1 or any(v is not None for v in (b.params, b.latency_ms, b.speedup)):
        raise InvalidValueError(
            "skipnet targets a mean FLOPs share: give --budget.flops F with 0 < F <= 1 and no params, latency_ms "
            "or speedup term"
        )
    check_names(config)
    set_threads(config)
    seed_everything(config.seed)
    started = time.perf_counter()
    out = output_dir(out)
    g = config.gates
    stage(f"[1/5] data {config.data.dataset}, dense model {config.model.checkpoint or config.model.name}")
    data = load_data(config)
    model, info, _ = dense_model(config, data)
    model = model.cpu().eval()
    example = info.example_inputs()
    net = dynamic.GatedNetwork(model, example, hidden=g.hidden)
    stage(
        f"[2/5] gates on {len(net.blocks)} blocks: {g.pretrain_steps} soft steps, {g.rl_steps} hybrid-RL steps, "
        f"mean FLOPs <= {b.flops:.0%} (skipping every block leaves {net.floor_share():.0%})"
    )
    gate_config = dynamic.GateConfig(
        pretrain_steps=g.pretrain_steps,
        rl_steps=g.rl_steps,
        lr=g.lr,
        network_lr_scale=g.network_lr_scale,
        batch_size=g.batch_size,
        compute_weight=g.compute_weight,
        target_flops=b.flops,
        dual_lr=g.dual_lr,
        hidden=g.hidden,
        seed=config.seed,
        device=compute_device(config),
    )
    history = dynamic.train_gated(net, data, gate_config)
    test = data.test if config.report.test_size is None else data.test.subset(config.report.test_size, seed=config.seed)
    gated = dynamic.gate_statistics(net, test)
    val_share = dynamic.gate_statistics(net, data.search_val).mean_flops_share
    steps = g.pretrain_steps + g.rl_steps
    stage(
        f"[3/5] static plan at the gated model's {val_share:.1%} mean FLOPs ({config.prune.criterion}), {steps} steps"
    )
    static_config = dataclasses.replace(config, budget=dataclasses.replace(b, flops=val_share))
    evaluator = make_evaluator(static_config, model, data)
    plan = (
        make_strategy("uniform").search(evaluator, make_space(static_config, evaluator), 1, seed=config.seed).best_plan
    )
    static = evaluator.build(plan)
    if steps > 0:
        epochs = steps * g.batch_size / len(data.train)
        tune = TrainConfig(epochs=epochs, lr=config.finetune.lr, batch_size=g.batch_size, seed=config.seed)
        static = train(static, data, tune, description="fine-tune static").model
    static_share = evaluator.cost(plan).flops / evaluator.graph.flops
    stage("[4/5] export (TorchScript, ONNX: both checked against the eager model)")
    scripted = dynamic.script_gated(net)
    check = test.images[:16]
    with torch.no_grad():
        expected = net.eval()(check)
        if not torch.allclose(scripted(check), expected, atol=1e-4):
            raise InvalidValueError("the scripted gated model disagrees with the eager one; nothing was exported")
    ts, ort = get_runtime("torchscript"), get_runtime("onnxruntime")
    onnx_bytes, onnx_note = None, ""
    try:
        onnx_bytes = ort.convert(scripted, example)
        onnx_diff = float((torch.from_numpy(ort.run(onnx_bytes, check)) - expected).abs().max())  # type: ignore[attr-defined]
        if onnx_diff > 1e-3:
            onnx_bytes, onnx_note = None, f"not shipped: onnxruntime differs from torch by {onnx_diff:.2e}"
    except Exception as exc:  # noqa: BLE001 - the exporter raises many types; the report says why
        onnx_bytes, onnx_note = None, f"not exported ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
    files = ["gated.pt", "gated.ts", "report.md", "report.json", "gates.png"]
    dynamic.save_gated(out / "gated.pt", net, info.spec, tuple(example.shape), {"target_flops": b.flops})
    with atomic_path(out / "gated.ts") as tmp:
        scripted.save(str(tmp))
    if onnx_bytes is not None:
        with atomic_path(out / "gated.onnx") as tmp:
            tmp.write_bytes(onnx_bytes)
        files.insert(2, "gated.onnx")
    else:  # an earlier run's file must not sit beside this run's model
        (out / "gated.onnx").unlink(missing_ok=True)
    threads = b.threads or torch.get_num_threads()
    images = test.images[: g.latency_images]
    stage(f"[5/5] latency at batch 1 on {len(images)} test images, {threads} thread(s); report")
    artifacts = {
        "torchscript": {
            "dense": ts.convert(model, example),
            "static plan": ts.convert(static, example),
            "gated": scripted,
        },
        "onnxruntime": {"dense": ort.convert(model, example), "static plan": ort.convert(static, example)},
    }
    if onnx_bytes is not None:
        artifacts["onnxruntime"]["gated"] = onnx_bytes
    latency: dict[str, dict[str, dict[str, Any]]] = {}
    for runtime, models in artifacts.items():
        runners = {label: dynamic.image_runner(runtime, a, images, threads) for label, a in models.items()}
        try:
            measured = measure_interleaved(
                runners, rounds=config.report.latency_rounds, runs=len(images), reference="dense"
            )
        finally:
            for runner in runners.values():
                runner.close()
        latency[runtime] = {
            label: {**s.to_dict(), "speedup": 1.0 / round_ratio(s, measured["dense"])} for label, s in measured.items()
        }
    shares = sorted(gated.flops_shares)
    report = {
        "model": info.spec.name,
        "dataset": data.name,
        "target_flops": b.flops,
        "test_images": len(test),
        "gates": dataclasses.asdict(g),
        "dense": {"test_accuracy": evaluate_accuracy(model, test)},
        "static": {
            "plan": plan.to_dict(),
            "criterion": config.prune.criterion,
            "round_to": evaluator.config.round_to,
            "flops_share": static_share,
            "test_accuracy": evaluate_accuracy(static, test),
        },
        "gated": {
            **gated.to_dict(),
            "test_accuracy": gated.accuracy,
            "blocks": list(net.blocks),
            "block_flops_share": [f / net.dense_flops for f in net.block_flops],
            "flops_p10": shares[int(0.1 * (len(shares) - 1))],
            "flops_p90": shares[int(0.9 * (len(shares) - 1))],
            "search_val_flops_share": val_share,
        },
        "onnx": onnx_note or "exported and checked against torch",
        "latency": {"images": len(images), "threads": threads, "runtimes": latency},
        "training": history,
        "seconds": time.perf_counter() - started,
        "files": files,
    }
    dynamic.write_report(out, report, gated.flops_shares)
    return SkipNetResult(out, report)

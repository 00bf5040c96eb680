"""The ``automl-prune`` command.

Sub-commands: ``list``, ``graph``, ``train``, ``prune``, ``finetune``, ``export``,
``latency`` and ``pipeline`` (train -> uniform prune -> fine-tune -> export). Errors
caused by input are printed as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from automl_prune import __version__
from automl_prune.errors import AutomlPruneError, InvalidValueError

logger = logging.getLogger("automl_prune")

EXIT_USAGE = 2


# --------------------------------------------------------------------------- helpers
def _console() -> Any:
    from rich.console import Console

    # Pipes and CI logs get a wide fixed width so tables are never squeezed into ellipses.
    return Console(highlight=False, width=None if sys.stdout.isatty() else 160)


def _table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for i, col in enumerate(columns):
        numeric = all(isinstance(row[i], (int, float)) for row in rows if i < len(row) and row[i] != "")
        table.add_column(col, justify="right" if numeric and i > 0 else "left")
    for row in rows:
        table.add_row(*[_fmt(v) for v in row])
    _console().print(table)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and abs(value) >= 1_000:
        return f"{value:,}"
    return str(value)


def _human(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _fraction(text: str) -> float:
    value = _positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1], got {text}")
    return value


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got '{text}'") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {text}")
        return value

    return parse


_positive_int = _int_at_least(1)
_nonneg_int = _int_at_least(0)


def _add_data_args(p: argparse.ArgumentParser, default_dataset: str | None = "fashion-mnist") -> None:
    p.add_argument("--dataset", default=default_dataset, help="dataset name (see `list datasets`)")
    p.add_argument("--data-dir", default=None, help="directory holding the dataset's files")
    p.add_argument("--val-size", type=_nonneg_int, default=None, help="search-val images held out of train")
    p.add_argument("--image-size", type=_positive_int, default=None, help="resize images to this square size")
    p.add_argument("--seed", type=_nonneg_int, default=0, help="seed of splits, init and batch order")


def _add_train_args(p: argparse.ArgumentParser, epochs: float, lr: float) -> None:
    p.add_argument("--epochs", type=_positive_float, default=epochs, help="epochs (fractions allowed)")
    p.add_argument("--lr", type=_positive_float, default=lr, help="peak learning rate (SGD, cosine schedule)")
    p.add_argument("--batch-size", type=_positive_int, default=128, help="mini-batch size")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="L2 weight decay")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: all)")


def _load_data(args: argparse.Namespace) -> Any:
    from automl_prune.data import load_dataset

    return load_dataset(args.dataset, args.data_dir, val_size=args.val_size, seed=args.seed, image_size=args.image_size)


def _train_config(args: argparse.Namespace, **extra: Any) -> Any:
    from automl_prune.training import TrainConfig

    return TrainConfig(
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        weight_decay=args.weight_decay,
        seed=args.seed,
        **extra,
    )


def _set_threads(args: argparse.Namespace) -> None:
    import torch

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


def _prepare_out(out: Path, overwrite: bool) -> Path:
    if out.exists() and not out.is_dir():
        raise InvalidValueError(f"--out '{out}' exists and is not a directory; choose another path")
    out.mkdir(parents=True, exist_ok=True)
    return out


# --------------------------------------------------------------------------- commands
def cmd_list(args: argparse.Namespace) -> int:
    """List registered components of one kind."""
    if args.kind == "models":
        from automl_prune.models import list_models

        rows = list_models()
    elif args.kind == "datasets":
        from automl_prune.data import DATASETS

        rows = [(n, DATASETS.describe(n)) for n in DATASETS.names()]
    elif args.kind == "strategies":
        from automl_prune.strategy import STRATEGIES

        rows = [(n, STRATEGIES.describe(n)) for n in STRATEGIES.names()]
    elif args.kind == "envs":
        from automl_prune.envs import list_envs

        rows = list_envs()
    elif args.kind == "rewards":
        from automl_prune.reward import REWARDS

        rows = [(n, REWARDS.describe(n)) for n in REWARDS.names()]
    else:
        from automl_prune.criteria import CRITERIA

        rows = [(n, CRITERIA.describe(n)) for n in CRITERIA.names()]
    _table(args.kind, ["name", "description"], rows)
    return 0


def _model_and_input(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(model, example_inputs, checkpoint info or None) from --checkpoint or --model + data shape."""
    import torch

    from automl_prune.checkpoint import load_checkpoint
    from automl_prune.models import ModelSpec, build_model

    if getattr(args, "checkpoint", None):
        model, info = load_checkpoint(args.checkpoint)
        return model, info.example_inputs(), info
    if not getattr(args, "model", None):
        raise InvalidValueError("give --checkpoint FILE or --model NAME")
    spec = ModelSpec(args.model, args.in_channels, args.num_classes)
    return build_model(spec).eval(), torch.zeros(1, args.in_channels, args.input_size, args.input_size), None


def cmd_graph(args: argparse.Namespace) -> int:
    """Print the prunable groups of a model."""
    from automl_prune.graph import LayerGraph, group_table

    model, x, info = _model_and_input(args)
    graph = LayerGraph(model, x)
    rows = group_table(graph, info.plan if info else None, info.round_to if info else 1)
    cols = ["group", "type", "in", "out", "kernel", "stride", "out_size", "coupled", "flops", "params"]
    _table(
        f"{len(graph.groups)} prunable groups, {_human(graph.flops)} FLOPs (MACs), {_human(graph.params)} params",
        cols,
        [[r[c] for c in cols] for r in rows],
    )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train (or load the cached) baseline and copy its checkpoint into --out."""
    from automl_prune.baseline import copy_checkpoint, train_baseline
    from automl_prune.models import ModelSpec

    _set_threads(args)
    data = _load_data(args)
    spec = ModelSpec(args.model, data.in_channels, data.num_classes)
    config = _train_config(args, bn_l1=args.bn_l1)
    out = _prepare_out(Path(args.out), overwrite=True)
    start = time.perf_counter()
    baseline = train_baseline(spec, data, config, Path(args.cache_dir) if args.cache_dir else None)
    copy_checkpoint(baseline.path, out / "model.pt")
    meta = baseline.info.meta
    _table(
        f"baseline {spec.name} on {data.name}" + (" (cached)" if baseline.cached else ""),
        ["model", "epochs", "val acc", "test acc", "seconds", "checkpoint"],
        [
            [
                spec.name,
                config.epochs,
                meta["val_accuracy"],
                meta["test_accuracy"],
                time.perf_counter() - start,
                str(out / "model.pt"),
            ]
        ],
    )
    return 0


def _plan_from_args(args: argparse.Namespace, graph: Any) -> Any:
    from automl_prune.types import Plan

    if args.plan and args.flops:
        raise InvalidValueError("give either --plan FILE or --flops FRACTION, not both")
    if args.plan:
        path = Path(args.plan)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise InvalidValueError(f"plan file '{path}' does not exist") from None
        except json.JSONDecodeError as exc:
            raise InvalidValueError(f"plan file '{path}' is not valid JSON: {exc}") from None
        plan = Plan.from_dict(data)
        graph.validate(plan)
        return plan
    return graph.uniform_plan(args.flops or 0.5, round_to=args.round_to)


def _prune_checkpoint(args: argparse.Namespace, model: Any, info: Any, data: Any) -> tuple[Any, Any, Any]:
    """Prune ``model`` per args; return (pruned model, plan, graph)."""
    from automl_prune.graph import LayerGraph
    from automl_prune.pruning import apply

    if info.plan is not None and info.plan.keep_ratios:
        raise InvalidValueError("the checkpoint is already pruned; prune its dense baseline instead")
    graph = LayerGraph(model, info.example_inputs())
    plan = _plan_from_args(args, graph)
    batches = None
    if data is not None:
        batches = list(data.search_val.batches(args.batch_size))[: args.criterion_batches]
    pruned = apply(model, plan, args.criterion, graph=graph, round_to=args.round_to, data=batches)
    return pruned, plan, graph


def cmd_prune(args: argparse.Namespace) -> int:
    """Prune a dense checkpoint with a plan file or a uniform FLOPs target."""
    from automl_prune.checkpoint import CheckpointInfo, load_checkpoint, save_checkpoint
    from automl_prune.criteria import CRITERIA
    from automl_prune.graph import count_cost
    from automl_prune.io import write_json

    model, info = load_checkpoint(args.checkpoint)
    if args.criterion not in CRITERIA:
        CRITERIA.get(args.criterion)
    data = _load_data(args) if args.dataset else None
    pruned, plan, graph = _prune_checkpoint(args, model, info, data)
    out = _prepare_out(Path(args.out), overwrite=True)
    new_info = CheckpointInfo(
        info.spec, info.input_shape, plan, args.round_to, {**info.meta, "criterion": args.criterion}
    )
    save_checkpoint(out / "model.pt", pruned, new_info)
    write_json(out / "plan.json", plan.to_dict())
    cost = count_cost(pruned, info.example_inputs())
    rows = [["dense", graph.flops, graph.params, 1.0], ["pruned", cost.flops, cost.params, cost.flops / graph.flops]]
    if data is not None:
        from automl_prune.measure.accuracy import evaluate_accuracy

        rows[0].append(evaluate_accuracy(model, data.test))
        rows[1].append(evaluate_accuracy(pruned, data.test))
    _table(
        f"pruned with {args.criterion} -> {out / 'model.pt'}",
        ["model", "FLOPs", "params", "FLOPs ratio", "test acc"][: len(rows[0])],
        rows,
    )
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    """Fine-tune a (pruned) checkpoint; keep the best epoch on search-val."""
    from automl_prune.checkpoint import CheckpointInfo, load_checkpoint, save_checkpoint
    from automl_prune.measure.accuracy import evaluate_accuracy
    from automl_prune.training import train

    _set_threads(args)
    model, info = load_checkpoint(args.checkpoint)
    data = _load_data(args)
    before = evaluate_accuracy(model, data.test)
    result = train(model, data, _train_config(args), description="fine-tune")
    after = evaluate_accuracy(result.model, data.test)
    out = _prepare_out(Path(args.out), overwrite=True)
    meta = {**info.meta, "finetune": {"epochs": args.epochs, "lr": args.lr, "test_before": before, "test_after": after}}
    save_checkpoint(
        out / "model.pt", result.model, CheckpointInfo(info.spec, info.input_shape, info.plan, info.round_to, meta)
    )
    _table(
        "fine-tune",
        ["test acc before", "test acc after", "best val acc", "checkpoint"],
        [[before, after, result.val_accuracy, str(out / "model.pt")]],
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export a checkpoint to checkpoint + TorchScript + ONNX and check ONNX against torch."""
    import torch

    from automl_prune.checkpoint import load_checkpoint
    from automl_prune.export import check_onnx, export_model

    model, info = load_checkpoint(args.checkpoint)
    paths = export_model(model, info, Path(args.out))
    diff = check_onnx(model, paths.onnx, torch.randn(8, *info.input_shape[1:]))
    _table(
        "export",
        ["format", "file"],
        [
            ["checkpoint", paths.checkpoint],
            ["TorchScript", paths.torchscript],
            ["ONNX", paths.onnx],
            ["ONNX max |diff| vs torch", f"{diff:.2e}"],
        ],
    )
    return 0


def cmd_latency(args: argparse.Namespace) -> int:
    """Measure a model's latency end to end and predict it from the lookup table."""
    from automl_prune.measure.latency import LatencyTable, measure_latency

    model, x, _ = _model_and_input(args)
    shape = (args.batch_size, *x.shape[1:])
    stats = measure_latency(
        model, shape, device=args.device, threads=args.threads, runs=args.runs, channels_last=args.channels_last
    )
    table = LatencyTable(device=args.device, threads=stats.threads, batch_size=args.batch_size)
    predicted = table.predict(model, shape)
    error = (predicted - stats.median_ms) / stats.median_ms
    _table(
        f"latency on {args.device}, batch {args.batch_size}, {stats.threads} threads",
        ["measured median ms", "p10", "p90", "runs", "predicted ms (LUT)", "error"],
        [[stats.median_ms, stats.p10_ms, stats.p90_ms, stats.runs, predicted, f"{error:+.1%}"]],
    )
    return 0


def _budget_from_args(args: argparse.Namespace) -> Any:
    from automl_prune.types import Budget

    flops = args.flops
    if flops is None and args.params is None and args.latency_ms is None:
        flops = 0.5
    return Budget(
        flops=flops,
        params=args.params,
        latency_ms=args.latency_ms,
        device=args.device,
        batch_size=args.latency_batch_size,
        threads=args.threads,
    )


def _dense_model(args: argparse.Namespace, data: Any) -> tuple[Any, Any]:
    """(dense model, its ModelSpec) from --checkpoint, or the cached/trained baseline of --model."""
    from automl_prune.baseline import train_baseline
    from automl_prune.checkpoint import load_checkpoint
    from automl_prune.models import ModelSpec

    if args.checkpoint:
        model, info = load_checkpoint(args.checkpoint)
        if info.plan is not None and info.plan.keep_ratios:
            raise InvalidValueError("the checkpoint is already pruned; search on its dense baseline instead")
        return model, info.spec
    spec = ModelSpec(args.model, data.in_channels, data.num_classes)
    return train_baseline(spec, data, _train_config(args), Path(args.cache_dir) if args.cache_dir else None).model, spec


def _evaluator_config(args: argparse.Namespace) -> Any:
    from automl_prune.evaluator import EvaluatorConfig

    return EvaluatorConfig(
        criterion=args.criterion,
        reward=args.reward,
        eval_size=args.eval_size,
        bn_recalibration=not args.no_bn_recalibration,
        finetune_steps=args.fitness_finetune_steps,
        round_to=args.round_to,
        seed=args.seed,
    )


def cmd_compare(args: argparse.Namespace) -> int:
    """Run several strategies with the same seeds and evaluation budget; write the comparison."""
    from automl_prune.compare import run_comparison
    from automl_prune.evaluator import Evaluator
    from automl_prune.parallel import spec_for
    from automl_prune.report import write_comparison
    from automl_prune.search_spaces import SearchSpace

    _set_threads(args)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise InvalidValueError(f"--seeds must be comma-separated integers, got '{args.seeds}'") from None
    budget = _budget_from_args(args)
    data = _load_data(args)
    model, spec = _dense_model(args, data)
    evaluator = Evaluator(model, data, budget, _evaluator_config(args))
    space_kwargs = {"min_keep": args.min_keep, "skip_gates": args.skip_gates}
    SearchSpace(evaluator, **space_kwargs)  # a budget no plan can meet fails here, before any search
    worker_spec = spec_for(
        evaluator,
        spec,
        args.dataset,
        data_dir=args.data_dir,
        val_size=args.val_size,
        data_seed=args.seed,
        image_size=args.image_size,
    )
    results = run_comparison(
        worker_spec,
        strategies,
        seeds,
        args.evaluations,
        space_kwargs,
        workers=args.workers,
        address=args.ray_address,
        evaluator=evaluator,
    )
    out = _prepare_out(Path(args.out), overwrite=True)
    rows = write_comparison(
        results,
        out,
        f"{', '.join(strategies)} under {budget.describe()}, {args.evaluations} evaluations, seeds {args.seeds}",
    )
    _table(
        f"comparison -> {out / 'comparison.md'}",
        ["strategy", "seeds", "best acc (mean)", "std", "FLOPs ratio", "evals to 99%", "wall s"],
        [[r.strategy, r.seeds, r.best_mean, r.best_std, r.best_flops_ratio, r.evals_to_99, r.wall_time] for r in rows],
    )
    return 0


_NOT_CONFIG = {"func", "verbose", "resume", "overwrite", "out", "command"}
"""Options that do not define a search run (and may differ when it is resumed)."""

_BATCHED = ("random", "abc", "optuna")
"""Ask/tell strategies that ask a worker-sized batch at a time when run in parallel."""


def cmd_search(args: argparse.Namespace) -> int:
    """Search the best plan for a budget with one strategy; write plan.json and result.json."""
    from automl_prune.evaluator import Evaluator
    from automl_prune.io import write_json
    from automl_prune.runs import RunDirectory
    from automl_prune.search_spaces import SearchSpace
    from automl_prune.strategy import STRATEGIES, get_strategy

    if args.resume:
        run = RunDirectory(args.resume, resume=True)
        saved = dict(run.config)
        args = argparse.Namespace(**{**saved, "resume": args.resume, "out": args.resume, "verbose": args.verbose})
    else:
        options = {k: v for k, v in vars(args).items() if k not in _NOT_CONFIG}
        run = RunDirectory(args.out, options, overwrite=args.overwrite)
    _set_threads(args)
    if args.strategy not in STRATEGIES:
        STRATEGIES.get(args.strategy)
    budget = _budget_from_args(args)
    data = _load_data(args)
    model, spec = _dense_model(args, data)
    config = _evaluator_config(args)
    evaluator = Evaluator(model, data, budget, config)
    space = SearchSpace(evaluator, min_keep=args.min_keep, skip_gates=args.skip_gates or args.strategy == "skipnet")
    for plan, evaluation in run.logged():
        evaluator.preload(plan, evaluation)
    if run.records:
        logger.warning("resuming %s: %d of %d evaluations already done", run.path, len(run.records), args.evaluations)
    from tqdm.auto import tqdm

    bar = tqdm(total=args.evaluations, desc=f"search {args.strategy}", unit="eval", disable=None)

    def progress(session: Any, plan: Any, evaluation: Any) -> None:
        best = session.best()
        bar.update(1)
        if best is not None:
            bar.set_postfix(best_acc=f"{best[1].accuracy:.4f}")

    pool = None
    try:
        evaluate_many = None
        if args.workers > 1 or args.ray_address:
            from automl_prune.parallel import RayEvaluatorPool, spec_for

            worker_spec = spec_for(
                evaluator,
                spec,
                args.dataset,
                data_dir=args.data_dir,
                val_size=args.val_size,
                data_seed=args.seed,
                image_size=args.image_size,
            )
            pool = RayEvaluatorPool(
                worker_spec,
                workers=args.workers,
                address=args.ray_address,
                cpus_per_worker=args.cpus_per_worker,
                gpus_per_worker=args.gpus_per_worker,
            )
            evaluate_many = pool.evaluate_many_cached(evaluator)
        strategy = get_strategy(args.strategy, **({"batch_size": args.workers} if args.strategy in _BATCHED else {}))
        log = run.callback(args.strategy, placements=getattr(evaluate_many, "placements", None))
        result = strategy.search(
            evaluator, space, args.evaluations, seed=args.seed, callbacks=[log, progress], evaluate_many=evaluate_many
        )
    except KeyboardInterrupt:
        print(
            f"automl-prune: interrupted; {len(run.logged())} evaluations are logged in {run.path}. "
            f"Resume with: automl-prune search --resume {run.path}",
            file=sys.stderr,
        )
        return 130
    finally:
        bar.close()
        if pool is not None:
            pool.close()
        if "log" in locals():
            log.close()
    out = run.path
    write_json(out / "plan.json", result.best_plan.to_dict())
    write_json(
        out / "result.json",
        {
            "strategy": result.strategy,
            "seed": result.seed,
            "budget": budget.to_dict(),
            "evaluations": result.evaluations,
            "wall_time": result.wall_time,
            "dense": evaluator.dense.to_dict(),
            "best_plan": result.best_plan.to_dict(),
            "best": result.best_evaluation.to_dict(),
            "history": [{"plan": p.to_dict(), "evaluation": e.to_dict()} for p, e in result.history],
        },
    )
    best = result.best_evaluation
    _table(
        f"{args.strategy}: best of {result.evaluations} evaluations under {budget.describe()} -> {out / 'plan.json'}",
        ["model", "search-val acc", "FLOPs", "params", "FLOPs ratio", "feasible"],
        [
            ["dense", evaluator.dense.accuracy, evaluator.dense.flops, evaluator.dense.params, 1.0, True],
            ["best plan", best.accuracy, best.flops, best.params, best.flops_ratio, best.feasible],
        ],
    )
    kept = evaluator.graph.kept_channels(result.best_plan, config.round_to)
    _table(
        "kept channels per group",
        ["group", "channels", "kept", "keep ratio"],
        [[g.name, g.channels, kept[g.name], kept[g.name] / g.channels] for g in evaluator.graph.groups],
    )
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    """Train (cached) -> uniform FLOPs prune -> fine-tune -> export, then print a table."""

    from automl_prune.baseline import train_baseline
    from automl_prune.checkpoint import CheckpointInfo
    from automl_prune.export import check_onnx, export_model
    from automl_prune.graph import LayerGraph, count_cost
    from automl_prune.io import write_json
    from automl_prune.measure.accuracy import evaluate_accuracy
    from automl_prune.measure.latency import measure_latency
    from automl_prune.models import ModelSpec
    from automl_prune.pruning import apply
    from automl_prune.training import TrainConfig

    _set_threads(args)
    console = _console()
    data = _load_data(args)
    spec = ModelSpec(args.model, data.in_channels, data.num_classes)
    out = _prepare_out(Path(args.out), overwrite=True)
    console.print(f"[1/4] baseline {spec.name} on {data.name} ({args.epochs:g} epochs)")
    base = train_baseline(spec, data, _train_config(args), Path(args.cache_dir) if args.cache_dir else None)
    x = base.info.example_inputs()
    graph = LayerGraph(base.model, x)
    plan = graph.uniform_plan(args.flops, round_to=args.round_to)
    console.print(f"[2/4] uniform plan at {args.flops:.0%} FLOPs, criterion {args.criterion}")
    batches = list(data.search_val.batches(128))[:8]
    pruned = apply(base.model, plan, args.criterion, graph=graph, round_to=args.round_to, data=batches)
    acc_pruned = evaluate_accuracy(pruned, data.test)
    console.print(f"[3/4] fine-tune {args.finetune_epochs:g} epochs")
    ft = TrainConfig(epochs=args.finetune_epochs, lr=args.finetune_lr, batch_size=args.batch_size, seed=args.seed)
    from automl_prune.training import train

    pruned = train(pruned, data, ft, description="fine-tune").model
    console.print("[4/4] export")
    info = CheckpointInfo(
        spec, tuple(x.shape), plan, args.round_to, {"dataset": data.name, "criterion": args.criterion}
    )
    paths = export_model(pruned, info, out)
    onnx_diff = check_onnx(pruned, paths.onnx, data.test.images[:8])
    write_json(out / "plan.json", plan.to_dict())
    rows = []
    summary: dict[str, Any] = {}
    for label, model in (("baseline", base.model), ("pruned + fine-tuned", pruned)):
        cost = count_cost(model, x)
        acc = evaluate_accuracy(model, data.test)
        lat1 = measure_latency(model, (1, *x.shape[1:]), threads=args.threads).median_ms
        lat64 = measure_latency(model, (64, *x.shape[1:]), threads=args.threads, runs=10, warmup=3).median_ms
        rows.append([label, acc, cost.flops, cost.params, lat1, lat64])
        summary[label] = {
            "test_accuracy": acc,
            "flops": cost.flops,
            "params": cost.params,
            "latency_ms_b1": lat1,
            "latency_ms_b64": lat64,
        }
    rows.insert(1, ["pruned (before fine-tune)", acc_pruned, rows[1][2], rows[1][3], "", ""])
    summary["pruned_before_finetune_accuracy"] = acc_pruned
    summary["onnx_max_abs_diff"] = onnx_diff
    write_json(out / "summary.json", summary)
    _table(
        f"{spec.name} on {data.name}: uniform {args.flops:.0%} FLOPs, {args.criterion} -> {out}",
        ["model", "test acc", "FLOPs", "params", "ms (b=1)", "ms (b=64)"],
        rows,
    )
    b, p = summary["baseline"], summary["pruned + fine-tuned"]
    console.print(
        f"FLOPs x{b['flops'] / p['flops']:.2f} smaller, speed-up x{b['latency_ms_b1'] / p['latency_ms_b1']:.2f} (b=1), "
        f"x{b['latency_ms_b64'] / p['latency_ms_b64']:.2f} (b=64); ONNX matches torch to {onnx_diff:.1e}"
    )
    return 0


# --------------------------------------------------------------------------- parser
def _add_search_args(p: argparse.ArgumentParser) -> None:
    """Options shared by `search` and `compare`: model, data, budget, scoring."""
    p.add_argument("--checkpoint", default=None, help="dense checkpoint to prune (default: train/load --model)")
    p.add_argument("--model", default="fashion_cnn")
    _add_data_args(p)
    _add_train_args(p, epochs=3.0, lr=0.1)
    p.add_argument(
        "--flops", type=_positive_float, default=None, help="FLOPs budget: fraction (<=1) or absolute (default 0.5)"
    )
    p.add_argument("--params", type=_positive_float, default=None, help="parameter budget: fraction (<=1) or absolute")
    p.add_argument("--latency-ms", type=_positive_float, default=None, help="latency budget in ms on --device")
    p.add_argument("--device", default="cpu", help="device the latency budget is for")
    p.add_argument("--latency-batch-size", type=_positive_int, default=1, help="batch size of the latency budget")
    p.add_argument("--evaluations", type=_positive_int, default=50, help="evaluation budget of the search")
    p.add_argument("--reward", default="acc", help="reward (see `list rewards`)")
    p.add_argument("--eval-size", type=_positive_int, default=2000, help="search-val images scored per plan")
    p.add_argument("--no-bn-recalibration", action="store_true", help="score without re-estimating BN statistics")
    p.add_argument("--min-keep", type=_fraction, default=0.2, help="smallest keep ratio of any group")
    p.add_argument("--skip-gates", action="store_true", help="also search skip gates of residual blocks")
    p.add_argument(
        "--fitness-finetune-steps",
        type=_nonneg_int,
        default=0,
        help="SGD steps on each pruned model before scoring it (ABCPruner-style fitness; 0 = off)",
    )
    p.add_argument("--criterion", default="l1", help="importance criterion used when scoring plans")
    p.add_argument("--round-to", type=_positive_int, default=1)
    p.add_argument("--cache-dir", default=None)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``automl-prune`` command."""
    parser = argparse.ArgumentParser(
        prog="automl-prune", description="Search how to prune a neural network under a budget."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="list models, datasets or criteria")
    p.add_argument("kind", choices=["models", "datasets", "criteria", "strategies", "envs", "rewards"])
    p.set_defaults(func=cmd_list)

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--checkpoint", default=None, help="a checkpoint file (dense or pruned)")
        p.add_argument("--model", default=None, help="a model name instead of a checkpoint")
        p.add_argument("--in-channels", type=_positive_int, default=1)
        p.add_argument("--num-classes", type=_positive_int, default=10)
        p.add_argument("--input-size", type=_positive_int, default=28, help="square input size")

    p = sub.add_parser("graph", help="show a model's prunable groups, FLOPs and params")
    model_args(p)
    p.set_defaults(func=cmd_graph)

    p = sub.add_parser("train", help="train a baseline (cached by model, dataset, epochs, seed)")
    p.add_argument("--model", default="fashion_cnn")
    _add_data_args(p)
    _add_train_args(p, epochs=3.0, lr=0.1)
    p.add_argument("--bn-l1", type=float, default=0.0, help="network-slimming L1 penalty on BN scales")
    p.add_argument(
        "--cache-dir", default=None, help="baseline cache (default $AUTOML_PRUNE_CACHE or ~/.cache/automl-prune)"
    )
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_train)

    def prune_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--criterion", default="l1", help="importance criterion (see `list criteria`)")
        p.add_argument("--round-to", type=_positive_int, default=1, help="round kept channels to a multiple")
        p.add_argument("--criterion-batches", type=_positive_int, default=8, help="batches for data-driven criteria")

    p = sub.add_parser("prune", help="prune a checkpoint with a plan file or a uniform FLOPs target")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--plan", default=None, help="plan JSON ({'keep_ratios': {group: keep}})")
    p.add_argument("--flops", type=_fraction, default=None, help="uniform plan with this FLOPs fraction (default 0.5)")
    prune_args(p)
    _add_data_args(p, default_dataset=None)
    p.add_argument("--batch-size", type=_positive_int, default=128)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("finetune", help="fine-tune a checkpoint (cosine LR, best epoch kept)")
    p.add_argument("--checkpoint", required=True)
    _add_data_args(p)
    _add_train_args(p, epochs=1.0, lr=0.01)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("export", help="export a checkpoint to .pt, TorchScript and ONNX")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("latency", help="measured vs lookup-table-predicted latency")
    model_args(p)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--batch-size", type=_positive_int, default=1)
    p.add_argument("--threads", type=_positive_int, default=None)
    p.add_argument("--runs", type=_positive_int, default=30)
    p.add_argument("--channels-last", action="store_true", help="measure in channels_last memory format")
    p.set_defaults(func=cmd_latency)

    p = sub.add_parser("search", help="search the best plan for a budget with one strategy")
    p.add_argument("--strategy", default="ddpg", help="search strategy (see `list strategies`)")
    _add_search_args(p)
    p.add_argument("--workers", type=_positive_int, default=1, help="parallel evaluation workers on Ray")
    p.add_argument("--cpus-per-worker", type=_positive_int, default=1, help="CPUs (and torch threads) per Ray worker")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPU fraction per Ray worker")
    p.add_argument("--ray-address", default=None, help="join an existing Ray cluster (HOST:PORT or auto)")
    p.add_argument("--out", default="runs/search", help="run directory")
    p.add_argument("--resume", default=None, metavar="DIR", help="continue the interrupted run in DIR")
    p.add_argument("--overwrite", action="store_true", help="replace a different run already in --out")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("compare", help="compare strategies on equal evaluation budgets and seeds")
    p.add_argument("--strategies", default="ddpg,ppo,reinforce,abc,optuna,random,uniform,global")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds, the same for every strategy")
    _add_search_args(p)
    p.add_argument("--workers", type=_positive_int, default=1, help="searches run at once on Ray")
    p.add_argument("--ray-address", default=None, help="join an existing Ray cluster (HOST:PORT or auto)")
    p.add_argument("--out", default="runs/compare", help="output directory")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("pipeline", help="train -> uniform prune -> fine-tune -> export, with a summary table")
    p.add_argument("--model", default="fashion_cnn")
    _add_data_args(p)
    _add_train_args(p, epochs=3.0, lr=0.1)
    p.add_argument("--flops", type=_fraction, default=0.5, help="FLOPs target as a fraction of the baseline")
    prune_args(p)
    p.add_argument("--finetune-epochs", type=_positive_float, default=1.0)
    p.add_argument("--finetune-lr", type=_positive_float, default=0.01)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--out", default="runs/pipeline")
    p.set_defaults(func=cmd_pipeline)
    return parser


def _configure_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("torch_pruning", "onnxscript", "torch.onnx", "torch.export"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except AutomlPruneError as exc:
        print(f"automl-prune: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("automl-prune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

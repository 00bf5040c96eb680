"""The ``automl-prune`` command.

``automl-prune search`` is the main job (search -> prune -> fine-tune -> export -> report);
``train``, ``compare``, ``prune``, ``finetune``, ``export``, ``latency``, ``report``, ``graph``
and ``list`` reach each stage alone; ``skipnet`` trains per-input skip gates (dynamic SkipNet).
Every config key ``a.b`` (see :mod:`automl_prune.config`) is the flag ``--a.b``. Errors caused
by input are printed as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from automl_prune import __version__
from automl_prune.errors import AutomlPruneError, InvalidValueError

logger = logging.getLogger("automl_prune")

EXIT_USAGE = 2
EXIT_BUDGET_MISSED = 3
"""Exit status of ``search`` and ``report`` when the measured figures miss the budget."""


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


def _default_text(value: object) -> str:
    """A config default as a user writes it (``null``, ``true``, ``300,300``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value) if not isinstance(value, float) else f"{value:g}"


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


def int_at_least(minimum: int) -> Callable[[str], int]:
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


_positive_int = int_at_least(1)

_CFG = "cfg:"
"""Prefix of the argparse destinations that hold config flags (``--budget.flops`` -> ``cfg:budget.flops``)."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors that name the nearest valid flag."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        if message.startswith("unrecognized arguments:"):
            import difflib

            from automl_prune.config import OPTIONS

            flags = [a.split("=")[0] for a in message.split(":", 1)[1].split() if a.startswith("-")]
            known = [o for action in self._actions for o in action.option_strings if o.startswith("--")]
            if flags:
                match = difflib.get_close_matches(flags[0], known, n=1, cutoff=0.6)
                hint = f"; did you mean '{match[0]}'?" if match else ""
                if flags[0].lstrip("-") in OPTIONS and flags[0] not in known:
                    hint = f"; `{self.prog}` does not use {flags[0]}"
                message = f"unrecognized option {flags[0]}{hint}"
        print(f"{self.prog}: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _add_config_flags(
    p: argparse.ArgumentParser,
    sections: tuple[str, ...] | None,
    top_level: tuple[str, ...] = ("seed",),
    exclude: tuple[str, ...] = (),
) -> None:
    """``--config FILE`` and one ``--section.key VALUE`` flag per config key of ``sections`` (but ``exclude``)."""
    from automl_prune.config import options_for

    p.add_argument(
        "--config",
        action="append",
        default=None,
        metavar="FILE",
        help="YAML config file, or a packaged config by name (smoke, latency_cpu, fashion-mnist/resnet20, ...: "
        "`automl-prune list configs`); keys not given keep their defaults (repeat to layer several files, later ones win)",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    group = p.add_argument_group(
        "config keys (each overrides the config file; documented in the packaged config `default`, "
        "whose path `automl-prune list configs` shows)"
    )
    for option in options_for(sections, top_level):
        if option.path in exclude:
            continue
        names = [option.flag]
        if "_" in option.path:
            names.append(option.flag.replace("_", "-"))
        extra: dict[str, Any] = {}
        if option.type is bool:
            extra = {"nargs": "?", "const": "true"}
        default = _default_text(option.default)
        group.add_argument(
            *names,
            dest=_CFG + option.path,
            default=argparse.SUPPRESS,
            metavar="V",
            help=f"{option.help} [{default}]".replace("%", "%%"),
            **extra,
        )


def _resolve(args: argparse.Namespace) -> Any:
    """The config of a command: defaults, then ``--config``, then the config flags given."""
    from automl_prune.config import resolve

    overrides = {k[len(_CFG) :]: v for k, v in vars(args).items() if k.startswith(_CFG)}
    return resolve(args.config, overrides)


def _printed(args: argparse.Namespace, config: Any) -> bool:
    """Print the resolved config when asked (the command then stops)."""
    if getattr(args, "print_config", False):
        sys.stdout.write(config.to_yaml())
        return True
    return False


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
        if args.verbose:
            from automl_prune.config import OPTIONS

            _table(args.kind, ["name", "description"], rows)
            for name in STRATEGIES.names():
                options = [o for o in OPTIONS.values() if o.path.startswith(f"search.{name}.")]
                if options:
                    _table(
                        f"{name} options (config keys; flags are --KEY)",
                        ["key", "default", "takes", "help"],
                        [(o.path, _default_text(o.default), o.takes, o.help) for o in options],
                    )
            return 0
    elif args.kind == "envs":
        from automl_prune.envs import list_envs

        rows = list_envs()
    elif args.kind == "rewards":
        from automl_prune.reward import REWARDS

        rows = [(n, REWARDS.describe(n)) for n in REWARDS.names()]
    elif args.kind == "configs":
        from automl_prune.config import config_summary, packaged_configs

        configs = packaged_configs()
        _table(
            "configs (give one by name: --config NAME)",
            ["name", "description", "file"],
            [(n, config_summary(p), str(p)) for n, p in configs.items()],
        )
        return 0
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
        raise InvalidValueError(
            "give --checkpoint FILE or --model NAME" + (" (or --artifact FILE)" if hasattr(args, "artifact") else "")
        )
    spec = ModelSpec(args.model, args.in_channels, args.num_classes)
    return build_model(spec).eval(), torch.zeros(1, args.in_channels, args.input_size, args.input_size), None


def cmd_graph(args: argparse.Namespace) -> int:
    """Print the prunable groups of a model."""
    from automl_prune.graph import LayerGraph, group_table, removal_note, structure_notes

    model, x, info = _model_and_input(args)
    graph = LayerGraph(model, x)
    rows = group_table(graph, info.plan if info else None, info.round_to if info else 1)
    cols = ["group", "type", "in", "out", "kernel", "stride", "out_size", "coupled", "flops", "params"]
    _table(
        f"{len(graph.groups)} prunable groups, {_human(graph.flops)} FLOPs (MACs), {_human(graph.params)} params",
        cols,
        [[r[c] for c in cols] for r in rows],
    )
    for line in [*structure_notes(graph), removal_note(graph)]:
        print(line)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train (or load the cached) baseline and copy its checkpoint into --out."""
    from automl_prune.pipeline import train_checkpoint

    config = _resolve(args)
    if _printed(args, config):
        return 0
    try:
        done = train_checkpoint(config, args.out)
    except KeyboardInterrupt as exc:
        print(
            f"automl-prune: {'terminated' if isinstance(exc, Terminated) else 'interrupted'}; the training so far "
            "is kept in the cache: the same command goes on from its last save",
            file=sys.stderr,
        )
        return _interrupted_status(exc)
    _table(
        f"baseline {done.model} on {done.dataset}" + (" (cached)" if done.cached else ""),
        ["model", "epochs", "val acc", "test acc", "seconds", "checkpoint"],
        [[done.model, config.train.epochs, done.val_accuracy, done.test_accuracy, done.seconds, str(done.path)]],
    )
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    """Prune a dense checkpoint with a plan file, or uniformly to budget.flops."""
    from automl_prune.pipeline import prune_checkpoint

    config = _resolve(args)
    if _printed(args, config):
        return 0
    done = prune_checkpoint(config, args.checkpoint, args.out, args.plan, args.point)
    _table(
        f"pruned with {done.criterion} -> {done.path}",
        ["model", "FLOPs", "params", "FLOPs ratio", "test acc"],
        [
            ["dense", done.dense.flops, done.dense.params, 1.0, done.dense_test_accuracy],
            [
                "pruned",
                done.pruned.flops,
                done.pruned.params,
                done.pruned.flops / done.dense.flops,
                done.pruned_test_accuracy,
            ],
        ],
    )
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    """Fine-tune a (pruned) checkpoint; keep the best epoch on search-val."""
    from automl_prune.pipeline import finetune_checkpoint

    config = _resolve(args)
    if _printed(args, config):
        return 0
    done = finetune_checkpoint(config, args.checkpoint, args.out, args.teacher)
    _table(
        "fine-tune",
        ["test acc before", "test acc after", "best val acc", "checkpoint"],
        [[done.test_before, done.test_after, done.best_val_accuracy, str(done.path)]],
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export a checkpoint to checkpoint + TorchScript + ONNX, each file checked against the model before it is written."""
    from automl_prune.export import export_checkpoint

    paths = export_checkpoint(args.checkpoint, args.out)
    _table(
        "export",
        ["format", "file"],
        [
            ["checkpoint", paths.checkpoint],
            ["TorchScript", paths.torchscript],
            ["ONNX", paths.onnx],
            ["TorchScript max |diff| vs torch", f"{paths.torchscript_max_abs_diff:.2e}"],
            ["ONNX max |diff| vs torch", f"{paths.onnx_max_abs_diff:.2e}"],
        ],
    )
    return 0


def cmd_latency(args: argparse.Namespace) -> int:
    """Measure a model (checkpoint, zoo model or exported file) on a runtime; predict it where a latency table exists."""
    from automl_prune.measure.latency_model import check_latency

    model = x = info = None
    if args.checkpoint or args.model or not args.artifact:
        model, x, info = _model_and_input(args)
    done = check_latency(
        model=model,
        example=x,
        info=info,
        artifact=args.artifact,
        runtime=args.runtime,
        device=args.device,
        threads=args.threads,
        batch_size=args.batch_size,
        rounds=args.rounds,
        rebuild=args.rebuild,
        plans=args.plans,
        sample_shape=(args.in_channels, args.input_size, args.input_size),
    )
    m = done.measured
    columns = ["runtime", "median ms", "p10", "p90", "runs", "noisy"]
    row: list[object] = [done.runtime, m.median_ms, m.p10_ms, m.p90_ms, m.runs, m.note or "no"]
    if done.dense is not None:
        columns.append("speed-up over dense")
        row.append(f"x{done.dense.median_ms / m.median_ms:.2f}")
    if done.note is not None:
        columns += ["predicted ms", "error"]
        predicted = done.predicted_ms
        row += [predicted, f"{predicted / m.median_ms - 1:+.1%}"] if predicted is not None else ["n/a", ""]
    _table(
        f"latency on {done.runtime}, {args.device}, batch {args.batch_size}, {done.threads} thread(s)", columns, [row]
    )
    if done.note is not None:
        _console().print(done.note)
    return 0


def _print_run_summary(report: dict[str, Any], out: Path) -> None:
    base, new = report["baseline"], report["pruned"]
    rows = [
        ["baseline", base["test_accuracy"], base["flops"], base["params"], *base["latency_ms"].values()],
        [
            "pruned + fine-tuned" if report.get("finetune") else "pruned",
            new["test_accuracy"],
            new["flops"],
            new["params"],
            *new["latency_ms"].values(),
        ],
    ]
    runtime = report["machine"].get("runtime", "torch")
    _table(
        f"{report['model']} on {report['dataset']}: {report['strategy']} under {report['budget']['description']} -> {out}",
        ["model", "test acc", "FLOPs", "params", *[f"{runtime} ms (b={b})" for b in base["latency_ms"]]],
        rows,
    )
    console = _console()
    speed = ", ".join(f"x{v:.2f} (b={b})" for b, v in report["speedup"].items())
    console.print(
        f"FLOPs x{base['flops'] / new['flops']:.2f} smaller, params x{base['params'] / new['params']:.2f}, "
        f"speed-up on {runtime} {speed}"
    )
    for term in report["budget"]["terms"]:
        name = {"flops": "FLOPs", "params": "params", "latency_ms": "latency", "speedup": "speed-up"}[term["term"]]
        if term["term"] == "latency_ms":
            figure = f"measured {term['measured']:.4g} ms {'<=' if term['met'] else '>'} {term['limit']:g} ms"
            if term.get("predicted") is not None:
                figure += f" (predicted {term['predicted']:.4g} ms, error {term['prediction_error']:+.1%})"
        elif term["term"] == "speedup":
            figure = f"measured x{term['measured']:.2f} {'>=' if term['met'] else '<'} x{term['limit']:g}"
        else:
            figure = f"{term['measured']:,} {'<=' if term['met'] else '>'} {term['limit']:,.0f}"
        verdict = "met" if term["met"] else f"MISSED by {abs(term['margin']):.1%}"
        noisy = " [NOISY measurement: re-run `automl-prune report --run DIR`]" if term.get("noisy") else ""
        console.print(f"budget {name}: {verdict}: {figure}{noisy}")
    for line in report.get("latency_noisy", []):
        console.print(f"noisy latency: {line}")
    console.print(f"report: {out / 'report.md'}")


def _open_run(args: argparse.Namespace, what: str) -> tuple[Any, Any] | None:
    """(run directory, config) of ``--resume DIR`` or of a new run in ``--out``; None once ``--print-config`` printed.

    A new run's config passes :func:`~automl_prune.pipeline.preflight` before its directory is written.
    """
    from automl_prune.config import from_dict, resolve
    from automl_prune.pipeline import preflight
    from automl_prune.runs import RESUME_OPTIONS, RunDirectory

    if args.resume:
        given = {k[len(_CFG) :]: v for k, v in vars(args).items() if k.startswith(_CFG)}
        others = sorted(f"--{k}" for k in given if k not in RESUME_OPTIONS)
        if others or args.config or args.overwrite:
            raise InvalidValueError(
                f"--resume continues a {what} with its own config.yaml; give no --config, --overwrite or config flags "
                f"other than where it computes ({', '.join('--' + k for k in RESUME_OPTIONS)})"
                + (f"; got {', '.join(others)}" if others else "")
            )
        run = RunDirectory(args.resume, resume=True)
        stored = run.path / "config.yaml"
        config = resolve(stored, given) if given else from_dict(run.config, f"'{stored}'")
        if _printed(args, config):
            return None
        if given:  # validated as flags, checked as a new run's would be, then stored for the next resume
            preflight(config)
            run.amend(config.to_dict())
        return run, config
    config = _resolve(args)
    if _printed(args, config):
        return None
    preflight(config, replacing=args.out if args.overwrite else None)
    return RunDirectory(args.out, config.to_dict(), overwrite=args.overwrite), config  # refuses a different run


def cmd_search(args: argparse.Namespace) -> int:
    """The main job: search under the budget, prune, fine-tune, export and report."""
    from automl_prune.pipeline import run_job

    opened = _open_run(args, "run")
    if opened is None:
        return 0
    run, config = opened
    console = _console()
    try:
        job = run_job(config, run, stage=lambda text: console.print(text, highlight=False))
    except KeyboardInterrupt as exc:
        print(
            f"automl-prune: {'terminated' if isinstance(exc, Terminated) else 'interrupted'}; "
            f"{len(run.logged())} evaluations are logged in {run.path}. "
            f"Resume with: automl-prune search --resume {run.path}",
            file=sys.stderr,
        )
        return _interrupted_status(exc)
    if job.report is None:
        best = job.search.evaluation
        _table(
            f"{config.search.strategy}: best of {job.search.result.evaluations} evaluations -> {run.path / 'plan.json'}",
            ["search-val acc", "FLOPs ratio", "params", "feasible"],
            [[best.accuracy, best.flops_ratio, best.params, best.feasible]],
        )
        if job.search.budget_met is False:
            console.print("budget: MISSED: no finalist met the latency budget when measured (see finalists.json)")
            return EXIT_BUDGET_MISSED
        return 0
    _print_run_summary(job.report, run.path)
    if not job.report["budget_met"]:
        print(
            f"automl-prune: the pruned model misses the budget by the measured figures (see {run.path / 'report.md'})",
            file=sys.stderr,
        )
        return EXIT_BUDGET_MISSED
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Measure a finished run again and rewrite its report."""
    from automl_prune.config import from_dict
    from automl_prune.pipeline import load_data, set_threads
    from automl_prune.run_report import write_run_report
    from automl_prune.runs import RunDirectory

    run = RunDirectory(args.run, resume=True)
    config = from_dict(run.config, f"'{run.path / 'config.yaml'}'")
    set_threads(config)
    report = write_run_report(run.path, config, load_data(config))
    _print_run_summary(report, run.path)
    return 0 if report["budget_met"] else EXIT_BUDGET_MISSED


def cmd_compare(args: argparse.Namespace) -> int:
    """Run several strategies with the same seeds and evaluation budget (a Tune experiment); write the comparison."""
    from automl_prune.pipeline import run_compare

    opened = _open_run(args, "comparison")
    if opened is None:
        return 0
    run, config = opened
    try:
        rows = run_compare(config, run.path)
    except KeyboardInterrupt as exc:
        print(
            f"automl-prune: {'terminated' if isinstance(exc, Terminated) else 'interrupted'}; finished trials are "
            f"kept in {run.path / 'trials'}. Resume with: automl-prune compare --resume {run.path}",
            file=sys.stderr,
        )
        return _interrupted_status(exc)
    _table(
        f"comparison -> {run.path / 'comparison.md'}",
        ["strategy", "seeds", "best acc (mean)", "std", "FLOPs ratio", "evals to 99%", "wall s"],
        [[r.strategy, r.seeds, r.best_mean, r.best_std, r.best_flops_ratio, r.evals_to_99, r.wall_time] for r in rows],
    )
    return 0


def cmd_skipnet(args: argparse.Namespace) -> int:
    """Train dynamic SkipNet gates to the FLOPs budget and compare them with a static plan."""
    from automl_prune.pipeline import run_skipnet

    config = _resolve(args)
    if _printed(args, config):
        return 0
    console = _console()
    done = run_skipnet(config, args.out, stage=lambda text: console.print(text, highlight=False))
    r = done.report
    ort = r["latency"]["runtimes"]["onnxruntime"]
    _table(
        f"dynamic SkipNet -> {done.out / 'report.md'}",
        ["model", "test acc", "FLOPs (mean)", "ORT batch-1 mean ms", "vs dense"],
        [
            [
                name,
                row["test_accuracy"],
                share,
                ort[label]["mean_ms"] if label in ort else "-",
                f"x{ort[label]['speedup']:.2f}" if label in ort else "-",
            ]
            for name, label, row, share in (
                ("dense", "dense", r["dense"], 1.0),
                ("static plan", "static plan", r["static"], r["static"]["flops_share"]),
                ("gated", "gated", r["gated"], r["gated"]["mean_flops_share"]),
            )
        ],
    )
    return 0


# --------------------------------------------------------------------------- parser
_RUN_SECTIONS = ("model", "data", "train", "budget", "search", "prune", "finetune", "parallel", "report")
_TOP = ("seed", "threads", "device", "amp", "cache_dir")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``automl-prune`` command."""
    parser = _Parser(
        prog="automl-prune",
        description="Search how to prune a neural network under a budget.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, allow_abbrev=False)

    p = command("search", "the main job: search under a budget, prune, fine-tune, export, report")
    _add_config_flags(p, _RUN_SECTIONS, _TOP)
    p.add_argument("--out", default="runs/search", help="run directory [runs/search]")
    p.add_argument("--resume", default=None, metavar="DIR", help="continue the interrupted run in DIR")
    p.add_argument("--overwrite", action="store_true", help="replace a different run already in --out")
    p.set_defaults(func=cmd_search)

    p = command("compare", "compare strategies on equal evaluation budgets and seeds")
    _add_config_flags(
        p,
        ("model", "data", "train", "budget", "search", "prune", "parallel", "compare"),
        _TOP,
        # compare.strategies names them; there is no final model, so nothing to measure as a finalist
        exclude=("search.strategy", "search.only", "search.finalists"),
    )
    p.add_argument("--out", default="runs/compare", help="output directory [runs/compare]")
    p.add_argument(
        "--resume",
        default=None,
        metavar="DIR",
        help="continue the interrupted comparison in DIR (finished trials kept)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a different comparison already in --out")
    p.set_defaults(func=cmd_compare)

    p = command(
        "skipnet",
        "dynamic SkipNet: per-input skip gates trained to mean FLOPs <= --budget.flops, against a static plan",
    )
    _add_config_flags(
        p,
        ("model", "data", "train", "budget", "gates", "prune", "finetune", "report"),
        _TOP,
        exclude=tuple(f"budget.{k}" for k in ("params", "latency_ms", "speedup", "runtime", "device", "batch_size"))
        + (
            "finetune.epochs",
            "finetune.batch_size",
            "finetune.weight_decay",
            "finetune.distill_weight",
            "finetune.distill_temperature",
            "report.latency_batch_sizes",
        ),
    )
    p.add_argument("--out", default="runs/skipnet", help="output directory [runs/skipnet]")
    p.set_defaults(func=cmd_skipnet)

    p = command("train", "train a baseline (cached by everything that determines it)")
    _add_config_flags(p, ("model", "data", "train"), _TOP, exclude=("model.checkpoint", "model.weights"))
    p.add_argument("--out", default="runs/baseline", help="output directory [runs/baseline]")
    p.set_defaults(func=cmd_train)

    p = command(
        "prune",
        "prune a dense checkpoint with a plan file (or a point of a Pareto front), or uniformly to --budget.flops",
    )
    p.add_argument("--checkpoint", required=True, help="the dense checkpoint")
    p.add_argument(
        "--plan",
        default=None,
        help="plan JSON ({'keep_ratios': {group: keep}}): a run's plan.json, or its pareto.json with --point",
    )
    p.add_argument(
        "--point", type=int_at_least(0), default=None, help="the point of a pareto.json to prune (0 = cheapest)"
    )
    _add_config_flags(
        p,
        ("data", "budget", "prune"),
        ("seed",),
        exclude=tuple(f"budget.{k}" for k in ("params", "latency_ms", "speedup", "batch_size", "threads")),
    )
    p.add_argument("--out", default="runs/pruned", help="output directory [runs/pruned]")
    p.set_defaults(func=cmd_prune)

    p = command("finetune", "fine-tune a checkpoint (cosine LR, best epoch on search-val kept)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--teacher", default=None, help="dense checkpoint to distil from (with --finetune.distill_weight)")
    _add_config_flags(p, ("data", "finetune"), ("seed", "threads"))
    p.add_argument("--out", default="runs/finetuned", help="output directory [runs/finetuned]")
    p.set_defaults(func=cmd_finetune)

    p = command("export", "export a checkpoint to .pt, TorchScript and ONNX")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", default="runs/export", help="output directory [runs/export]")
    p.set_defaults(func=cmd_export)

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--checkpoint", default=None, help="a checkpoint file (dense or pruned)")
        p.add_argument("--model", default=None, help="a model name instead of a checkpoint")
        p.add_argument("--in-channels", type=_positive_int, default=1)
        p.add_argument("--num-classes", type=_positive_int, default=10)
        p.add_argument("--input-size", type=_positive_int, default=28, help="square input size")

    p = command("latency", "measure a model on a deployment runtime, and its latency-model prediction")
    model_args(p)
    p.add_argument("--artifact", default=None, help="an exported model file (.onnx, .ts) measured as is")
    p.add_argument("--runtime", default=None, help="onnxruntime (default), torchscript or torch")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--batch-size", type=_positive_int, default=1)
    p.add_argument("--threads", type=_positive_int, default=None, help="intra-op threads [torch's]")
    p.add_argument("--rounds", type=int_at_least(2), default=5, help="interleaved measurement rounds [5]")
    p.add_argument(
        "--rebuild",
        action="store_true",
        help="measure the architecture's latency table again (e.g. after noisy measurements) and refit",
    )
    p.add_argument("--plans", type=int_at_least(3), default=24, help="plans measured by --rebuild [24]")
    p.set_defaults(func=cmd_latency)

    p = command("report", "measure a finished run again and rewrite report.md / report.json")
    p.add_argument("--run", required=True, metavar="DIR", help="a run directory written by `automl-prune search`")
    p.set_defaults(func=cmd_report)

    p = command("graph", "show a model's prunable groups, FLOPs and params")
    model_args(p)
    p.set_defaults(func=cmd_graph)

    p = command("list", "list models, datasets, criteria, strategies, envs, rewards or packaged configs")
    p.add_argument("kind", choices=["models", "datasets", "criteria", "strategies", "envs", "rewards", "configs"])
    p.add_argument(
        "-v", "--verbose", action="store_true", help="strategies: also list each one's options and their defaults"
    )
    p.set_defaults(func=cmd_list)
    parser.commands = sub.choices  # type: ignore[attr-defined]
    return parser


def _configure_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("torch_pruning", "onnxscript", "torch.onnx", "torch.export"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    # progress lines (written when stderr is not a terminal) show at every verbosity, timestamped
    progress = logging.getLogger("automl_prune.progress")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    progress.handlers[:] = [handler]
    progress.setLevel(logging.INFO)
    progress.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # reported by the sub-command's parser, which knows its own flags
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    _configure_logging(args.verbose)
    func: Callable[[argparse.Namespace], int] = args.func
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        # Ctrl-C and SIGTERM stop a run with its work kept and a resume suggested: a launcher that left
        # them blocked in the signal mask (inherited across exec) would make the run ignore both; one
        # already pending is delivered here, inside the handling below
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
        return func(args)
    except AutomlPruneError as exc:
        print(f"automl-prune: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as exc:
        print(f"automl-prune: {'terminated' if isinstance(exc, Terminated) else 'interrupted'}", file=sys.stderr)
        return _interrupted_status(exc)
    finally:
        signal.signal(signal.SIGTERM, previous)


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C (the work so far is kept and a resume is suggested)."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


def _interrupted_status(exc: BaseException) -> int:
    """128 + the signal number: 143 for SIGTERM, 130 for Ctrl-C."""
    return 143 if isinstance(exc, Terminated) else 130


if __name__ == "__main__":
    sys.exit(main())

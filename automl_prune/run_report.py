"""The report of one main-job run: baseline vs pruned model, measured from the run's files.

:func:`write_run_report` reads ``baseline.pt``, ``model.pt``, ``result.json`` and
``export.json`` from a run directory, measures both models again (test accuracy, exact
FLOPs and parameters of the built models, end-to-end latency at each configured batch size
on the budget's device) and writes:

- ``report.json``: every figure, the budget with whether each term is met by the measured
  value, the per-group channels, the config;
- ``report.md``: the same for people;
- ``keep_ratios.png``: original vs kept channels per group;
- ``search_curve.png``: every evaluation's search-val accuracy and the best so far.

Because it only needs the run directory, ``automl-prune report --run DIR`` re-measures a
finished run (e.g. on the deployment machine).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import platform
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import torch

from automl_prune.checkpoint import load_checkpoint
from automl_prune.config import Config
from automl_prune.data import DataSplits
from automl_prune.errors import InvalidValueError
from automl_prune.graph import LayerGraph, count_cost
from automl_prune.io import atomic_path, write_json, write_text
from automl_prune.measure.accuracy import evaluate_accuracy
from automl_prune.measure.latency import cpu_model_name, measure_latency
from automl_prune.report import best_so_far
from automl_prune.types import Budget, Evaluation

logger = logging.getLogger(__name__)

REQUIRED = ("baseline.pt", "model.pt", "result.json")
ROUNDS = 3
DRIFT = 0.15
"""Relative change of the baseline's latency between search and report worth a note."""
"""Latency measurement rounds per model and batch size (see :func:`_interleaved_latency`)."""


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InvalidValueError(f"'{path}' is damaged (not valid JSON); rerun the search into a new --out") from None


def _latency_sizes(config: Config) -> list[int]:
    sizes = list(dict.fromkeys(config.report.latency_batch_sizes))
    if config.budget.latency_ms is not None and config.budget.batch_size not in sizes:
        sizes.append(config.budget.batch_size)
    return sizes


def _device_name(device: str) -> str:
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return cpu_model_name()


def _budget_terms(
    config: Config,
    base: dict[str, Any],
    pruned: dict[str, Any],
    predicted: float | None,
    baseline_at_search: float | None = None,
) -> list[dict]:
    """One entry per budget term: limit, measured value, met, and by how much.

    For a latency term it also records the baseline's latency measured now and when the
    search calibrated its lookup table, so that a machine whose speed changed in between is
    visible in the report.
    """
    b = config.budget
    terms = []
    for name, limit in (("flops", b.flops), ("params", b.params)):
        if limit is None:
            continue
        absolute = Budget.absolute(limit, base[name])
        value = pruned[name]
        terms.append(
            {
                "term": name,
                "limit": absolute,
                "limit_given": limit,
                "measured": value,
                "met": value <= absolute,
                "margin": value / absolute - 1.0,
            }
        )
    if b.latency_ms is not None:
        measured = pruned["latency_ms"][str(b.batch_size)]
        terms.append(
            {
                "term": "latency_ms",
                "limit": b.latency_ms,
                "limit_given": b.latency_ms,
                "measured": measured,
                "predicted": predicted,
                "prediction_error": (predicted - measured) / measured if predicted is not None else None,
                "met": measured <= b.latency_ms,
                "margin": measured / b.latency_ms - 1.0,
                "device": b.device,
                "batch_size": b.batch_size,
                "baseline_measured": base["latency_ms"][str(b.batch_size)],
                "baseline_at_search": baseline_at_search,
            }
        )
    return terms


def _interleaved_latency(
    models: dict[str, torch.nn.Module], shape: tuple[int, ...], sizes: list[int], config: Config, threads: int
) -> dict[str, dict[int, list[float]]]:
    """Median latency of each model per batch size in ``ROUNDS`` rounds, the models taking turns.

    Taking turns spreads a transient slowdown of a shared machine over both models instead of
    charging it to whichever was being timed; the report gives the median of the rounds.
    """
    out: dict[str, dict[int, list[float]]] = {label: {s: [] for s in sizes} for label in models}
    for size in sizes:
        for _ in range(ROUNDS):
            for label, model in models.items():
                stats = measure_latency(
                    model, (size, *shape), device=config.budget.device, threads=threads, runs=config.report.latency_runs
                )
                out[label][size].append(stats.median_ms)
    return out


def measure_run(run_dir: str | Path, config: Config, data: DataSplits) -> dict[str, Any]:
    """Every figure of the report, measured from the files in ``run_dir``.

    Raises:
        InvalidValueError: ``run_dir`` lacks a file the report needs.
    """
    run = Path(run_dir)
    missing = [name for name in REQUIRED if not (run / name).is_file()]
    if missing and config.search.only:
        raise InvalidValueError(
            f"'{run}' is a search-only run (search.only): it has a plan but no pruned model to report on; "
            f"prune its plan with `automl-prune prune --plan {run / 'plan.json'}`, or run the search without search.only"
        )
    if missing:
        raise InvalidValueError(
            f"'{run}' lacks {', '.join(missing)}: the report needs a finished run (run `automl-prune search` "
            "without search.only, or resume it with --resume)"
        )
    baseline, base_info = load_checkpoint(run / "baseline.pt")
    pruned, info = load_checkpoint(run / "model.pt")
    result = _read_json(run / "result.json")
    export = _read_json(run / "export.json")
    x = base_info.example_inputs()
    threads = config.budget.threads or torch.get_num_threads()
    sizes = _latency_sizes(config)
    pair = {"baseline": baseline, "pruned": pruned}
    latency = _interleaved_latency(pair, tuple(x.shape[1:]), sizes, config, threads)
    models: dict[str, dict[str, Any]] = {}
    for label, model in pair.items():
        cost = count_cost(model, x)
        models[label] = {
            "test_accuracy": evaluate_accuracy(model, data.test, limit=config.report.test_size),
            "flops": cost.flops,
            "params": cost.params,
            "latency_ms": {str(size): statistics.median(latency[label][size]) for size in sizes},
            "latency_rounds_ms": {str(size): latency[label][size] for size in sizes},
        }
    graph = LayerGraph(baseline, x)
    plan = info.plan
    assert plan is not None  # model.pt is written by prune_and_finetune, always with its plan
    kept = graph.kept_channels(plan, info.round_to)
    layers = [
        {
            "group": g.name,
            "type": g.root.kind,
            "channels": g.channels,
            "kept": kept[g.name],
            "keep_ratio": kept[g.name] / g.channels,
        }
        for g in graph.groups
    ]
    best = result.get("best", {})
    predicted = best.get("latency_ms")  # None unless the budget has a latency term
    base, new = models["baseline"], models["pruned"]
    terms = _budget_terms(config, base, new, predicted, result.get("dense", {}).get("latency_ms"))
    return {
        "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "model": base_info.spec.name,
        "dataset": data.name,
        "seed": config.seed,
        "strategy": result.get("strategy", config.search.strategy),
        "criterion": info.meta.get("criterion", config.prune.criterion),
        "machine": {
            "device": config.budget.device,
            "device_name": _device_name(config.budget.device),
            "threads": threads,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "budget": {"description": Budget(**result["budget"]).describe() if "budget" in result else "", "terms": terms},
        "budget_met": all(t["met"] for t in terms),
        "baseline": base,
        "pruned": new,
        "pruned_before_finetune_test_accuracy": info.meta.get("test_accuracy_before_finetune"),
        "finetune": info.meta.get("finetune"),
        "speedup": {s: base["latency_ms"][s] / new["latency_ms"][s] for s in base["latency_ms"]},
        "skipped_blocks": graph.skipped_blocks(plan),
        "layers": layers,
        "search": {
            "evaluations": result.get("evaluations"),
            "wall_time_s": result.get("wall_time"),
            "best_search_val_accuracy": best.get("accuracy"),
            "dense_search_val_accuracy": result.get("dense", {}).get("accuracy"),
            "best_flops_ratio": best.get("flops_ratio"),
        },
        "onnx_max_abs_diff": export.get("onnx_max_abs_diff"),
        "files": {
            name: name
            for name in ("model.pt", "model.ts", "model.onnx", "baseline.pt", "plan.json", "result.json", "config.yaml")
            if (run / name).is_file()
        },
        "config": config.to_dict(),
    }


def _pct(x: float) -> str:
    return f"{x:+.1%}"


def _budget_lines(report: dict[str, Any]) -> list[str]:
    lines = []
    for t in report["budget"]["terms"]:
        verdict = "**met**" if t["met"] else f"**missed by {t['margin']:.1%}**"
        if t["term"] == "latency_ms":
            pred = (
                f"; predicted {t['predicted']:.3f} ms by the lookup table (error {_pct(t['prediction_error'])})"
                if t.get("predicted") is not None
                else ""
            )
            lines.append(
                f"- latency <= {t['limit']:g} ms ({t['device']}, batch {t['batch_size']}): {verdict}: "
                f"measured {t['measured']:.3f} ms end to end{pred}"
            )
            then, now = t.get("baseline_at_search"), t.get("baseline_measured")
            if then and now and abs(now / then - 1) > DRIFT:
                lines.append(
                    f"- note: the baseline measures {now:.3f} ms now against {then:.3f} ms when the search calibrated "
                    f"its latency table ({now / then - 1:+.0%}): the machine's speed changed in between, which moves "
                    "the measured figures by as much; `automl-prune report --run DIR` measures again"
                )
        else:
            given = f"{t['limit_given']:.0%} of the baseline = " if t["limit_given"] <= 1 else ""
            lines.append(
                f"- {t['term']} <= {given}{t['limit']:,.0f}: {verdict}: the pruned model has {t['measured']:,} "
                f"({t['measured'] / report['baseline'][t['term']]:.1%} of the baseline)"
            )
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    """``report.md`` from :func:`measure_run`'s dict."""
    import yaml

    base, new = report["baseline"], report["pruned"]
    m = report["machine"]
    verdict = "met" if report["budget_met"] else "NOT met"
    rows = [
        (
            "test accuracy",
            f"{base['test_accuracy']:.4f}",
            f"{new['test_accuracy']:.4f}",
            f"{(new['test_accuracy'] - base['test_accuracy']) * 100:+.2f} pp",
        ),
        ("parameters", f"{base['params']:,}", f"{new['params']:,}", f"x{base['params'] / new['params']:.2f} smaller"),
        ("FLOPs (MACs)", f"{base['flops']:,}", f"{new['flops']:,}", f"x{base['flops'] / new['flops']:.2f} smaller"),
    ]
    for size, ms in base["latency_ms"].items():
        rows.append(
            (
                f"latency, batch {size} (ms)",
                f"{ms:.3f}",
                f"{new['latency_ms'][size]:.3f}",
                f"speed-up x{report['speedup'][size]:.2f}",
            )
        )
    lines = [
        f"# automl-prune report: {report['model']} on {report['dataset']}",
        "",
        f"Budget {report['budget']['description']}: **{verdict}** by the measured figures.",
        "",
        *_budget_lines(report),
        "",
        f"Strategy `{report['strategy']}` ({report['search']['evaluations']} evaluations, "
        f"{report['search']['wall_time_s'] or 0:.0f} s), criterion `{report['criterion']}`, seed {report['seed']}. "
        f"Measured on {m['device']} ({m['device_name']}), {m['threads']} thread(s), torch {m['torch']}, {report['created']}.",
        "",
        "| | baseline | pruned | change |",
        "|---|---:|---:|---:|",
        *[f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows],
        "",
    ]
    before = report.get("pruned_before_finetune_test_accuracy")
    if before is not None:
        ft = report.get("finetune")
        tail = f"after fine-tuning {ft['epochs']:g} epochs at lr {ft['lr']:g}" if ft else "(no fine-tune)"
        lines += [f"Test accuracy right after pruning: {before:.4f}; {new['test_accuracy']:.4f} {tail}.", ""]
    s = report["search"]
    if s.get("best_search_val_accuracy") is not None:
        lines += [
            f"Best plan's search-val accuracy during the search (no fine-tune): {s['best_search_val_accuracy']:.4f} "
            f"(dense: {s['dense_search_val_accuracy']:.4f}).",
            "",
        ]
    lines += [
        "## Channels kept per group",
        "",
        "| group | type | channels | kept | keep ratio |",
        "|---|---|---:|---:|---:|",
        *[
            f"| {r['group']} | {r['type']} | {r['channels']} | {r['kept']} | {r['keep_ratio']:.2f} |"
            for r in report["layers"]
        ],
        "",
    ]
    if report["skipped_blocks"]:
        lines += [f"Residual blocks removed: {', '.join(report['skipped_blocks'])}.", ""]
    lines += [
        "![kept channels per group](keep_ratios.png)",
        "",
        "## Search",
        "",
        "![search curve](search_curve.png)",
        "",
    ]
    lines += ["## Files", ""]
    lines += [f"- `{name}`" for name in report["files"]]
    if report.get("onnx_max_abs_diff") is not None:
        lines += [
            "",
            f"The ONNX export matches torch to {report['onnx_max_abs_diff']:.1e} (max abs difference, onnxruntime).",
        ]
    lines += ["", "## Config", "", "```yaml", yaml.safe_dump(report["config"], sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def _plot_keep(report: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = report["layers"]
    idx = np.arange(len(layers))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(layers) + 2), 4.5), dpi=120)
    ax.bar(idx, [r["channels"] for r in layers], color="#c8d6e5", label="original")
    ax.bar(idx, [r["kept"] for r in layers], color="#2e86de", label="kept")
    for i, r in enumerate(layers):
        ax.text(i, r["kept"], f"{r['keep_ratio']:.0%}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(idx, [r["group"] for r in layers], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("channels")
    ax.set_title(f"{report['model']}: channels kept per group ({report['strategy']})")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic_path(out / "keep_ratios.png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _plot_search(history: list[dict[str, Any]], dense_acc: float | None, strategy: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evaluations = [Evaluation(**h["evaluation"]) for h in history]
    steps = np.arange(1, len(evaluations) + 1)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    feasible = [(i, e.accuracy) for i, e in zip(steps, evaluations) if e.feasible and math.isfinite(e.accuracy)]
    infeasible = [(i, e.accuracy) for i, e in zip(steps, evaluations) if not e.feasible and math.isfinite(e.accuracy)]
    if feasible:
        ax.scatter(*zip(*feasible), s=12, alpha=0.6, label="evaluation (feasible)")
    if infeasible:
        ax.scatter(*zip(*infeasible), s=12, alpha=0.6, marker="x", color="grey", label="evaluation (over budget)")
    curve = best_so_far([(None, e) for e in evaluations])
    ax.step(steps, curve, where="post", color="black", lw=1.4, label="best so far")
    if dense_acc is not None:
        ax.axhline(dense_acc, ls="--", lw=1, color="green", label="dense model")
    ax.set_xlabel("evaluation")
    ax.set_ylabel("search-val accuracy (no fine-tune)")
    ax.set_title(f"Search: {strategy}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(out / "search_curve.png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def write_run_report(run_dir: str | Path, config: Config, data: DataSplits) -> dict[str, Any]:
    """Measure the run and write ``report.json``, ``report.md``, ``keep_ratios.png`` and ``search_curve.png``."""
    out = Path(run_dir)
    report = measure_run(out, config, data)
    result = _read_json(out / "result.json")
    _plot_keep(report, out)
    _plot_search(result.get("history", []), report["search"]["dense_search_val_accuracy"], report["strategy"], out)
    write_json(out / "report.json", report)
    write_text(out / "report.md", render_markdown(report))
    return report

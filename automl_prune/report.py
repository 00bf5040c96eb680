"""Comparison tables and plots of search results.

:func:`summarise` turns the results of several strategies (over seeds) into one row per
strategy; :func:`write_comparison` writes ``comparison.md``, ``comparison.csv`` and PNG
plots: best-so-far search-val accuracy against evaluations (mean over seeds), and accuracy
against FLOPs (and, for latency budgets, against predicted latency) of every feasible
evaluation with the Pareto front.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from automl_prune.io import atomic_path, write_text
from automl_prune.pareto import pareto_indices
from automl_prune.types import Evaluation, SearchResult


@dataclass(frozen=True)
class StrategySummary:
    """One strategy's results over seeds."""

    strategy: str
    seeds: int
    best_mean: float
    best_std: float
    best_flops_ratio: float
    evaluations: int
    evals_to_99: float
    wall_time: float


def best_so_far(history: Sequence[tuple[object, Evaluation]]) -> np.ndarray:
    """Best feasible search-val accuracy after each evaluation (NaN before the first feasible one)."""
    best, curve = -math.inf, []
    for _, evaluation in history:
        if evaluation.feasible and math.isfinite(evaluation.accuracy):
            best = max(best, evaluation.accuracy)
        curve.append(best if best > -math.inf else math.nan)
    return np.array(curve)


def summarise(results: dict[str, list[SearchResult]]) -> list[StrategySummary]:
    """One row per strategy: best accuracy mean +- std over seeds, evaluations to 99% of its best, time."""
    rows = []
    for strategy, runs in results.items():
        bests = np.array([r.best_evaluation.accuracy for r in runs])
        to_99 = []
        for r in runs:
            curve = best_so_far(r.history)
            target = 0.99 * r.best_evaluation.accuracy
            hits = np.nonzero(np.nan_to_num(curve, nan=-1.0) >= target)[0]
            to_99.append(int(hits[0]) + 1 if len(hits) else len(curve))
        rows.append(
            StrategySummary(
                strategy=strategy,
                seeds=len(runs),
                best_mean=float(bests.mean()),
                best_std=float(bests.std()),
                best_flops_ratio=float(np.mean([r.best_evaluation.flops_ratio for r in runs])),
                evaluations=int(np.mean([r.evaluations for r in runs])),
                evals_to_99=float(np.mean(to_99)),
                wall_time=float(np.mean([r.wall_time for r in runs])),
            )
        )
    return sorted(rows, key=lambda r: -r.best_mean)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Non-dominated (cost, accuracy) points: lower cost and higher accuracy are better; sorted by cost."""
    return [points[i] for i in pareto_indices(points)]


def _markdown(rows: list[StrategySummary], title: str) -> str:
    lines = [
        f"# {title}",
        "",
        "| strategy | seeds | best search-val acc (mean +- std) | FLOPs ratio of best | evaluations | evaluations to 99% of best | wall time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.strategy} | {r.seeds} | {r.best_mean:.4f} +- {r.best_std:.4f} | {r.best_flops_ratio:.3f} | "
            f"{r.evaluations} | {r.evals_to_99:.1f} | {r.wall_time:.1f} |"
        )
    lines += ["", "![best so far](best_so_far.png)", "", "![accuracy vs FLOPs](accuracy_vs_flops.png)", ""]
    return "\n".join(lines)


def _csv(rows: list[StrategySummary]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(
        ["strategy", "seeds", "best_mean", "best_std", "best_flops_ratio", "evaluations", "evals_to_99", "wall_time"]
    )
    for r in rows:
        writer.writerow(
            [
                r.strategy,
                r.seeds,
                f"{r.best_mean:.6f}",
                f"{r.best_std:.6f}",
                f"{r.best_flops_ratio:.6f}",
                r.evaluations,
                f"{r.evals_to_99:.2f}",
                f"{r.wall_time:.3f}",
            ]
        )
    return out.getvalue()


def _plots(results: dict[str, list[SearchResult]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    longest = max(len(r.history) for runs in results.values() for r in runs)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for number, (strategy, runs) in enumerate(results.items()):
        color = colors[number % len(colors)]
        curves = [best_so_far(r.history) for r in runs]
        length = max(len(c) for c in curves)
        padded = np.array([np.pad(c, (0, length - len(c)), mode="edge") for c in curves])
        mean = np.nanmean(padded, axis=0)
        if length == 1:  # one-shot baselines (uniform, global): a reference line across the plot
            ax.axhline(mean[0], ls="--", lw=1.2, label=f"{strategy} (1 evaluation)", color=color)
        else:
            ax.step(np.arange(1, length + 1), mean, where="post", label=strategy, color=color)
    ax.set_xlim(0.5, longest + 0.5)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("evaluations")
    ax.set_ylabel("best search-val accuracy so far")
    ax.set_title("Best so far (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(out / "best_so_far.png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)

    _scatter(plt, results, out, "flops_ratio", "FLOPs (fraction of the dense model)", "accuracy_vs_flops.png")
    if any(e.latency_ms is not None for runs in results.values() for r in runs for _, e in r.history):
        _scatter(plt, results, out, "latency_ms", "predicted latency (ms)", "accuracy_vs_latency.png")


def _scatter(plt: Any, results: dict[str, list[SearchResult]], out: Path, field: str, label: str, name: str) -> None:
    """Accuracy of every feasible evaluation against one cost, with the Pareto front."""
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    points = []
    for strategy, runs in results.items():
        pairs = [(getattr(e, field), e.accuracy) for r in runs for _, e in r.history if e.feasible]
        pairs = [(x, y) for x, y in pairs if x is not None]
        points += pairs
        ax.scatter([x for x, _ in pairs], [y for _, y in pairs], s=14, alpha=0.6, label=strategy)
    front = pareto_front(points)
    if front:
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="black", lw=1.2)
        ax.scatter(
            [p[0] for p in front],
            [p[1] for p in front],
            s=60,
            facecolors="none",
            edgecolors="black",
            label="Pareto front",
        )
    ax.set_xlabel(label)
    ax.set_ylabel("search-val accuracy")
    ax.set_title("Every feasible evaluation")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(out / name) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def write_comparison(
    results: dict[str, list[SearchResult]], out: str | Path, title: str = "Strategy comparison"
) -> list[StrategySummary]:
    """Write comparison.md, comparison.csv, best_so_far.png and accuracy_vs_flops.png into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = summarise(results)
    write_text(out / "comparison.md", _markdown(rows, title))
    write_text(out / "comparison.csv", _csv(rows))
    _plots(results, out)
    return rows

"""The accuracy-vs-cost front of a search, saved for deployment (``pareto.json``, ``pareto.png``).

Every search keeps the non-dominated plans it evaluated: the most accurate plan at each
cost. The cost is the measured latency where a plan was measured on the budget's runtime
(a latency search's finalists), else its predicted latency (latency budgets), else its
FLOPs. Another point than the one shipped can be pruned later without searching again:
``automl-prune prune --plan RUN/pareto.json --point N``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from automl_prune.errors import InvalidValueError
from automl_prune.io import atomic_path, write_json
from automl_prune.types import Evaluation, Plan

__all__ = ["FRONT_FILE", "front", "pareto_indices", "pareto_pairs", "plan_from_front", "read_plan_file", "write_front"]

FRONT_FILE = "pareto.json"
_FORMAT = "automl-prune-pareto"


def pareto_indices(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated (cost, accuracy) points, sorted by cost.

    Lower cost and higher accuracy are better; of equal points the first is kept.
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1], i))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def pareto_pairs(pairs: Sequence[tuple[Plan, Evaluation]], cost: str = "flops") -> list[tuple[Plan, Evaluation]]:
    """The feasible (plan, evaluation) pairs no other feasible pair dominates, by increasing cost.

    Args:
        pairs: Evaluated (plan, evaluation) pairs; infeasible or failed ones are left out.
        cost: ``"flops"`` or ``"latency_ms"``: the cost minimised (accuracy is maximised).

    Returns:
        One pair per non-dominated (cost, accuracy) point (the first evaluated), cheapest first.
    """
    kept = [
        (plan, e)
        for plan, e in pairs
        if e.feasible and math.isfinite(e.accuracy) and (cost != "latency_ms" or e.latency_ms is not None)
    ]
    points = [(float(e.latency_ms if cost == "latency_ms" else e.flops), e.accuracy) for _, e in kept]
    return [kept[i] for i in pareto_indices(points)]


def front(
    history: Sequence[tuple[Plan, Evaluation]],
    measured_ms: Mapping[int, float] | None = None,
    key: Any = None,
) -> dict[str, Any]:
    """The non-dominated plans of ``history`` as a JSON-ready dict.

    Args:
        history: The search's (plan, evaluation) pairs.
        measured_ms: Index in ``history`` -> measured latency, for the plans that were measured.
        key: Optional ``plan -> hashable`` structure key; plans with equal keys count once.

    Returns:
        ``{"format", "cost", "cost_label", "points": [...], "evaluated", "all"}``; each point
        has the plan, accuracy, FLOPs, params, predicted and measured latency and the cost it
        was ranked by, cheapest first; ``all`` is (cost, accuracy) of every plan considered.
    """
    measured_ms = dict(measured_ms or {})
    latency = any(e.latency_ms is not None for _, e in history)
    cost_name = "latency_ms" if latency else "flops"
    rows, seen = [], set()
    for i, (plan, e) in enumerate(history):
        if e.failed:
            continue
        k = key(plan) if key is not None else None
        if k is not None and k in seen and i not in measured_ms:
            continue
        seen.add(k)
        cost = measured_ms.get(i, e.latency_ms) if latency else e.flops
        if cost is None:
            continue
        rows.append(
            {
                "plan": plan.to_dict(),
                "accuracy": e.accuracy,
                "flops": e.flops,
                "params": e.params,
                "flops_ratio": e.flops_ratio,
                "predicted_ms": e.latency_ms,
                "measured_ms": measured_ms.get(i),
                "feasible": e.feasible,
                "cost": float(cost),
            }
        )
    chosen = [rows[i] for i in pareto_indices([(r["cost"], r["accuracy"]) for r in rows])]
    for number, row in enumerate(chosen):
        row["point"] = number
    label = "latency (ms; measured where measured, else predicted)" if latency else "FLOPs (MACs)"
    return {
        "format": _FORMAT,
        "cost": cost_name,
        "cost_label": label,
        "points": chosen,
        "evaluated": len(rows),
        "all": [[r["cost"], r["accuracy"]] for r in rows],
    }


def write_front(out: str | Path, data: Mapping[str, Any], title: str = "") -> None:
    """Write ``pareto.json`` and ``pareto.png`` (the front over every evaluated plan) into ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    write_json(out / FRONT_FILE, dict(data))
    points = data["points"]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    others = data.get("all") or []
    if others:
        ax.scatter([c for c, _ in others], [a for _, a in others], s=10, color="#bbbbbb", label="every plan evaluated")
    if points:
        xs = [p["cost"] for p in points]
        ys = [p["accuracy"] for p in points]
        ax.step(xs, ys, where="post", color="black", lw=1.2)
        measured = [p for p in points if p.get("measured_ms") is not None]
        ax.scatter(xs, ys, s=40, color="#2e86de", label="Pareto front", zorder=3)
        if measured:
            ax.scatter(
                [p["cost"] for p in measured],
                [p["accuracy"] for p in measured],
                s=80,
                facecolors="none",
                edgecolors="#e67e22",
                lw=1.5,
                label="measured on the runtime",
                zorder=4,
            )
        for p in points:
            ax.annotate(
                str(p["point"]), (p["cost"], p["accuracy"]), fontsize=7, xytext=(3, -9), textcoords="offset points"
            )
    ax.set_xlabel(data.get("cost_label", data.get("cost", "cost")))
    ax.set_ylabel("search-val accuracy (no fine-tune)")
    ax.set_title(title or f"Accuracy vs cost: {len(points)} points on the front of {data.get('evaluated', 0)} plans")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(out / "pareto.png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def plan_from_front(data: Any, point: int | None, source: str) -> Plan:
    """The plan of one point of a front read from ``source`` (a ``pareto.json``).

    Raises:
        InvalidValueError: No point given, or a point the front does not have.
    """
    points = data.get("points") if isinstance(data, Mapping) else None
    if not isinstance(points, list):
        raise InvalidValueError(f"'{source}' is not a Pareto front (no 'points' list)")
    if point is None:
        raise InvalidValueError(
            f"'{source}' is a Pareto front of {len(points)} points; choose one with --point N (0 = cheapest)"
        )
    if not 0 <= point < len(points):
        raise InvalidValueError(
            f"--point {point} is not on the front in '{source}'; it has points 0..{len(points) - 1}"
        )
    return Plan.from_dict(points[point]["plan"])


def read_plan_file(path: str | Path, point: int | None = None) -> tuple[Plan, int | None]:
    """A plan file: a run's ``plan.json`` (or any ``{"keep_ratios": ...}``), or one point of a ``pareto.json``.

    Returns:
        The plan, and the channel multiple (``round_to``) its run searched and scored it at, where the
        file or its run says: ``pareto.json`` holds it, and a ``plan.json`` is read with the
        ``result.json`` (a search) or ``export.json`` (the Python API) beside it. None otherwise.

    Raises:
        InvalidValueError: A missing or malformed file, or ``point`` given for a single plan.
    """
    import json

    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InvalidValueError(f"plan file '{path}' does not exist") from None
    except json.JSONDecodeError as exc:
        raise InvalidValueError(f"plan file '{path}' is not valid JSON: {exc}") from None
    if isinstance(data, dict) and "points" in data:
        return plan_from_front(data, point, str(path)), _round_to(data.get("round_to"))
    if point is not None:
        raise InvalidValueError(f"--point chooses a point of a Pareto front (pareto.json); '{path}' is a single plan")
    plan = Plan.from_dict(data)
    for beside in (path.with_name("result.json"), path.with_name("export.json")):
        try:
            run = json.loads(beside.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        round_to = _round_to(run.get("round_to")) if isinstance(run, dict) else None
        if round_to is not None:
            return plan, round_to
    return plan, None


def _round_to(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else None

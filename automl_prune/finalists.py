"""Measured finalists: the plan that ships is the best one whose *measured* latency meets the budget.

During a latency-budget search every plan's latency is a prediction (scored against a limit
tightened by the evaluator's ``latency_margin``). Before a plan ships,
:func:`choose_finalist` takes the best distinct plans the search found (by the search's own
objective, the reward without the budget penalty), including plans predicted slightly over
the limit, measures each end to end on the budget's runtime interleaved with the dense
model, logs every prediction error, and returns the best plan whose measurement meets every
latency term: ``latency_ms`` against the measured milliseconds, ``speedup`` against the
measured speed-up over the dense model (a ratio, which the machine's drift cancels out of).
Each measurement shares its rounds out among fresh sessions (a session keeps its speed for its
whole life); a plan whose margin lies inside the measurement noise is measured again with
:data:`REMEASURE_FACTOR` times the rounds and sessions.
Finalists that meet the budget with a margin of at least :data:`NOISE_BAND` are preferred
(a later measurement, the report's, then still meets it despite the noise); when none does,
the best that meets it at all ships, with a warning. When no finalist meets the budget, the
fastest one is returned and the result says so.

:func:`match_measured_latency` places a one-parameter family of plans (uniform keep ratio,
global pruning threshold) at a *measured* latency by bisection on measurements, for fair
comparisons at a latency budget.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from automl_prune.evaluator import Evaluator
from automl_prune.measure.latency import SESSIONS, LatencyStats, round_ratio
from automl_prune.measure.latency_model import Measured
from automl_prune.types import Evaluation, Plan

logger = logging.getLogger(__name__)

__all__ = [
    "Finalist",
    "FinalistChoice",
    "choose_finalist",
    "latency_margin",
    "match_measured_latency",
    "NOISE_BAND",
    "REMEASURE_FACTOR",
]

NOISE_BAND = 0.05
"""A measured margin to a latency limit smaller than this (relative) is measured again."""
MEASURE_ROUNDS = 5
"""Interleaved rounds of a finalist's measurement (shared out among fresh sessions)."""
REMEASURE_FACTOR = 3
"""A measurement inside the noise band is taken again with this many times the rounds and sessions."""
SLACK = 0.10
"""Plans predicted up to this much over the latency limit may still become finalists."""


@dataclass
class Finalist:
    """One finalist: the search's evaluation and the end-to-end measurement.

    Attributes:
        plan: The plan.
        evaluation: Its evaluation in the search (predicted latency).
        measured: The measurement on the runtime.
        objective: The search's objective (reward without the budget penalty).
        margin: Smallest relative headroom to the latency terms (negative: over budget).
        meets: True when every latency term is met by the measurement.
        remeasured: True when it was measured again because the margin was inside the noise.
        dense_at_fit: The dense model's latency when the latency model was fitted (the
            prediction's scale).
    """

    plan: Plan
    evaluation: Evaluation
    measured: Measured
    objective: float
    margin: float
    meets: bool
    remeasured: bool = False
    dense_at_fit: float | None = None

    @property
    def predicted_ms(self) -> float | None:
        """The latency model's prediction."""
        return self.evaluation.latency_ms

    @property
    def measured_ms(self) -> float:
        """The measured latency (median of the interleaved rounds)."""
        return self.measured.stats.median_ms

    @property
    def error(self) -> float | None:
        """(predicted - measured) / measured, of the latency relative to the dense model.

        Both sides are ratios to the dense model (predicted: the latency model's; measured:
        the interleaved rounds'), so a machine that sped up or slowed down since the latency
        model was fitted does not count as prediction error.
        """
        if self.predicted_ms is None or self.dense_at_fit is None:
            return None
        return (self.predicted_ms / self.dense_at_fit) / self.measured.ratio - 1.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "plan": self.plan.to_dict(),
            "accuracy": self.evaluation.accuracy,
            "objective": self.objective,
            "flops": self.evaluation.flops,
            "params": self.evaluation.params,
            "predicted_ms": self.predicted_ms,
            "measured_ms": self.measured_ms,
            "measured_speedup": 1.0 / self.measured.ratio,
            "prediction_error": self.error,
            "margin": self.margin,
            "meets": self.meets,
            "remeasured": self.remeasured,
            "noisy": self.measured.noisy,
            "latency": self.measured.stats.to_dict(),
            "dense_latency": self.measured.dense.to_dict(),
        }


@dataclass
class FinalistChoice:
    """The outcome of :func:`choose_finalist`.

    Attributes:
        finalists: Every finalist, in the search's order of preference.
        chosen: Index of the one that ships.
        met: True when the chosen plan's measurement meets the latency budget.
    """

    finalists: list[Finalist] = field(default_factory=list)
    chosen: int = 0
    met: bool = False

    @property
    def plan(self) -> Plan:
        """The plan that ships."""
        return self.finalists[self.chosen].plan

    def shippable(self) -> list[int]:
        """Finalists that may ship, best first: those meeting the budget outside the noise band, else all that meet it."""
        safe = [i for i, f in enumerate(self.finalists) if f.meets and f.margin >= NOISE_BAND]
        return safe or [i for i, f in enumerate(self.finalists) if f.meets]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {"chosen": self.chosen, "met": self.met, "finalists": [f.to_dict() for f in self.finalists]}


def _objective(evaluator: Evaluator, e: Evaluation) -> float:
    return evaluator.reward_fn(e.accuracy, e.flops, e.params, e.latency_ms, evaluator.context)


def candidates(
    evaluator: Evaluator, history: Sequence[tuple[Plan, Evaluation]], k: int
) -> list[tuple[Plan, Evaluation]]:
    """The ``k`` best distinct plans of a search that could meet the budget.

    Plans must have scored cleanly and meet the FLOPs and parameter terms (exact); their
    predicted latency may exceed the limit by up to :data:`SLACK` (the prediction can be
    pessimistic). Ordered by the search's objective.
    """
    limit = evaluator.limits["latency_ms"]
    seen: set[tuple] = set()
    pool = []
    for plan, e in history:
        if e.failed:
            continue
        if evaluator.excess(e.flops, e.params, None) > 1e-9:
            continue
        if limit is not None and e.latency_ms is not None and e.latency_ms > limit * (1.0 + SLACK):
            continue
        key = evaluator.structure_key(plan)
        if key in seen:
            continue
        seen.add(key)
        pool.append((plan, e))
    pool.sort(key=lambda pe: -_objective(evaluator, pe[1]))
    return pool[:k]


def latency_margin(latency_ms: float | None, speedup: float | None, measured_ms: float, ratio: float) -> float:
    """Smallest relative headroom of a measurement to the latency terms of a budget (inf without one).

    Args:
        latency_ms: The budget's latency limit in ms (None: no such term).
        speedup: The budget's least speed-up over the dense model (None: no such term).
        measured_ms: The measured latency in ms.
        ratio: The measured latency over the dense model's (from the same interleaved rounds).
    """
    margins = []
    if latency_ms is not None:
        margins.append(latency_ms / measured_ms - 1.0)
    if speedup is not None:
        margins.append(1.0 / (ratio * speedup) - 1.0)
    return min(margins, default=math.inf)


def _margin(evaluator: Evaluator, m: Measured) -> float:
    """Headroom of a finalist's measurement to the budget's latency terms (the budget's, not the tightened)."""
    b = evaluator.budget
    return latency_margin(b.latency_ms, b.speedup, m.stats.median_ms, m.ratio)


def choose_finalist(
    evaluator: Evaluator,
    history: Sequence[tuple[Plan, Evaluation]],
    k: int = 8,
    progress: bool = True,
    stored: dict[str, Any] | None = None,
) -> FinalistChoice | None:
    """Measure the ``k`` best distinct plans and pick the best whose measurement meets the budget.

    Args:
        evaluator: The search's evaluator (its budget must have a latency term).
        history: The search's (plan, evaluation) pairs.
        k: Finalists to measure (>= 1).
        progress: Show a progress bar.
        stored: A choice :meth:`FinalistChoice.to_dict` wrote earlier in this run (``finalists.json``):
            when it holds exactly these finalists, their measurements are taken from it rather than
            measured again, so a resumed run ships from the measurements it refined (a second
            measurement could move a plan across the noise band and change what is refined).

    Returns:
        The choice, or None when no plan of the history can be a finalist.
    """
    pool = candidates(evaluator, history, k)
    if not pool:
        return None
    if stored is not None:
        saved = stored.get("finalists", [])
        if [f.get("plan") for f in saved] == [plan.to_dict() for plan, _ in pool]:
            logger.info("the %d finalists were measured earlier in this run: using those measurements", len(pool))
            return _choice([_restored(evaluator, d, plan, e) for d, (plan, e) in zip(saved, pool)])
        logger.warning("the stored finalists are not this search's: measuring them again")
    measured = evaluator.measure(
        [p for p, _ in pool], progress="finalists" if progress else None, rounds=MEASURE_ROUNDS
    )
    finalists = []
    for (plan, e), m in zip(pool, measured):
        margin = _margin(evaluator, m)
        remeasured = False
        if abs(margin) < NOISE_BAND:
            (m,) = evaluator.measure(
                [plan], rounds=REMEASURE_FACTOR * MEASURE_ROUNDS, sessions=REMEASURE_FACTOR * SESSIONS
            )
            margin, remeasured = _margin(evaluator, m), True
        finalist = _finalist(evaluator, plan, e, m, remeasured)
        error = f"{finalist.error:+.1%}" if finalist.error is not None else "n/a"
        logger.info(
            "finalist %d: accuracy %.4f, predicted %s ms, measured %s, prediction error %s, %s",
            len(finalists) + 1,
            e.accuracy,
            f"{finalist.predicted_ms:.4g}" if finalist.predicted_ms is not None else "n/a",
            m.stats.describe(),
            error,
            "meets the budget" if finalist.meets else f"over the budget by {-margin:.1%}",
        )
        finalists.append(finalist)
    return _choice(finalists)


def _finalist(evaluator: Evaluator, plan: Plan, e: Evaluation, m: Measured, remeasured: bool) -> Finalist:
    """The finalist of ``plan`` measured as ``m``: objective, margin and verdict follow from the evaluator."""
    margin = _margin(evaluator, m)
    dense_at_fit = evaluator.latency_model.dense_ms if evaluator.latency_model is not None else None
    return Finalist(plan, e, m, _objective(evaluator, e), margin, margin >= 0.0, remeasured, dense_at_fit)


def _restored(evaluator: Evaluator, data: dict[str, Any], plan: Plan, e: Evaluation) -> Finalist:
    """The finalist :meth:`Finalist.to_dict` wrote, rebuilt from its measurement (the rest follows from it)."""
    latency, dense = LatencyStats.from_dict(data["latency"]), LatencyStats.from_dict(data["dense_latency"])
    measured = Measured(plan, round_ratio(latency, dense), latency, dense)
    return _finalist(evaluator, plan, e, measured, bool(data.get("remeasured", False)))


def _choice(finalists: list[Finalist]) -> FinalistChoice:
    """The finalist that ships: the first that meets the budget outside the noise band, else the fastest."""
    choice = FinalistChoice(finalists, 0, False)
    shippable = choice.shippable()
    if shippable:
        if finalists[shippable[0]].margin < NOISE_BAND:
            logger.warning(
                "the finalists meet the latency budget only within the measurement noise (best margin %.1f%%); "
                "a later measurement may miss it",
                100 * finalists[shippable[0]].margin,
            )
        return FinalistChoice(finalists, shippable[0], True)
    fastest = min(range(len(finalists)), key=lambda i: finalists[i].measured_ms)
    logger.warning(
        "no finalist meets the latency budget when measured; shipping the fastest (%s)",
        finalists[fastest].measured.stats.describe(),
    )
    return FinalistChoice(finalists, fastest, False)


def match_measured_latency(
    evaluator: Evaluator,
    make_plan: Callable[[float], Plan],
    target_ratio: float,
    steps: int = 8,
    low: float = 0.0,
    high: float = 1.0,
) -> tuple[Plan, Measured]:
    """The plan of a one-parameter family whose *measured* latency is closest to a target.

    ``make_plan(x)`` must give plans whose latency grows with ``x`` (a uniform keep ratio, a
    share of channels kept by global pruning). The target is a latency relative to the dense
    model (e.g. a searched plan's measured ratio), so the machine's drift between the
    measurements does not move it. Bisection on measurements (each interleaved with the dense
    model, on the evaluator's runtime) for ``steps`` steps; the measured plan closest to the
    target is returned with its measurement.
    """
    best: tuple[Plan, Measured] | None = None
    for _ in range(steps):
        mid = (low + high) / 2.0
        plan = make_plan(mid)
        (m,) = evaluator.measure([plan])
        if best is None or abs(m.ratio - target_ratio) < abs(best[1].ratio - target_ratio):
            best = (plan, m)
        if m.ratio > target_ratio:
            high = mid
        else:
            low = mid
    assert best is not None
    return best

"""Search spaces: what a strategy may choose, and how to stay inside the budget.

A :class:`SearchSpace` holds, for every prunable group, a keep-ratio interval
``[min_keep, 1]`` (``min_keep`` configurable per layer type), optionally discrete levels
``k / levels`` (as ABCPruner), and optionally a skip gate per removable block (residual
blocks whose shortcut is the identity, shape-preserving layers of plain networks). Keep ratios step in the evaluator's channel multiple (``round_to``, by
default what the deployment runtime is fast at): every keep ratio the space produces is
exactly ``kept / channels`` of a width the pruned model will have (with discrete levels, a
level whose width the evaluator derives the same way for scoring and for the final model),
so no strategy scores a width that is rounded later. It converts between plans, flat vectors and the symmetric ``[-1, 1]``
actions of the Gymnasium envs (:meth:`SearchSpace.action_to_keep` is the only place actions
are rescaled), and provides AMC's budget-feasible action bounds:
:meth:`SearchSpace.feasible_interval` gives, for the next group, the largest keep ratio
that still lets the budget be met if every later group went to ``min_keep``, and the
smallest keep ratio that does not over-prune needlessly (below it the budget would be
undershot even if every later group were kept whole). That lower bound is the project's, not
AMC's (AMC bounds only from above), and holds only under rewards that value accuracy alone
(``acc``, ``acc_latency``): under a reward that values compression for its own sake
(:data:`~automl_prune.reward.COMPRESSION_REWARDS`: AMC's ``acc_log_flops`` and ``acc_log_params``,
N2N's ``n2n``) a plan may go below the budget, as the reward asks, and the lower bound is
``min_keep``. The bounds assume cost grows with every keep ratio, which holds exactly for FLOPs
and parameters; measured latencies can break it by noise, so finished plans pass through
:meth:`SearchSpace.repair` (a no-op for a feasible plan).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import numpy as np

from automl_prune.errors import InvalidValueError
from automl_prune.evaluator import Evaluator
from automl_prune.pruning import channel_multiple, channels_to_keep
from automl_prune.reward import COMPRESSION_REWARDS
from automl_prune.types import Plan

logger = logging.getLogger(__name__)

DEFAULT_MIN_KEEP = {"conv": 0.2, "dwconv": 0.2, "linear": 0.2}
_BISECTION_STEPS = 14


class SearchSpace:
    """Per-group keep ratios (and skip gates) under an evaluator's budget.

    Args:
        evaluator: Supplies the graph, the exact cost model and the budget limits.
        min_keep: Smallest keep ratio, one value or per layer type (``conv``, ``dwconv``, ``linear``).
        levels: If set, keep ratios are restricted to ``k / levels`` (ABCPruner's discrete space).
        skip_gates: Include a skip gate for each removable block (:attr:`LayerGraph.blocks`: residual
            blocks with an identity shortcut, shape-preserving layers of plain networks).

    Attributes:
        fill_budget: Whether plans are kept from undershooting the budget (the lower bound of
            :meth:`feasible_interval`): True unless the evaluator's reward values compression.

    Raises:
        InvalidValueError: Bad ``min_keep``/``levels``, or a budget that cannot be met even at
            ``min_keep`` everywhere (the message names the smallest reachable cost).
    """

    def __init__(
        self,
        evaluator: Evaluator,
        min_keep: float | Mapping[str, float] = 0.2,
        levels: int | None = None,
        skip_gates: bool = False,
    ):
        self.evaluator = evaluator
        self.graph = evaluator.graph
        per_type = dict(DEFAULT_MIN_KEEP)
        if isinstance(min_keep, Mapping):
            unknown = set(min_keep) - set(per_type)
            if unknown:
                raise InvalidValueError(f"min_keep has unknown layer types {sorted(unknown)}; use {sorted(per_type)}")
            per_type.update(min_keep)
        else:
            per_type = dict.fromkeys(per_type, float(min_keep))
        for kind, value in per_type.items():
            if not 0.0 < value <= 1.0:
                raise InvalidValueError(f"min_keep for {kind} must be in (0, 1], got {value}")
        if levels is not None and levels < 2:
            raise InvalidValueError(f"levels must be >= 2, got {levels}")
        self.levels = levels
        self.round_to = evaluator.config.round_to
        self.groups = self.graph.group_names()
        self._channels = np.array([g.channels for g in self.graph.groups])
        self._divisors = [g.divisor for g in self.graph.groups]
        min_keep_per_group = np.array([per_type[g.root.kind] for g in self.graph.groups])
        if levels is not None:  # ABCPruner's grid of levels (the evaluator derives the widths from them)
            self.min_keep = np.ceil(min_keep_per_group * levels - 1e-9) / levels
        else:
            widths = [
                self._smallest_width(int(c), float(k), d)
                for c, k, d in zip(self._channels, min_keep_per_group, self._divisors, strict=True)
            ]
            self.min_keep = np.array(widths) / self._channels
        self.blocks = list(self.graph.blocks) if skip_gates else []
        self.fill_budget = evaluator.config.reward not in COMPRESSION_REWARDS
        smallest = self.plan_from_keeps(self.min_keep)
        if self._excess(smallest) > 1e-9:
            cost = evaluator.cost(smallest)
            lat = evaluator.predict_latency(smallest)
            dense = evaluator.latency_model.dense_ms if evaluator.latency_model is not None else None
            raise InvalidValueError(
                f"the budget ({evaluator.budget.describe()}) cannot be met: with every group at min_keep the model "
                f"still has {cost.flops:,} FLOPs ({cost.flops / self.graph.flops:.1%}), {cost.params:,} params"
                + (f", {lat:.4g} ms predicted (the dense model measures {dense:.4g} ms)" if lat and dense else "")
                + "; lower min_keep or relax the budget"
            )

    def __deepcopy__(self, memo: dict) -> SearchSpace:
        """Shared, not copied: envs and wrappers that deep-copy their kwargs keep using this instance."""
        return self

    # ------------------------------------------------------------------ conversions
    @property
    def dim(self) -> int:
        """Number of keep-ratio dimensions (one per group)."""
        return len(self.groups)

    def _smallest_width(self, channels: int, min_keep: float, divisor: int) -> int:
        """Smallest width of a group that ``round_to`` and its divisor allow and that keeps at least ``min_keep``."""
        r = channel_multiple(channels, self.round_to, divisor)
        return min(channels, max(r, math.ceil(min_keep * channels / r - 1e-9) * r))

    def snap(self, keep: float, index: int) -> float:
        """``keep`` clipped into the group's range, as the exact ``kept / channels`` of the width it
        builds (a multiple of ``round_to``, or the whole group); in a discrete space, down to a level."""
        keep = float(min(1.0, max(self.min_keep[index], keep)))
        if self.levels is not None:
            return max(self.min_keep[index], math.floor(keep * self.levels + 1e-9) / self.levels)
        channels = int(self._channels[index])
        return channels_to_keep(channels, keep, self.round_to, self._divisors[index]) / channels

    def action_to_keep(self, action: float, index: int) -> float:
        """Map an action in [-1, 1] to a keep ratio in ``[min_keep, 1]`` of group ``index``."""
        a = float(np.clip(action, -1.0, 1.0))
        return self.snap(self.min_keep[index] + (a + 1.0) / 2.0 * (1.0 - self.min_keep[index]), index)

    def keep_to_action(self, keep: float, index: int) -> float:
        """Inverse of :meth:`action_to_keep`."""
        low = self.min_keep[index]
        return 0.0 if low >= 1.0 else float(np.clip(2.0 * (keep - low) / (1.0 - low) - 1.0, -1.0, 1.0))

    def plan_from_keeps(self, keeps: np.ndarray | list[float], skip: Mapping[str, bool] | None = None) -> Plan:
        """A plan from one keep ratio per group (in group order)."""
        return Plan({g: float(k) for g, k in zip(self.groups, keeps)}, dict(skip or {}))

    def keeps(self, plan: Plan) -> np.ndarray:
        """The plan's keep ratios as a vector in group order."""
        return np.array([plan.keep_ratio(g) for g in self.groups])

    def encode(self, plan: Plan) -> np.ndarray:
        """Plan -> vector in [-1, 1] (keep ratios, then one entry per skip gate: 1 = skip)."""
        keeps = [self.keep_to_action(plan.keep_ratio(g), i) for i, g in enumerate(self.groups)]
        gates = [1.0 if plan.skip.get(b, False) else -1.0 for b in self.blocks]
        return np.array(keeps + gates, dtype=np.float64)

    def decode(self, vector: np.ndarray) -> Plan:
        """Vector in [-1, 1] -> plan (inverse of :meth:`encode`)."""
        vector = np.asarray(vector, dtype=np.float64)
        if vector.shape != (self.dim + len(self.blocks),):
            raise InvalidValueError(
                f"expected a vector of {self.dim + len(self.blocks)} entries, got shape {vector.shape}"
            )
        keeps = [self.action_to_keep(a, i) for i, a in enumerate(vector[: self.dim])]
        skip = {b: bool(v > 0) for b, v in zip(self.blocks, vector[self.dim :])}
        return self.plan_from_keeps(keeps, skip)

    # ------------------------------------------------------------------ budget
    def _excess(self, plan: Plan) -> float:
        cost = self.evaluator.cost(plan)
        return self.evaluator.excess(cost.flops, cost.params, self.evaluator.predict_latency(plan))

    def is_feasible(self, plan: Plan) -> bool:
        """True when the plan's predicted cost is within every budget term."""
        return self._excess(plan) <= 1e-9

    def _bisect(self, make_plan, low: float, high: float, want_feasible_at_high: bool) -> float:
        """Largest x in [low, high] with ``excess(make_plan(x)) <= 0`` (monotone: cost grows with x)."""
        for _ in range(_BISECTION_STEPS):
            mid = (low + high) / 2.0
            if (self._excess(make_plan(mid)) <= 1e-9) == want_feasible_at_high:
                low = mid
            else:
                high = mid
        return low

    def feasible_interval(self, decided: list[float], skip: Mapping[str, bool] | None = None) -> tuple[float, float]:
        """AMC's action bounds for group ``len(decided)`` given the keep ratios decided before it.

        Returns:
            ``(low, high)``: ``high`` is the largest keep ratio such that the budget is still
            met if every later group goes to ``min_keep``; ``low`` is the smallest keep ratio
            that is not needlessly small (below it, keeping every later group whole would
            still leave budget unused), or ``min_keep`` when the evaluator's reward values
            compression (:attr:`fill_budget` False). Both respect ``min_keep`` and the levels.
        """
        index = len(decided)
        if index >= self.dim:
            raise InvalidValueError("all groups are already decided")
        rest_min = list(self.min_keep[index + 1 :])
        rest_full = [1.0] * (self.dim - index - 1)

        def with_rest(rest: list[float]):
            return lambda keep: self.plan_from_keeps([*decided, keep, *rest], skip)

        low_bound = float(self.min_keep[index])
        upper = with_rest(rest_min)
        if self._excess(upper(1.0)) <= 1e-9:
            high = 1.0
        elif self._excess(upper(low_bound)) > 1e-9:
            high = low_bound  # earlier choices already used the budget up: prune as far as allowed
        else:
            high = self._bisect(upper, low_bound, 1.0, want_feasible_at_high=True)
        lower = with_rest(rest_full)
        if not self.fill_budget or self._excess(lower(low_bound)) > 1e-9:
            # the reward itself trades compression against accuracy, or even the smallest keep
            # overshoots with later groups whole: any keep is needed
            low = low_bound
        elif self._excess(lower(1.0)) <= 1e-9:
            low = 1.0  # budget is loose: keeping this group whole is free
        else:
            low = self._bisect(lower, low_bound, 1.0, want_feasible_at_high=True)
        high = self.snap(high, index)
        low = min(self.snap(low, index), high)
        return low, high

    def clip(self, index: int, keep: float, decided: list[float], skip: Mapping[str, bool] | None = None) -> float:
        """``keep`` clipped into :meth:`feasible_interval` for group ``index``."""
        if index != len(decided):
            raise InvalidValueError("clip() must be called for the next undecided group")
        low, high = self.feasible_interval(decided, skip)
        return float(min(high, max(low, self.snap(keep, index))))

    def repair(self, plan: Plan, levels: int | None = None) -> Plan:
        """Scale a plan's keep ratios down (uniformly, respecting ``min_keep``) until it fits the budget.

        The one budget repair: strategies whose plans live on a grid of their own (the bee
        colony's ``k / levels`` keep ratios in a continuous space) pass ``levels``, and the
        repaired plan stays on that grid (each keep floored to it, never below the group's
        lowest level ``ceil(min_keep * levels)``).
        """
        if self.is_feasible(plan):
            return plan
        keeps = self.keeps(plan)
        if levels is None:
            snap = self.snap
        else:
            lowest = np.clip(np.ceil(self.min_keep * levels - 1e-9), 1, levels) / levels

            def snap(keep: float, index: int) -> float:
                return float(max(lowest[index], math.floor(keep * levels + 1e-9) / levels))

        def scaled(factor: float) -> Plan:
            return self.plan_from_keeps([snap(k * factor, i) for i, k in enumerate(keeps)], plan.skip)

        factor = self._bisect(scaled, 0.0, 1.0, want_feasible_at_high=True)
        repaired = scaled(factor)
        if not self.is_feasible(repaired):  # skip gates alone can exceed; the smallest plan always fits
            repaired = scaled(0.0)
            if not self.is_feasible(repaired):
                repaired = self.plan_from_keeps([snap(0.0, i) for i in range(self.dim)])
        return repaired

    def sample(self, rng: np.random.Generator) -> Plan:
        """A random feasible plan: groups drawn in order, each uniform in its feasible interval."""
        skip = {b: bool(rng.random() < 0.5) for b in self.blocks}
        if self.blocks and not self.is_feasible(self.plan_from_keeps(self.min_keep, skip)):
            skip = {}
        decided: list[float] = []
        for _ in range(self.dim):
            low, high = self.feasible_interval(decided, skip)
            decided.append(self.snap(rng.uniform(low, high), len(decided)) if high > low else high)
            decided[-1] = min(max(decided[-1], low), high)
        return self.repair(self.plan_from_keeps(decided, skip))

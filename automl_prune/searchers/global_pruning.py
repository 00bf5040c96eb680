"""Global pruning: one importance threshold across all groups, solved for the budget (one plan).

Global pruning (Torch-Pruning's ``global_pruning=True``; the global threshold on BatchNorm
scales of network slimming) ranks the channels of *all* groups together by a normalised
importance and removes the lowest-ranked ones everywhere, so each layer loses as many channels
as fall below one global threshold. This strategy produces that per-group allocation as a
:class:`~automl_prune.types.Plan` at exactly the evaluator's budget (the budget the
``uniform`` baseline meets), and spends one evaluation on it.

The exact procedure:

1. **Scores.** Every channel of every prunable group of the evaluator's
   :class:`~automl_prune.graph.LayerGraph` is scored on the dense model (``evaluator.model``,
   only read) by one of the project's data-free criteria (:mod:`automl_prune.criteria`:
   ``l1`` by default, ``l2``, ``fpgm`` or ``slimming``), the same ranking that decides
   *which* channels a plan removes; then normalised within the group (``normalizer``:
   ``"mean"`` divides by the group's mean score, which is what makes groups of different
   weight scale comparable; ``sum``, ``max`` and ``l2`` likewise).
2. **Ranking.** All channels of all groups are sorted by score (ascending; ties broken by
   group order, then channel index). Removing the ``r`` lowest channels means the global
   threshold sits at the ``r``-th score.
3. **Plan for a given r.** Group ``g`` keeps ``C_g - (its channels among the r lowest)``
   channels, as the keep ratio ``kept / C_g`` passed through
   :meth:`~automl_prune.search_spaces.SearchSpace.snap`, which clips it to the group's
   ``min_keep`` (channels below the threshold in a group already at ``min_keep`` stay:
   this is Torch-Pruning's per-layer maximum pruning ratio), rounds it to the widths the
   group allows and, on a discrete space, floors it to a level.
4. **Budget.** The cost of the plan (exact FLOPs/params from the cost model, predicted
   latency for latency budgets) never grows with ``r``, so the smallest ``r`` whose plan
   meets every budget term is found by bisection over the integers ``0..total`` (about
   ``log2(total)`` cost evaluations). That plan is the largest global-threshold plan
   within the budget, short of it by at most one channel's cost, which for a group coupled
   through a whole residual stage can be a few percent of the FLOPs.
5. **Filling the budget.** The removed channels are then revisited from the one nearest
   the threshold downwards (at most ``fill_attempts`` that change the plan), and each is
   put back if the plan still meets the budget. This turns "short by one coupled channel"
   into "short by less than the cheapest channel near the threshold", at the price of a
   threshold that is exact except at its edge; ``fill_attempts=0`` gives the pure
   threshold plan.
6. **Result.** That single plan is asked for once (if numerical noise in a latency
   prediction leaves it infeasible, it goes through
   :meth:`~automl_prune.search_spaces.SearchSpace.repair`).

Only the *number* of channels per group comes from the global ranking; *which* channels go
is decided by the evaluator's criterion, as for every other strategy (with the default
``l1`` for both, the two rankings are the same). Skip gates are not used.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from automl_prune.criteria import CRITERIA, get_criterion
from automl_prune.criteria.base import normalise
from automl_prune.errors import InvalidValueError
from automl_prune.evaluator import Evaluator
from automl_prune.graph import LayerGraph
from automl_prune.search_spaces import SearchSpace
from automl_prune.strategy import AskTellStrategy, SearchSession
from automl_prune.strategy_options import GLOBAL_NORMALIZERS
from automl_prune.types import Plan

logger = logging.getLogger(__name__)

__all__ = ["NORMALIZERS", "GlobalRanking", "GlobalStrategy", "group_scores"]

NORMALIZERS = GLOBAL_NORMALIZERS
"""Within-group normalisations (see :func:`automl_prune.criteria.base.normalise`)."""


def _data_free() -> list[str]:
    return [name for name in CRITERIA.names() if not get_criterion(name).needs_data]


def group_scores(
    model: torch.nn.Module, graph: LayerGraph, criterion: str = "l1", normalizer: str = "mean"
) -> list[np.ndarray]:
    """Normalised scores of every channel of every group, in group order, by a data-free criterion.

    Args:
        model: The dense model the graph was built on (only read).
        graph: Its :class:`~automl_prune.graph.LayerGraph`.
        criterion: A data-free criterion name (``l1``, ``l2``, ``fpgm``, ``slimming``, ``random``).
        normalizer: Within-group normalisation (one of :data:`NORMALIZERS`).

    Returns:
        One float64 array of ``channels`` scores per group.
    """
    crit = get_criterion(criterion)
    crit.prepare(model, graph, None)
    dg = graph.dependency_graph
    scores = []
    try:
        with torch.no_grad():
            for group in graph.groups:
                root = model.get_submodule(group.name)
                prune_fn = dg.get_pruner_of_module(root).prune_out_channels
                raw = crit(dg.get_pruning_group(root, prune_fn, list(range(group.channels)))).double()
                if raw.numel() != group.channels:
                    raise RuntimeError(
                        f"{criterion} gave {raw.numel()} scores for the {group.channels} channels of {group.name}"
                    )
                scores.append(normalise(raw, normalizer).cpu().numpy())
    finally:
        crit.release()
    return scores


@dataclass
class GlobalRanking:
    """Every channel ranked by normalised group importance, and the plans a global threshold makes.

    Attributes:
        space: The search space plans are snapped into.
        channels: Channels per group, in group order.
        owner: The group of each channel, lowest score first.
        scores: The scores, ascending.
    """

    space: SearchSpace
    channels: np.ndarray
    owner: np.ndarray
    scores: np.ndarray

    @property
    def total(self) -> int:
        """Channels ranked."""
        return int(self.owner.size)

    def lost(self, removed: int) -> np.ndarray:
        """Channels each group loses when the ``removed`` lowest-ranked go."""
        return np.bincount(self.owner[:removed], minlength=len(self.channels))

    def plan(self, lost: np.ndarray) -> Plan:
        """The plan keeping ``channels - lost`` per group (snapped into the space: min_keep, widths, levels)."""
        keeps = [self.space.snap((self.channels[g] - lost[g]) / self.channels[g], g) for g in range(len(self.channels))]
        return self.space.plan_from_keeps(keeps)

    def keeping(self, share: float) -> Plan:
        """The global-threshold plan that keeps ``share`` of all channels (before snapping)."""
        return self.plan(self.lost(round((1.0 - min(max(share, 0.0), 1.0)) * self.total)))


class GlobalStrategy(AskTellStrategy):
    """Torch-Pruning-style global pruning at the budget: one plan, one evaluation (see the module docstring).

    Args:
        criterion: The data-free criterion that ranks the channels (``l1``, ``l2``, ``fpgm``,
            ``slimming``, ``random``).
        normalizer: Within-group normalisation making groups comparable (``mean``, ``sum``,
            ``max``, ``l2``).
        fill_attempts: Most channels tried in the budget-filling pass (step 5; 0 turns it off).
        batch_size: Ignored beyond the base class's check (a single plan is asked).

    Attributes:
        plan: The global-threshold plan (after the search started).

    Raises:
        InvalidValueError: For an unknown or data-driven criterion, or an unknown normaliser.
    """

    def __init__(
        self,
        criterion: str = "l1",
        normalizer: str = "mean",
        fill_attempts: int = 64,
        batch_size: int = 1,
    ):
        super().__init__(batch_size=batch_size)
        if fill_attempts < 0:
            raise InvalidValueError(f"fill_attempts must be >= 0, got {fill_attempts}")
        self.fill_attempts = fill_attempts
        valid = _data_free()
        if criterion not in valid:
            raise InvalidValueError(
                f"global ranks channels with a data-free criterion; '{criterion}' is not one. Valid: {', '.join(valid)}"
            )
        if normalizer not in NORMALIZERS:
            raise InvalidValueError(f"unknown normalizer '{normalizer}'; valid: {', '.join(NORMALIZERS)}")
        self.criterion = criterion
        self.normalizer = normalizer
        self.plan: Plan | None = None

    def setup(self, session: SearchSession) -> None:
        """Score every channel and solve the global threshold for the budget."""
        self.plan = self.solve(session)

    def ranking(self, evaluator: Evaluator, space: SearchSpace) -> GlobalRanking:
        """Every channel of the dense model ranked by its normalised group importance (steps 1-2)."""
        scores = group_scores(evaluator.model, evaluator.graph, self.criterion, self.normalizer)
        owner = np.concatenate([np.full(len(s), g) for g, s in enumerate(scores)])
        flat = np.concatenate(scores)
        order = np.lexsort((np.arange(flat.size), owner, flat))  # by score, then group, then channel
        return GlobalRanking(space, np.array([len(s) for s in scores]), owner[order], flat[order])

    def solve(self, session: SearchSession) -> Plan:
        """The global-threshold plan that just meets the budget (steps 1-5 of the module docstring)."""
        space = session.space
        evaluator = session.evaluator
        ranking = self.ranking(evaluator, space)
        plan_from_lost, lost_for = ranking.plan, ranking.lost
        owner_sorted, sorted_scores = ranking.owner, ranking.scores

        if space.is_feasible(plan_from_lost(lost_for(0))):
            removed = 0
        else:
            low, high = 0, ranking.total  # infeasible at low, feasible (SearchSpace checked min_keep) at high
            while high - low > 1:
                mid = (low + high) // 2
                if space.is_feasible(plan_from_lost(lost_for(mid))):
                    high = mid
                else:
                    low = mid
            removed = high
        lost = lost_for(removed)
        plan = plan_from_lost(lost)
        restored = 0
        attempts = 0
        for position in range(removed - 1, -1, -1):  # put back the removed channels nearest the threshold
            if attempts >= self.fill_attempts:
                break
            g = owner_sorted[position]
            lost[g] -= 1
            candidate = plan_from_lost(lost)
            if candidate == plan:  # the group is held at min_keep (or a level) anyway
                continue
            attempts += 1
            if space.is_feasible(candidate):
                plan, restored = candidate, restored + 1
            else:
                lost[g] += 1
        if removed:
            logger.info(
                "global: threshold %.4g removes %d of %d channels (%d put back to fill the budget)",
                sorted_scores[removed - 1],
                removed - restored,
                ranking.total,
                restored,
            )
        if not space.is_feasible(plan):
            plan = space.repair(plan)
        cost = evaluator.cost(plan)
        logger.info(
            "global plan: %.1f%% FLOPs, keep ratios %s",
            100.0 * cost.flops / evaluator.graph.flops,
            ", ".join(f"{k:.2f}" for k in space.keeps(plan)),
        )
        return plan

    def ask(self, n: int) -> list[Plan]:
        """The global plan, once."""
        if self.session.used or self.plan is None:
            return []
        return [self.plan]

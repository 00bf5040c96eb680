"""Optuna's samplers as a search strategy, through its ask/tell interface.

Every asked plan is one Optuna trial: ``study.ask()``, then one parameter per prunable
group (its keep ratio, ``trial.suggest_float(group, min_keep, 1)``; on a discrete space
``trial.suggest_int(group, lowest_level, levels)`` and keep ``= level / levels``), and one
``suggest_categorical`` per skip gate when the space has gates. The plan is passed through
:meth:`~automl_prune.search_spaces.SearchSpace.repair` before it is evaluated, so every
evaluated plan meets the budget.

**What Optuna is told.** The repaired plan is what is evaluated, and its score is told
for the trial whose parameters are the *suggested* (unrepaired) keep ratios. Repair is a
deterministic map, so Optuna learns the well-defined function "suggested point -> score
of its repair": every suggestion beyond the budget scores like its scaled-down version,
and the sampler learns where the budget bites without ever seeing an infeasible score.
The alternative, rewriting the trial's parameters to the repaired ones, is not possible
in Optuna (a trial's parameters are fixed once suggested). The repaired plan is stored on
the trial as the user attribute ``"plan"``, so a study shared through ``storage`` records
what was actually evaluated.

**Objectives.** ``tpe``, ``cmaes`` and ``random`` maximise the evaluation's ``reward``
(the value the search session picks its best plan by). ``nsga2`` is multi-objective: it
maximises ``accuracy`` and minimises the cost, the predicted latency when the budget has a
latency term, FLOPs otherwise; the non-dominated (plan, evaluation) pairs this strategy
evaluated are kept in :attr:`OptunaStrategy.pareto_front` (maintained for every sampler,
and the main output of ``nsga2``). A failed evaluation (accuracy not a number) is told
as a failed trial.

**Reproducibility.** Samplers are seeded with the session's seed, so the same seed and
the same evaluations give the same plans with the default in-memory storage. A study
shared by several processes (``storage`` plus a common ``study_name``) sees the others'
trials and is not reproducible.

Optuna's own INFO logging is turned down to WARNING when a search starts (a global
setting of the ``optuna`` logger).
"""

from __future__ import annotations

import importlib.util
import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import optuna

from automl_prune.errors import AutomlPruneError, InvalidValueError
from automl_prune.pareto import pareto_pairs
from automl_prune.strategy import AskTellStrategy, SearchSession
from automl_prune.strategy_options import OPTUNA_SAMPLERS
from automl_prune.types import Evaluation, Plan

logger = logging.getLogger(__name__)

__all__ = ["SAMPLERS", "OptunaStrategy"]

SAMPLERS = OPTUNA_SAMPLERS
"""Valid sampler names."""

_SKIP_PREFIX = "skip:"


class OptunaStrategy(AskTellStrategy):
    """Optuna ask/tell search over per-group keep ratios (see the module docstring).

    Args:
        sampler: ``"tpe"`` (default), ``"cmaes"`` (needs the ``cmaes`` package), ``"random"``
            or ``"nsga2"`` (multi-objective: accuracy versus FLOPs or latency).
        storage: Optuna storage URL (e.g. ``"sqlite:///study.db"``) to share a study between
            processes; None keeps the study in memory.
        study_name: Name of the study in ``storage`` (processes sharing it must use the same
            name; an existing study is resumed). None lets Optuna pick a unique name.
        sampler_kwargs: Extra keyword arguments for the Optuna sampler (e.g.
            ``{"n_startup_trials": 20}`` for TPE, ``{"population_size": 20}`` for NSGA-II);
            ``seed`` is always the session's. Defaults are Optuna's (TPE: 10 random startup
            trials, constant liar on; NSGA-II: population 50).
        batch_size: Trials asked for at a time (TPE's constant liar keeps a batch diverse).

    Attributes:
        study: The Optuna study (after the search started).
        pareto_front: Non-dominated (plan, evaluation) pairs of this search, by increasing
            cost (accuracy versus FLOPs, or latency for latency budgets).

    Raises:
        InvalidValueError: For an unknown sampler name (listing the valid ones).
    """

    def __init__(
        self,
        sampler: str = "tpe",
        storage: str | None = None,
        study_name: str | None = None,
        sampler_kwargs: Mapping[str, Any] | None = None,
        batch_size: int = 1,
    ):
        super().__init__(batch_size=batch_size)
        if sampler not in SAMPLERS:
            raise InvalidValueError(f"unknown Optuna sampler '{sampler}'; valid samplers: {', '.join(SAMPLERS)}")
        self.sampler_name = sampler
        self.storage = storage
        self.study_name = study_name
        self.sampler_kwargs = dict(sampler_kwargs or {})
        if "seed" in self.sampler_kwargs:
            raise InvalidValueError("sampler_kwargs must not set 'seed'; the search's seed is used")
        self.multi_objective = sampler == "nsga2"
        self.pareto_front: list[tuple[Plan, Evaluation]] = []
        self.study: optuna.Study | None = None

    def _make_sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        kwargs = dict(self.sampler_kwargs)
        try:
            if self.sampler_name == "tpe":
                return optuna.samplers.TPESampler(seed=seed, **kwargs)
            if self.sampler_name == "random":
                return optuna.samplers.RandomSampler(seed=seed, **kwargs)
            if self.sampler_name == "nsga2":
                return optuna.samplers.NSGAIISampler(seed=seed, **kwargs)
            if importlib.util.find_spec("cmaes") is None:
                raise AutomlPruneError(
                    "Optuna sampler 'cmaes' needs the 'cmaes' package: `pip install cmaes` "
                    "(or use sampler 'tpe', 'random' or 'nsga2')"
                )
            return optuna.samplers.CmaEsSampler(seed=seed, **kwargs)
        except TypeError as exc:
            raise InvalidValueError(f"bad sampler_kwargs for Optuna sampler '{self.sampler_name}': {exc}") from exc

    def setup(self, session: SearchSession) -> None:
        """Create (or load, with ``storage``) the study with a seeded sampler."""
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.space = session.space
        self.evaluator = session.evaluator
        self.cost_name = "latency_ms" if session.evaluator.limits.get("latency_ms") is not None else "flops"
        sampler = self._make_sampler(session.seed)
        directions = ["maximize", "minimize"] if self.multi_objective else ["maximize"]
        self.study = optuna.create_study(
            storage=self.storage,
            study_name=self.study_name,
            sampler=sampler,
            pruner=optuna.pruners.NopPruner(),  # Optuna's trial pruners: not used (no intermediate values)
            directions=directions,
            load_if_exists=self.storage is not None,
        )
        self._pending: list[tuple[optuna.trial.Trial, Plan]] = []
        self.pareto_front = []
        self._told: list[tuple[Plan, Evaluation]] = []
        levels = self.space.levels
        self._low_level = None if levels is None else np.ceil(self.space.min_keep * levels - 1e-9).astype(int)
        logger.info(
            "optuna: sampler %s, %s, study '%s'%s",
            self.sampler_name,
            "maximise accuracy / minimise " + self.cost_name if self.multi_objective else "maximise reward",
            self.study.study_name,
            f" in {self.storage}" if self.storage else "",
        )

    def _suggest(self, trial: optuna.trial.Trial) -> Plan:
        """The plan a trial suggests, before repair."""
        space = self.space
        keeps = []
        for i, group in enumerate(space.groups):
            if space.levels is not None and self._low_level is not None:
                level = trial.suggest_int(group, int(self._low_level[i]), space.levels)
                keeps.append(level / space.levels)
            else:
                keeps.append(trial.suggest_float(group, float(space.min_keep[i]), 1.0))
        skip = {b: bool(trial.suggest_categorical(_SKIP_PREFIX + b, [False, True])) for b in space.blocks}
        return space.plan_from_keeps(keeps, skip)

    def ask(self, n: int) -> list[Plan]:
        """``n`` new trials, each repaired into the budget."""
        assert self.study is not None, "setup() must run first"
        plans = []
        for _ in range(n):
            trial = self.study.ask()
            plan = self.space.repair(self._suggest(trial))
            trial.set_user_attr("plan", plan.to_dict())
            self._pending.append((trial, plan))
            plans.append(plan)
        return plans

    def _values(self, evaluation: Evaluation) -> list[float] | None:
        if not math.isfinite(evaluation.accuracy):
            return None
        if not self.multi_objective:
            return [evaluation.reward]
        cost = evaluation.latency_ms if self.cost_name == "latency_ms" else evaluation.flops
        if cost is None:
            return None
        return [evaluation.accuracy, float(cost)]

    def tell(self, plans: list[Plan], evaluations: list[Evaluation]) -> None:
        """Tell Optuna each repaired plan's score (failed evaluations as failed trials)."""
        assert self.study is not None, "setup() must run first"
        for plan, evaluation in zip(plans, evaluations):
            index = next((k for k, (_, p) in enumerate(self._pending) if p is plan), 0)
            trial, _ = self._pending.pop(index)
            values = self._values(evaluation)
            if values is None:
                self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            else:
                self.study.tell(trial, values if self.multi_objective else values[0])
            self._told.append((plan, evaluation))
        self.pareto_front = pareto_pairs(self._told, self.cost_name)
        for trial, _ in self._pending:  # asked but never evaluated (budget spent)
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
        self._pending = []

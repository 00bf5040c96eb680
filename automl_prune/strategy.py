"""The one strategy interface every search strategy (RL agent or black-box searcher) follows.

``Strategy.search(evaluator, space, max_evaluations, seed, callbacks) -> SearchResult``.
The base class owns the loop bookkeeping (seeding, counting evaluations against the
budget, history, best plan, callbacks, wall time); a subclass overrides one hook:

- :class:`AskTellStrategy` subclasses implement ``ask(n) -> list[Plan]`` and
  ``tell(plans, evaluations)`` (like Optuna's ``Study.ask/tell``), so a whole batch can be
  evaluated at once (in parallel where the session's evaluator allows);
- RL agents implement ``_run(session)`` and drive a Gymnasium env whose episodes call
  :meth:`SearchSession.evaluate`.

Every evaluation counts against ``max_evaluations``; once it is spent,
:meth:`SearchSession.evaluate` raises :class:`EvaluationBudgetExhausted`, which the base
class catches, so no strategy can overspend.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from automl_prune.errors import InvalidValueError
from automl_prune.evaluator import Evaluator
from automl_prune.registry import Registry
from automl_prune.search_spaces import SearchSpace
from automl_prune.seeding import seed_everything
from automl_prune.types import Evaluation, Plan, SearchResult

logger = logging.getLogger(__name__)

Callback = Callable[["SearchSession", Plan, Evaluation], None]
"""Called after every evaluation with (session, plan, evaluation)."""


class EvaluationBudgetExhausted(Exception):
    """Raised by :meth:`SearchSession.evaluate` once ``max_evaluations`` are spent."""


class SearchSession:
    """Bookkeeping of one search: evaluations used, history, best plan, callbacks.

    Args:
        strategy: Name of the strategy running.
        evaluator: Scores plans.
        space: The search space.
        max_evaluations: Evaluation budget.
        seed: The search's seed.
        callbacks: Called after each evaluation.
        evaluate_many: Optional batch evaluator (e.g. Ray workers); defaults to a loop.
    """

    def __init__(
        self,
        strategy: str,
        evaluator: Evaluator,
        space: SearchSpace,
        max_evaluations: int,
        seed: int,
        callbacks: Sequence[Callback] = (),
        evaluate_many: Callable[[list[Plan]], list[Evaluation]] | None = None,
    ):
        if max_evaluations < 1:
            raise InvalidValueError(f"max_evaluations must be >= 1, got {max_evaluations}")
        self.strategy = strategy
        self.evaluator = evaluator
        self.space = space
        self.max_evaluations = max_evaluations
        self.seed = seed
        self.callbacks = list(callbacks)
        self._evaluate_many = evaluate_many
        self.history: list[tuple[Plan, Evaluation]] = []
        self.rng = np.random.default_rng(seed)
        self.start = time.perf_counter()

    @property
    def used(self) -> int:
        """Evaluations spent so far."""
        return len(self.history)

    @property
    def remaining(self) -> int:
        """Evaluations left."""
        return self.max_evaluations - self.used

    @property
    def exhausted(self) -> bool:
        """True once the evaluation budget is spent."""
        return self.remaining <= 0

    def _record(self, plan: Plan, evaluation: Evaluation) -> None:
        self.history.append((plan, evaluation))
        for callback in self.callbacks:
            callback(self, plan, evaluation)

    def evaluate(self, plan: Plan) -> Evaluation:
        """Score one plan, counting it against the budget."""
        if self.exhausted:
            raise EvaluationBudgetExhausted
        evaluation = self.evaluator.evaluate(plan)
        self._record(plan, evaluation)
        return evaluation

    def evaluate_many(self, plans: list[Plan]) -> list[Evaluation]:
        """Score a batch (truncated to what the budget allows), counting each."""
        plans = plans[: self.remaining]
        if not plans:
            raise EvaluationBudgetExhausted
        if self._evaluate_many is None:
            return [self.evaluate(p) for p in plans]
        evaluations = self._evaluate_many(plans)
        for plan, evaluation in zip(plans, evaluations):
            self._record(plan, evaluation)
        return evaluations

    def best(self) -> tuple[Plan, Evaluation] | None:
        """The highest-reward feasible (plan, evaluation) so far."""
        feasible = [(p, e) for p, e in self.history if e.feasible]
        return max(feasible, key=lambda pe: pe[1].reward) if feasible else None

    def result(self) -> SearchResult:
        """The search's result; falls back to the min-keep plan if nothing feasible was found."""
        best = self.best()
        if best is None:
            plan = self.space.plan_from_keeps(self.space.min_keep)
            best = (plan, self.evaluator.evaluate(plan))
            logger.warning("%s found no feasible plan; returning the min-keep plan", self.strategy)
        return SearchResult(
            strategy=self.strategy,
            best_plan=best[0],
            best_evaluation=best[1],
            history=list(self.history),
            wall_time=time.perf_counter() - self.start,
            evaluations=self.used,
            seed=self.seed,
        )


class Strategy:
    """Base class of search strategies.

    Attributes:
        name: Registry name (set by the registry on instantiation through :func:`get_strategy`).
    """

    name: str = ""
    sequential_reason: str = ""
    """Why the strategy scores one plan at a time ("" when it hands batches to ``evaluate_many``)."""
    learns_policy: bool = False
    """Whether the strategy learns a policy (:meth:`policy_state`, :meth:`start_from`)."""
    default_reward: str = "acc"
    """The reward a search with this strategy scores plans with when ``search.reward`` is unset."""
    needs_skip_gates: bool = False
    """Whether the strategy searches which blocks to remove, so its search space always has skip gates."""
    initial_policy: dict[str, Any] | None = None
    """Tensors of a policy learned before, the next search starts from (see :meth:`start_from`)."""

    def policy_state(self) -> dict[str, Any] | None:
        """The policy learned by the last search, as tensors (None: this strategy learns no policy)."""
        return None

    def start_from(self, state: dict[str, Any]) -> None:
        """Start the next search from a policy this strategy learned before (:meth:`policy_state`).

        Raises:
            InvalidValueError: The strategy learns no policy.
        """
        if not self.learns_policy:
            raise InvalidValueError(
                f"{self.name or type(self).__name__} learns no policy to start from; search.init_policy is for "
                "ddpg, ppo, reinforce and static_skip"
            )
        self.initial_policy = state

    def search(
        self,
        evaluator: Evaluator,
        space: SearchSpace,
        max_evaluations: int,
        seed: int = 0,
        callbacks: Sequence[Callback] = (),
        evaluate_many: Callable[[list[Plan]], list[Evaluation]] | None = None,
    ) -> SearchResult:
        """Search for the best plan with at most ``max_evaluations`` evaluations.

        Args:
            evaluator: Scores plans under the budget.
            space: What may be chosen.
            max_evaluations: Evaluation budget (cache hits count too).
            seed: Seed; the same seed gives the same result.
            callbacks: Called after every evaluation.
            evaluate_many: Batch evaluator for parallel evaluation.

        Returns:
            The best feasible plan, the history and the evaluations used.
        """
        seed_everything(seed)
        session = SearchSession(
            self.name or type(self).__name__, evaluator, space, max_evaluations, seed, callbacks, evaluate_many
        )
        try:
            self._run(session)
        except EvaluationBudgetExhausted:
            pass
        return session.result()

    def _run(self, session: SearchSession) -> None:
        """The strategy's loop; spend evaluations through ``session``."""
        raise NotImplementedError(f"{type(self).__name__} must implement _run")


class AskTellStrategy(Strategy):
    """A black-box strategy: ``ask`` plans, have them evaluated, ``tell`` the results.

    Args:
        batch_size: Plans asked for at a time (evaluated together, in parallel if possible).
    """

    def __init__(self, batch_size: int = 1):
        if batch_size < 1:
            raise InvalidValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size

    def setup(self, session: SearchSession) -> None:  # noqa: B027 - optional hook
        """Prepare for a search (called once before the first ``ask``)."""

    def ask(self, n: int) -> list[Plan]:
        """Up to ``n`` plans to evaluate next."""
        raise NotImplementedError(f"{type(self).__name__} must implement ask")

    def tell(self, plans: list[Plan], evaluations: list[Evaluation]) -> None:  # noqa: B027 - optional hook
        """Learn from evaluated plans."""

    def _run(self, session: SearchSession) -> None:
        self.session = session
        self.setup(session)
        while not session.exhausted:
            plans = self.ask(min(self.batch_size, session.remaining))
            if not plans:
                break
            evaluations = session.evaluate_many(plans)
            self.tell(plans[: len(evaluations)], evaluations)


class UniformStrategy(AskTellStrategy):
    """The single uniform plan that meets the budget: the baseline every claim is measured against.

    Solved for the budget by bisection on one shared keep ratio (FLOPs, params and latency
    alike); one evaluation.
    """

    def ask(self, n: int) -> list[Plan]:
        if self.session.used:
            return []
        space = self.session.space
        uniform = space.plan_from_keeps(np.ones(space.dim))
        return [space.repair(uniform)]


class RandomStrategy(AskTellStrategy):
    """Uniformly random feasible plans (each group uniform in its AMC feasible interval): the control."""

    def ask(self, n: int) -> list[Plan]:
        return [self.session.space.sample(self.session.rng) for _ in range(n)]


STRATEGIES: Registry[Any] = Registry("strategy")
STRATEGIES.register("uniform", UniformStrategy, "the uniform plan that meets the budget (baseline)")
STRATEGIES.register("random", RandomStrategy, "uniformly random feasible plans (control)")
STRATEGIES.register(
    "abc", "automl_prune.searchers.abc:ABCStrategy", "ABCPruner: artificial bee colony over discrete keep levels"
)
STRATEGIES.register(
    "optuna",
    "automl_prune.searchers.optuna_search:OptunaStrategy",
    "Optuna ask/tell: search.optuna.sampler tpe (default), cmaes, random or nsga2 (accuracy vs cost)",
)
STRATEGIES.register(
    "global",
    "automl_prune.searchers.global_pruning:GlobalStrategy",
    "global pruning: one threshold over every channel's normalised score (l1 by default), at the budget (baseline)",
)
STRATEGIES.register("ddpg", "automl_prune.agents.sb3:DDPGStrategy", "AMC: DDPG on LayerPrune-v0 (stable-baselines3)")
STRATEGIES.register("ppo", "automl_prune.agents.sb3:PPOStrategy", "PPO on LayerPrune-v0 (stable-baselines3)")
STRATEGIES.register(
    "reinforce", "automl_prune.agents.n2n:ReinforceStrategy", "N2N: LSTM policies trained with REINFORCE"
)
STRATEGIES.register(
    "static_skip",
    "automl_prune.agents.static_skip:StaticSkipStrategy",
    "SkipNet's recurrent gate (REINFORCE) picks one set of blocks to remove for every input "
    "(per-input gates: `automl-prune skipnet`)",
)
STRATEGIES.rename(
    "skipnet",
    "now 'static_skip' (one set of blocks removed for every input); SkipNet's per-input gates are the command "
    "`automl-prune skipnet`",
)


def get_strategy(name: str, **kwargs: Any) -> Strategy:
    """Instantiate the strategy registered as ``name``.

    Raises:
        UnknownNameError: Listing the valid names.
    """
    strategy = STRATEGIES.get(name)(**kwargs)
    strategy.name = name
    return strategy


BATCHED = ("random", "abc", "optuna")
"""Ask/tell strategies that ask a worker-sized batch at a time."""


def make_strategy(name: str, options: Mapping[str, Any] | None = None, workers: int = 1) -> Strategy:
    """The strategy ``name`` with its options (``search.<name>.*``), asking ``workers`` plans at a time if it can.

    Raises:
        UnknownNameError: Listing the valid names.
        InvalidValueError: An option the strategy refuses (e.g. a data-driven criterion for ``global``).
    """
    kwargs = dict(options or {})
    if name in BATCHED:
        kwargs["batch_size"] = workers
    return get_strategy(name, **kwargs)


def space_for(name: str, evaluator: Evaluator, *, min_keep: float = 0.2, skip_gates: bool = False) -> SearchSpace:
    """The search space strategy ``name`` searches: skip gates where asked for or where the strategy needs them.

    Args:
        name: A registered strategy name.
        evaluator: The evaluator the space's plans are scored by.
        min_keep: Smallest keep ratio of a group.
        skip_gates: Add a skip gate per removable block even if the strategy does not need them.

    Raises:
        UnknownNameError: Listing the valid names.
        InvalidValueError: No plan in the space can meet the evaluator's budget.
    """
    skip = skip_gates or STRATEGIES.get(name).needs_skip_gates
    return SearchSpace(evaluator, min_keep=min_keep, skip_gates=skip)

"""Contract over every registered strategy (RL agents and black-box searchers alike).

On a short-trained ResNet-20 (real Fashion-MNIST), with a fixed seed and a small
evaluation budget: the best plan is inside the budget, the evaluation count is honoured
and the same seed gives the same plan.
"""

from __future__ import annotations

import pytest

from automl_prune.errors import UnknownNameError
from automl_prune.evaluator import Evaluator, EvaluatorConfig
from automl_prune.search_spaces import SearchSpace
from automl_prune.strategy import STRATEGIES, get_strategy
from automl_prune.types import Budget

EVALUATIONS = 6


@pytest.fixture(scope="module")
def problem(trained_resnet20, fashion_small):
    evaluator = Evaluator(
        trained_resnet20.model,
        fashion_small,
        Budget(flops=0.5),
        EvaluatorConfig(eval_size=300, recalibration_batches=2),
    )
    return evaluator, SearchSpace(evaluator, skip_gates=True)


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_strategy_contract(name: str, problem) -> None:
    evaluator, space = problem
    first = get_strategy(name).search(evaluator, space, EVALUATIONS, seed=3)
    assert first.strategy == name
    # the one-shot baselines need exactly one evaluation; every other strategy uses its whole budget
    assert first.evaluations == len(first.history) == (1 if name in ("uniform", "global") else EVALUATIONS)
    assert first.best_evaluation.feasible
    assert evaluator.graph.flops_ratio(first.best_plan) <= 0.5 + 1e-9
    assert all(e.flops_ratio <= 0.5 + 1e-9 for _, e in first.history)
    assert 0.0 < first.best_evaluation.accuracy <= 1.0
    second = get_strategy(name).search(evaluator, space, EVALUATIONS, seed=3)
    assert second.best_plan == first.best_plan
    assert [p for p, _ in second.history] == [p for p, _ in first.history]


def test_unknown_strategy_lists_valid_ones() -> None:
    with pytest.raises(UnknownNameError, match="Valid strategy names: .*ddpg"):
        get_strategy("dqn")

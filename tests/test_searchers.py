"""Black-box searchers: ABC (ABCPruner), Optuna (TPE / CMA-ES / random / NSGA-II) and global pruning.

Mechanics run on a random-init ResNet-20 with synthetic data and the real evaluator (small
evaluation counts); learning is checked on a cheap synthetic objective whose optimum is a
known feasible plan, against the ``random`` control at the same number of evaluations.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from automl_prune.data import load_dataset
from automl_prune.errors import AutomlPruneError, InvalidValueError
from automl_prune.evaluator import Evaluator, EvaluatorConfig
from automl_prune.models import ModelSpec, build_model
from automl_prune.pareto import pareto_pairs
from automl_prune.search_spaces import SearchSpace
from automl_prune.searchers.abc import ABCStrategy
from automl_prune.searchers.global_pruning import GlobalStrategy
from automl_prune.searchers.optuna_search import OptunaStrategy
from automl_prune.strategy import RandomStrategy, SearchSession, Strategy
from automl_prune.types import Budget, Evaluation, Plan

CONFIG = EvaluatorConfig(eval_size=64, recalibration_batches=1)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The machine is shared: score with one thread, restore the setting afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(ModelSpec("resnet20", 1, 10))


@pytest.fixture(scope="module")
def evaluator(model, data):
    return Evaluator(model, data, Budget(flops=0.5), CONFIG)


@pytest.fixture(scope="module")
def space(evaluator):
    return SearchSpace(evaluator)


class PeakedEvaluator(Evaluator):
    """Scores a plan by its closeness to a known target plan (no network is run).

    ``accuracy = 1 - RMS(keeps - target)``, so the optimum (1.0) is the target plan; cost,
    feasibility and reward are the real evaluator's.
    """

    target: np.ndarray

    def evaluate(self, plan: Plan) -> Evaluation:
        self.evaluations += 1
        keeps = np.array([plan.keep_ratio(g) for g in self.graph.group_names()])
        accuracy = float(1.0 - np.sqrt(np.mean((keeps - self.target) ** 2)))
        return self._score(plan, accuracy, self.cost(plan), self.predict_latency(plan), 0.0)


@pytest.fixture(scope="module")
def peaked(model, data):
    ev = PeakedEvaluator(model, data, Budget(flops=0.5), CONFIG)
    space = SearchSpace(ev)
    target = space.sample(np.random.default_rng(123))  # a feasible, non-uniform plan
    ev.target = np.maximum(np.floor(space.keeps(target) * 10 + 1e-9) / 10, space.min_keep)  # on the 10-level grid
    assert space.is_feasible(space.plan_from_keeps(ev.target))
    return ev, space


def plans_of(result) -> list[dict[str, float]]:
    return [dict(p.keep_ratios) for p, _ in result.history]


def check_history(result, space: SearchSpace, evaluations: int) -> None:
    assert result.evaluations == evaluations == len(result.history)
    for plan, evaluation in result.history:
        assert evaluation.feasible, evaluation.reason
        assert space.is_feasible(plan)
        assert evaluation.flops_ratio <= 0.5 + 1e-9


def on_grid(plan: Plan, levels: int, space: SearchSpace) -> bool:
    keeps = space.keeps(plan)
    return bool(np.allclose(keeps * levels, np.round(keeps * levels), atol=1e-9) and np.all(keeps >= space.min_keep))


# ----------------------------------------------------------------------------------- ABC
def test_abc_mechanics_grid_and_determinism(evaluator, space) -> None:
    """Exact evaluation count, every plan feasible and on the level grid, same seed -> same history."""
    first = ABCStrategy(n_sources=4, limit=2, batch_size=4).search(evaluator, space, 14, seed=3)
    check_history(first, space, 14)
    assert all(on_grid(p, 10, space) for p, _ in first.history)
    assert len({tuple(p.keep_ratios.values()) for p, _ in first.history}) == 14  # no evaluation wasted on a repeat
    again = ABCStrategy(n_sources=4, limit=2, batch_size=4).search(evaluator, space, 14, seed=3)
    assert plans_of(again) == plans_of(first)
    assert [e.accuracy for _, e in again.history] == [e.accuracy for _, e in first.history]
    other = ABCStrategy(n_sources=4, limit=2, batch_size=4).search(evaluator, space, 14, seed=4)
    assert plans_of(other) != plans_of(first)


def test_abc_uses_the_spaces_levels(peaked) -> None:
    """A discrete search space's levels override the strategy's; its repair keeps plans on that grid."""
    ev, _ = peaked
    space5 = SearchSpace(ev, levels=5)
    repaired = space5.repair(space5.plan_from_keeps(np.ones(space5.dim)))
    assert on_grid(repaired, 5, space5) and space5.is_feasible(repaired)
    result = ABCStrategy(n_sources=3, levels=10).search(ev, space5, 20, seed=0)
    check_history(result, space5, 20)
    assert all(on_grid(p, 5, space5) for p, _ in result.history)


def test_abc_asks_one_phase_at_a_time(peaked) -> None:
    """ask(n) hands out at most the current phase's candidates; the colony moves once a phase is told."""
    ev, space = peaked
    strategy = ABCStrategy(n_sources=4, n_onlookers=3)
    session = SearchSession("abc", ev, space, 100, seed=0)
    strategy.session = session
    strategy.setup(session)
    init = strategy.ask(100)
    assert len(init) == 4 and strategy.phase == "init"
    assert strategy.ask(100) == []  # nothing new before the asked plans are told
    strategy.tell(init, session.evaluate_many(init))
    assert [s.plan for s in strategy.sources] == init
    part = strategy.ask(3)
    assert len(part) == 3 and strategy.phase == "employed"
    strategy.tell(part, session.evaluate_many(part))
    rest = strategy.ask(100)
    assert len(rest) == 1 and strategy.phase == "employed"  # the employed phase's last candidate
    strategy.tell(rest, session.evaluate_many(rest))
    onlookers = strategy.ask(100)
    assert strategy.phase == "onlooker" and 1 <= len(onlookers) <= 3


def test_abc_scouts_replace_exhausted_sources(peaked) -> None:
    """With limit=1 a source that fails to improve once is abandoned; with a huge limit never."""
    ev, space = peaked
    eager = ABCStrategy(n_sources=4, limit=1, batch_size=4)
    eager.search(ev, space, 40, seed=1)
    assert eager.cycle >= 2 and eager.scouts > 0
    patient = ABCStrategy(n_sources=4, limit=1000, batch_size=4)
    patient.search(ev, space, 40, seed=1)
    assert patient.cycle >= 2 and patient.scouts == 0


@pytest.mark.parametrize(
    "kwargs", [{"n_sources": 1}, {"limit": 0}, {"levels": 1}, {"coordinates": 0}, {"fitness": "loss"}]
)
def test_abc_rejects_bad_hyper_parameters(kwargs) -> None:
    with pytest.raises(InvalidValueError):
        ABCStrategy(**kwargs)


# ----------------------------------------------------------------------------------- Optuna
@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_optuna_mechanics_and_determinism(evaluator, space, sampler) -> None:
    first = OptunaStrategy(sampler, batch_size=2).search(evaluator, space, 6, seed=5)
    check_history(first, space, 6)
    again = OptunaStrategy(sampler, batch_size=2).search(evaluator, space, 6, seed=5)
    assert plans_of(again) == plans_of(first)
    assert plans_of(OptunaStrategy(sampler).search(evaluator, space, 3, seed=6)) != plans_of(first)[:3]


def test_optuna_nsga2_keeps_a_pareto_front(evaluator, space) -> None:
    strategy = OptunaStrategy("nsga2", batch_size=4, sampler_kwargs={"population_size": 4})
    result = strategy.search(evaluator, space, 12, seed=0)
    check_history(result, space, 12)
    generations = [t.system_attrs.get("NSGAIISampler:generation") for t in strategy.study.trials]
    assert max(g for g in generations if g is not None) >= 2  # bred past the random first generation
    front = strategy.pareto_front
    assert front and front == pareto_pairs(result.history)
    points = [(e.accuracy, e.flops) for _, e in result.history]
    for _, e in front:  # nothing evaluated dominates a front member
        assert not any(a >= e.accuracy and f <= e.flops and (a > e.accuracy or f < e.flops) for a, f in points)
    assert [e.flops for _, e in front] == sorted(e.flops for _, e in front)


def test_optuna_on_a_discrete_space_stays_on_the_grid(peaked) -> None:
    ev, _ = peaked
    space4 = SearchSpace(ev, levels=4)
    result = OptunaStrategy("tpe").search(ev, space4, 15, seed=0)
    check_history(result, space4, 15)
    assert all(on_grid(p, 4, space4) for p, _ in result.history)


def test_optuna_searches_skip_gates_when_the_space_has_them(peaked) -> None:
    ev, _ = peaked
    gated = SearchSpace(ev, skip_gates=True)
    result = OptunaStrategy("tpe").search(ev, gated, 8, seed=0)
    check_history(result, gated, 8)
    assert any(any(p.skip.values()) for p, _ in result.history)
    assert all(set(p.skip) <= set(gated.blocks) for p, _ in result.history)


def test_optuna_cmaes(peaked) -> None:
    ev, space = peaked
    first = OptunaStrategy("cmaes").search(ev, space, 12, seed=0)
    check_history(first, space, 12)
    assert plans_of(OptunaStrategy("cmaes").search(ev, space, 12, seed=0)) == plans_of(first)


def test_optuna_cmaes_without_the_package_is_a_clear_error(peaked, monkeypatch) -> None:
    ev, space = peaked
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "cmaes" else real_find_spec(name, *a)
    )
    with pytest.raises(AutomlPruneError, match="pip install cmaes"):
        OptunaStrategy("cmaes").search(ev, space, 2, seed=0)


def test_optuna_unknown_sampler_lists_valid_ones() -> None:
    with pytest.raises(InvalidValueError, match="tpe, cmaes, random, nsga2"):
        OptunaStrategy("bayes")


def test_optuna_study_shared_through_storage(peaked, tmp_path) -> None:
    """Two searches with one sqlite study: the second sees the first's trials and records repaired plans."""
    ev, space = peaked
    url = f"sqlite:///{tmp_path / 'study.db'}"
    first = OptunaStrategy("tpe", storage=url, study_name="shared")
    first.search(ev, space, 4, seed=0)
    second = OptunaStrategy("tpe", storage=url, study_name="shared")
    result = second.search(ev, space, 4, seed=1)
    assert second.study is not None and len(second.study.trials) == 8
    stored = [Plan.from_dict(t.user_attrs["plan"]) for t in second.study.trials[4:]]
    assert plans_of(result) == [dict(p.keep_ratios) for p in stored]


# ----------------------------------------------------------------------------------- global
def test_global_plan_meets_the_budget_and_is_not_uniform(evaluator, space) -> None:
    result = GlobalStrategy().search(evaluator, space, 5, seed=0)
    assert result.evaluations == 1
    check_history(result, space, 1)
    ratio = result.best_evaluation.flops_ratio
    assert 0.5 * 0.98 <= ratio <= 0.5
    keeps = space.keeps(result.best_plan)
    assert np.ptp(keeps) > 0.05
    assert np.all(keeps >= space.min_keep - 1e-12)
    pure = GlobalStrategy(fill_attempts=0).search(evaluator, space, 1, seed=0)
    assert pure.best_evaluation.flops_ratio <= ratio + 1e-12  # filling only adds channels back


def test_global_with_levels_and_a_params_budget(model, data) -> None:
    ev = Evaluator(model, data, Budget(params=0.4), CONFIG)
    space10 = SearchSpace(ev, levels=10)
    result = GlobalStrategy(criterion="l2").search(ev, space10, 1, seed=0)
    plan = result.best_plan
    assert space10.is_feasible(plan) and on_grid(plan, 10, space10)
    assert ev.cost(plan).params >= 0.4 * 0.9 * ev.graph.params


def test_global_rejects_bad_options() -> None:
    with pytest.raises(InvalidValueError):
        GlobalStrategy(normalizer="median")
    with pytest.raises(InvalidValueError, match="'taylor' is not one. Valid: .*l1"):
        GlobalStrategy(criterion="taylor")


# ----------------------------------------------------------------------------------- learning
def mean_best(strategy: type[Strategy] | object, ev: Evaluator, space: SearchSpace, n: int, seeds=(0, 1, 2)) -> float:
    bests = []
    for seed in seeds:
        result = strategy().search(ev, space, n, seed=seed)  # type: ignore[operator]
        assert result.evaluations == n
        bests.append(result.best_evaluation.accuracy)
    return float(np.mean(bests))


def test_abc_and_tpe_beat_random_on_a_known_optimum(peaked) -> None:
    """Mean best-of-100 over three seeds: ABC and TPE both find plans closer to the optimum than random."""
    ev, space = peaked
    n = 100
    random = mean_best(RandomStrategy, ev, space, n)
    abc = mean_best(lambda: ABCStrategy(n_sources=4), ev, space, n)
    gabc = mean_best(lambda: ABCStrategy(n_sources=4, gbest_weight=1.5), ev, space, n)
    tpe = mean_best(lambda: OptunaStrategy("tpe"), ev, space, n)
    assert abc > random + 0.01, (abc, random)
    assert gabc > random + 0.01, (gabc, random)
    assert tpe > random + 0.05, (tpe, random)

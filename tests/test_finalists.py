"""Measured finalists and the Pareto front: what ships is the best plan whose *measured* latency meets the budget."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from automl_prune.errors import InvalidValueError
from automl_prune.evaluator import Evaluator, EvaluatorConfig
from automl_prune.finalists import NOISE_BAND, FinalistChoice, choose_finalist, match_measured_latency
from automl_prune.measure.latency import LatencyStats
from automl_prune.measure.latency_model import Measured
from automl_prune.pareto import front, plan_from_front, read_plan_file, write_front
from automl_prune.search_spaces import SearchSpace
from automl_prune.strategy import get_strategy
from automl_prune.types import Budget, Plan

CONFIG = EvaluatorConfig(eval_size=500, recalibration_batches=4, round_to=8, latency_plans=8)


def _stats(ms: float) -> LatencyStats:
    return LatencyStats.from_times([ms] * 3, warmup=0, batch_size=1, threads=1, device="cpu", runtime="onnxruntime")


@pytest.fixture(scope="module")
def honest(trained_cnn, fashion_small) -> Evaluator:
    """fashion_cnn (trained on Fashion-MNIST) that must be 1.3x faster than dense in onnxruntime, 1 thread."""
    return Evaluator(trained_cnn.model, fashion_small, Budget(speedup=1.3, threads=1), CONFIG)


@pytest.fixture(scope="module")
def history(honest: Evaluator):
    space = SearchSpace(honest, min_keep=0.2)
    return get_strategy("random").search(honest, space, 12, seed=0).history


def test_finalists_are_measured_and_the_best_meeting_one_ships(honest: Evaluator, history) -> None:
    choice = choose_finalist(honest, history, k=4, progress=False)
    assert choice is not None and 1 <= len(choice.finalists) <= 4
    keys = {honest.structure_key(f.plan) for f in choice.finalists}
    assert len(keys) == len(choice.finalists)  # distinct plans
    objectives = [f.objective for f in choice.finalists]
    assert objectives == sorted(objectives, reverse=True)  # in the search's order of preference
    for f in choice.finalists:
        assert f.measured_ms > 0 and f.error is not None
        assert f.meets == (f.margin >= 0) == (f.measured.ratio * 1.3 <= 1.0)
    chosen = choice.finalists[choice.chosen]
    assert choice.met == any(f.meets for f in choice.finalists)
    if choice.met:  # the rule for a budget some finalist meets
        assert chosen.meets
        earlier = choice.finalists[: choice.chosen]
        if chosen.margin >= NOISE_BAND:  # the first that meets outside the noise band, in order
            assert not any(f.meets and f.margin >= NOISE_BAND for f in earlier)
        else:  # none meets outside the noise: the first that meets at all
            assert not any(f.margin >= NOISE_BAND for f in choice.finalists if f.meets)
            assert not any(f.meets for f in earlier)
        assert choice.shippable()[0] == choice.chosen
    else:  # a machine too loaded for the 1.3x budget: the fastest finalist, as the rule for a miss says
        assert choice.chosen == min(range(len(choice.finalists)), key=lambda i: choice.finalists[i].measured_ms)
    data = json.loads(json.dumps(choice.to_dict()))
    assert data["chosen"] == choice.chosen and "prediction_error" in data["finalists"][0]


def test_a_resumed_run_reuses_its_finalists_measurements(
    honest: Evaluator, history, monkeypatch: pytest.MonkeyPatch
) -> None:
    """finalists.json of the same finalists is read back, not measured again (which could change what is refined)."""
    first = choose_finalist(honest, history, k=3, progress=False)
    assert first is not None
    stored = json.loads(json.dumps(first.to_dict()))

    def no_measuring(*args, **kwargs):
        raise AssertionError("measured again")

    with monkeypatch.context() as patch:
        patch.setattr(honest, "measure", no_measuring)
        again = choose_finalist(honest, history, k=3, progress=False, stored=stored)
    assert again is not None and again.to_dict() == first.to_dict()
    assert [f.error for f in again.finalists] == [f.error for f in first.finalists]
    # finalists of another search (here: fewer of them) are measured afresh
    calls: list[int] = []
    original = honest.measure
    with monkeypatch.context() as patch:
        patch.setattr(honest, "measure", lambda plans, **kw: calls.append(len(plans)) or original(plans, **kw))
        fewer = choose_finalist(honest, history, k=2, progress=False, stored=stored)
    assert fewer is not None and len(fewer.finalists) == 2 and calls and calls[0] == 2


def test_without_measured_finalists_only_plans_predicted_to_meet_the_budget_are_refined(
    honest: Evaluator, history, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """search.finalists 0: the refinement may not pick a plan the latency model predicts over the budget."""
    from automl_prune import refine
    from automl_prune.config import resolve
    from automl_prune.pipeline import SearchOutcome, refine_outcome
    from automl_prune.runs import RunDirectory
    from automl_prune.types import SearchResult

    limit = honest.limits["latency_ms"]
    plan, e = max(((p, e) for p, e in history if e.feasible), key=lambda pe: pe[1].accuracy)
    # the best-scoring plan of all, predicted 5% over the limit: a finalist candidate, but not feasible
    over = Plan({k: min(1.0, v + 0.05) for k, v in plan.keep_ratios.items()})
    tempting = dataclasses.replace(e, accuracy=1.0, latency_ms=1.05 * limit, feasible=False, reason="latency")
    runs = [*history, (over, tempting)]
    result = SearchResult("random", plan, e, runs, 0.0, len(runs), 0)
    refined: list[list[Plan]] = []

    class Captured(Exception):
        """Raised by the stand-in for `refine` once it has seen the candidates."""

    def capture(candidates, *args, **kwargs):
        refined.append([c for c in candidates])
        raise Captured

    monkeypatch.setattr(refine, "refine", capture)
    config = resolve(None, {"budget.speedup": "1.3", "search.finalists": "0", "search.refine_top": "4"})
    with pytest.raises(Captured):
        refine_outcome(config, RunDirectory(tmp_path / "run", config.to_dict()), honest, SearchOutcome(result, plan, e))
    (candidates,) = refined
    feasible = {honest.structure_key(p) for p, e in history if e.feasible}
    searched = [c.plan for c in candidates if not c.reference]
    assert searched and all(honest.structure_key(p) in feasible for p in searched)
    assert honest.structure_key(over) not in {honest.structure_key(c.plan) for c in candidates}
    # the rules' plans (search.refine_rules) join as references only where they too are predicted to meet it
    assert [c.reference for c in candidates if c.reference] == ["uniform", "global"]
    assert all(c.evaluation.feasible and c.evaluation.latency_ms <= limit for c in candidates)


def test_a_finalist_meeting_the_budget_outside_the_noise_is_preferred(honest: Evaluator, history) -> None:
    """A first finalist that meets the budget by less than the noise band ships only when no other clears it."""
    choice = choose_finalist(honest, history, k=3, progress=False)
    assert choice is not None and len(choice.finalists) >= 2
    first, second = choice.finalists[:2]
    edge = dataclasses.replace(first, margin=NOISE_BAND / 5, meets=True)
    clear = dataclasses.replace(second, margin=2 * NOISE_BAND, meets=True)
    assert FinalistChoice([edge, clear]).shippable() == [1]
    assert FinalistChoice([edge, dataclasses.replace(clear, margin=NOISE_BAND / 2)]).shippable() == [0, 1]
    assert FinalistChoice([dataclasses.replace(edge, margin=-0.1, meets=False)]).shippable() == []


def test_a_model_that_under_predicts_is_caught_by_the_measurement(trained_cnn, fashion_small, honest) -> None:
    """A latency model that predicts half the real latency lets the search pick plans that are too slow."""
    lying = dataclasses.replace(honest.latency_model, coef=[c / 2 for c in honest.latency_model.coef])
    evaluator = Evaluator(trained_cnn.model, fashion_small, Budget(speedup=3.0, threads=1), CONFIG, latency_model=lying)
    space = SearchSpace(evaluator, min_keep=0.2)
    result = get_strategy("random").search(evaluator, space, 8, seed=1)
    choice = choose_finalist(evaluator, result.history, k=3, progress=False)
    assert choice is not None and not choice.met
    assert all(not f.meets for f in choice.finalists)
    # predicted ~2x too fast: every prediction error (relative to the dense model, drift-free) is far below zero
    assert all(f.error is not None and f.error < -0.25 for f in choice.finalists), [f.error for f in choice.finalists]
    assert choice.chosen == min(range(len(choice.finalists)), key=lambda i: choice.finalists[i].measured_ms)


def test_uniform_plans_are_placed_at_a_measured_latency(honest: Evaluator) -> None:
    names = honest.graph.group_names()
    plan, measured = match_measured_latency(honest, lambda x: Plan.uniform(names, 0.25 + 0.75 * x), 0.6, steps=4)
    assert measured.ratio == pytest.approx(0.6, abs=0.25)
    assert honest.graph.cost(plan, 8).flops < honest.graph.flops


def test_the_bisection_converges_on_a_known_latency_curve(honest: Evaluator, monkeypatch: pytest.MonkeyPatch) -> None:
    """Measurements replaced by a known curve (latency ratio = keep ** 2): the steps and the pick are exact."""
    names = honest.graph.group_names()
    seen: list[float] = []

    def measure(plans: list[Plan]) -> list[Measured]:
        (plan,) = plans
        keep = plan.keep_ratio(names[0])
        seen.append(keep)
        return [Measured(plan, keep**2, _stats(keep**2), _stats(1.0))]

    monkeypatch.setattr(honest, "measure", measure)
    plan, measured = match_measured_latency(honest, lambda x: Plan.uniform(names, 0.25 + 0.75 * x), 0.6, steps=4)
    # x = 0.5, 0.75, 0.625, 0.6875: ratios 0.39 (up), 0.66 (down), 0.517 (up), 0.586, the closest to 0.6
    assert seen == pytest.approx([0.625, 0.8125, 0.71875, 0.765625])
    assert plan.keep_ratio(names[0]) == pytest.approx(0.765625) and measured.ratio == pytest.approx(0.765625**2)


def test_pareto_front_of_a_search(honest: Evaluator, history, tmp_path: Path) -> None:
    data = front(history, {0: 0.01}, key=honest.structure_key)
    points = data["points"]
    assert data["cost"] == "latency_ms" and points and data["evaluated"] <= len(history)
    costs = [p["cost"] for p in points]
    accs = [p["accuracy"] for p in points]
    assert costs == sorted(costs) and accs == sorted(accs)  # cheaper points are less accurate, else dominated
    assert [p["point"] for p in points] == list(range(len(points)))
    assert points[0]["measured_ms"] == 0.01  # a measured latency ranks the plan by its measurement
    for _, e in history:  # nothing evaluated dominates a point of the front
        for p in points:
            assert not (e.latency_ms < p["cost"] and e.accuracy > p["accuracy"])
    write_front(tmp_path, data)
    assert (tmp_path / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((tmp_path / "pareto.json").read_text())
    assert plan_from_front(saved, 0, "pareto.json") == Plan.from_dict(points[0]["plan"])
    with pytest.raises(InvalidValueError, match="choose one with --point"):
        plan_from_front(saved, None, "pareto.json")
    with pytest.raises(InvalidValueError, match="not on the front"):
        plan_from_front(saved, len(points), "pareto.json")
    with pytest.raises(InvalidValueError, match="not a Pareto front"):
        plan_from_front({"keep_ratios": {}}, 0, "plan.json")
    # a plan file says at which channel multiple its run scored it, so that `prune` cuts the same widths
    write_front(tmp_path, {**data, "round_to": 4})
    assert read_plan_file(tmp_path / "pareto.json", 0) == (Plan.from_dict(points[0]["plan"]), 4)
    (tmp_path / "plan.json").write_text(json.dumps(points[0]["plan"]))
    assert read_plan_file(tmp_path / "plan.json")[1] is None  # a plan alone does not say
    (tmp_path / "result.json").write_text(json.dumps({"round_to": 16}))
    assert read_plan_file(tmp_path / "plan.json") == (Plan.from_dict(points[0]["plan"]), 16)

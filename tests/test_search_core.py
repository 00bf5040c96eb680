"""Search core: budgets, rewards, the evaluator, search spaces and the Gymnasium envs."""

from __future__ import annotations

import dataclasses
import math

import gymnasium
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

import automl_prune.envs
from automl_prune.errors import InvalidValueError
from automl_prune.evaluator import Evaluator, EvaluatorConfig, recalibrate_batchnorm
from automl_prune.measure.accuracy import evaluate_accuracy
from automl_prune.pruning import apply
from automl_prune.reward import REWARDS, RewardContext
from automl_prune.search_spaces import SearchSpace
from automl_prune.types import Budget, Plan

CONFIG = EvaluatorConfig(eval_size=500, recalibration_batches=4)


@pytest.fixture(scope="module")
def cnn_evaluator(trained_cnn, fashion_small):
    return Evaluator(trained_cnn.model, fashion_small, Budget(flops=0.5), CONFIG)


@pytest.fixture(scope="module")
def resnet_evaluator(trained_resnet20, fashion_small):
    return Evaluator(trained_resnet20.model, fashion_small, Budget(flops=0.5), CONFIG)


# ------------------------------------------------------------------------- budget and rewards
@pytest.mark.parametrize(
    "kwargs", [{}, {"flops": -0.5}, {"flops": math.nan}, {"latency_ms": 0}, {"flops": 0.5, "batch_size": 0}]
)
def test_bad_budgets_are_rejected(kwargs) -> None:
    with pytest.raises(InvalidValueError):
        Budget(**kwargs)


def test_budget_fraction_or_absolute() -> None:
    assert Budget.absolute(0.5, 1000) == 500
    assert Budget.absolute(300, 1000) == 300
    assert Budget(flops=0.5, latency_ms=3).describe() == "flops<=50%, latency<=3ms (onnxruntime, cpu, b=1)"
    both = Budget(latency_ms=3, speedup=2, runtime="torch", threads=1)
    assert both.describe() == "latency<=3ms, speed-up>=2x (torch, cpu, 1 thread, b=1)"
    assert both.latency_limit(dense_ms=4.0) == 2.0 and both.latency_limit(dense_ms=10.0) == 3.0
    with pytest.raises(InvalidValueError, match="speedup must be >= 1"):
        Budget(speedup=0.5)


def test_reward_formulas() -> None:
    ctx = RewardContext(dense_accuracy=0.9, dense_flops=1000, dense_params=100, latency_target_ms=2.0)
    assert REWARDS.get("acc")(0.8, 500, 50, None, ctx) == pytest.approx(-0.2)
    assert REWARDS.get("acc_log_flops")(0.8, 500, 50, None, ctx) == pytest.approx(-0.2 * math.log(500))
    assert REWARDS.get("acc_log_params")(0.8, 500, 50, None, ctx) == pytest.approx(-0.2 * math.log(50))
    # fewer parameters at equal accuracy score higher; more accuracy at equal size too
    assert REWARDS.get("acc_log_params")(0.8, 500, 40, None, ctx) > REWARDS.get("acc_log_params")(
        0.8, 500, 50, None, ctx
    )
    assert REWARDS.get("acc_log_params")(0.9, 500, 50, None, ctx) > REWARDS.get("acc_log_params")(
        0.8, 500, 50, None, ctx
    )
    assert REWARDS.get("acc_latency")(0.8, 500, 50, 2.0, ctx) == pytest.approx(0.8)
    assert REWARDS.get("acc_latency")(0.8, 500, 50, 4.0, ctx) < 0.8
    c = 1 - 50 / 100
    assert REWARDS.get("n2n")(0.8, 500, 50, None, ctx) == pytest.approx(c * (2 - c) * 0.8 / 0.9)


# ------------------------------------------------------------------------- evaluator
def test_reported_accuracy_is_the_built_models(cnn_evaluator, trained_cnn) -> None:
    """The accuracy of a plan is that of the model apply() physically builds (then BN-recalibrated)."""
    plan = cnn_evaluator.graph.uniform_plan(0.5)
    evaluation = cnn_evaluator.evaluate(plan)
    physical = apply(trained_cnn.model, plan, "l1", example_inputs=trained_cnn.info.example_inputs())
    recalibrate_batchnorm(physical, cnn_evaluator.calibration)
    assert evaluation.accuracy == evaluate_accuracy(physical, cnn_evaluator.val)
    assert evaluation.feasible and evaluation.flops_ratio <= 0.5
    again = cnn_evaluator.evaluate(Plan(dict(plan.keep_ratios)))
    assert again.cached and again.accuracy == evaluation.accuracy


def test_bn_recalibration_rescues_pruned_accuracy(trained_resnet20, fashion_small, resnet_evaluator) -> None:
    """Adaptive BN: at 50% FLOPs a pruned ResNet-20 scores far better after re-estimating BN statistics."""
    raw = Evaluator(
        trained_resnet20.model, fashion_small, Budget(flops=0.5), EvaluatorConfig(eval_size=500, bn_recalibration=False)
    )
    plan = resnet_evaluator.graph.uniform_plan(0.5)
    assert resnet_evaluator.evaluate(plan).accuracy > raw.evaluate(plan).accuracy + 0.10


def test_a_plan_cut_alone_is_the_model_its_search_scored(trained_resnet20, fashion_small) -> None:
    """`automl-prune prune` (pipeline.cut_plan) re-estimates BN as the search's evaluator does: the same model."""
    from automl_prune.config import resolve
    from automl_prune.pipeline import cut_plan, evaluator_config_of

    config = resolve(None, {"prune.round_to": "4", "search.eval_size": "500"})
    evaluator = Evaluator(trained_resnet20.model, fashion_small, Budget(flops=0.5), evaluator_config_of(config))
    plan = evaluator.graph.uniform_plan(0.5, round_to=4)
    cut = cut_plan(config, trained_resnet20.model, trained_resnet20.info, plan, fashion_small)
    scored = evaluator.build(plan)
    x = fashion_small.test.images[:64]
    with torch.no_grad():
        assert torch.allclose(cut(x), scored(x), atol=1e-5)
    assert evaluate_accuracy(cut, evaluator.val) == evaluator.evaluate(plan).accuracy


def test_failed_evaluation_is_recorded_not_raised(cnn_evaluator, monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(cnn_evaluator, "build", broken)
    evaluation = cnn_evaluator.evaluate(Plan({"features.0": 0.3}))
    assert not evaluation.feasible and "boom" in evaluation.reason and evaluation.reward < -1


def test_model_without_prunable_groups_is_a_clear_error(fashion_small) -> None:
    head_only = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10))
    with pytest.raises(InvalidValueError, match="no prunable channel groups"):
        Evaluator(head_only, fashion_small, Budget(flops=0.5), CONFIG)


# ------------------------------------------------------------------------- search space
def test_unreachable_budget_names_smallest_cost(trained_cnn, fashion_small) -> None:
    evaluator = Evaluator(trained_cnn.model, fashion_small, Budget(flops=0.01), CONFIG)
    with pytest.raises(InvalidValueError, match=r"cannot be met.*FLOPs \(4\.\d%\)"):
        SearchSpace(evaluator, min_keep=0.2)


def test_encode_decode_round_trip(resnet_evaluator) -> None:
    space = SearchSpace(resnet_evaluator, skip_gates=True)
    plan = space.sample(np.random.default_rng(3))
    decoded = space.decode(space.encode(plan))
    assert decoded.skip == plan.skip
    assert np.allclose(space.keeps(decoded), space.keeps(plan))


def test_discrete_levels(resnet_evaluator) -> None:
    space = SearchSpace(resnet_evaluator, levels=10)
    plan = space.sample(np.random.default_rng(0))
    assert all(abs(k * 10 - round(k * 10)) < 1e-9 for k in plan.keep_ratios.values())
    assert space.is_feasible(plan)


@pytest.mark.parametrize("flops", [0.5, 0.25])
def test_every_random_episode_ends_inside_a_flops_budget(trained_resnet20, fashion_small, flops: float) -> None:
    evaluator = Evaluator(trained_resnet20.model, fashion_small, Budget(flops=flops), CONFIG)
    space = SearchSpace(evaluator, min_keep=0.1, skip_gates=True)
    rng = np.random.default_rng(0)
    ratios = []
    for _ in range(60):
        decided: list[float] = []
        skip = {b: bool(rng.random() < 0.3) for b in space.blocks}
        for i in range(space.dim):
            decided.append(space.clip(i, space.action_to_keep(rng.uniform(-1, 1), i), decided, skip))
        ratios.append(evaluator.graph.flops_ratio(space.plan_from_keeps(decided, skip)))
    assert max(ratios) <= flops + 1e-9
    assert np.median(ratios) > flops - 0.05  # the lower bound keeps plans from being needlessly small


def test_every_random_episode_ends_inside_a_latency_budget(trained_cnn, fashion_small) -> None:
    config = dataclasses.replace(CONFIG, latency_plans=6)  # any fitted model will do: the bounds must hold for it
    probe = Evaluator(trained_cnn.model, fashion_small, Budget(latency_ms=1e6, threads=1), config)
    dense_ms = probe.predict_latency(Plan())
    budget = Budget(latency_ms=0.6 * dense_ms, threads=1)
    # the same fitted latency model: a deterministic test
    evaluator = Evaluator(trained_cnn.model, fashion_small, budget, config, latency_model=probe.latency_model)
    space = SearchSpace(evaluator, min_keep=0.1)
    rng = np.random.default_rng(1)
    for _ in range(15):
        plan = space.sample(rng)
        assert evaluator.predict_latency(plan) <= budget.latency_ms + 1e-9


# ------------------------------------------------------------------------- envs
@pytest.mark.parametrize("env_id", automl_prune.envs.ENV_IDS)
def test_registered_envs_pass_check_env_and_are_deterministic(env_id: str, resnet_evaluator) -> None:
    space = SearchSpace(resnet_evaluator, skip_gates=True)
    env = gymnasium.make(env_id, space=space)
    check_env(env.unwrapped, skip_render_check=True)

    def episode(seed: int) -> tuple[list, float]:
        env.action_space.seed(seed)
        obs, _ = env.reset(seed=seed)
        observations, done, reward = [obs], False, 0.0
        while not done:
            obs, reward, done, _, info = env.step(env.action_space.sample())
            observations.append(obs)
        assert info["evaluation"].feasible
        return observations, reward

    first, second = episode(5), episode(5)
    assert all(np.array_equal(a, b) for a, b in zip(first[0], second[0])) and first[1] == second[1]


def test_layer_prune_env_reward_only_at_the_end(cnn_evaluator) -> None:
    env = gymnasium.make("LayerPrune-v0", space=SearchSpace(cnn_evaluator))
    env.reset(seed=0)
    rewards = [env.step(np.array([0.0], dtype=np.float32))[1] for _ in range(3)]
    assert rewards[:2] == [0.0, 0.0] and rewards[2] < 0


def test_fitness_after_a_few_finetuning_steps_scores_higher(trained_resnet20, fashion_small) -> None:
    """ABCPruner-style fitness: the same plan scores higher after a few SGD steps, and stays deterministic."""
    config = EvaluatorConfig(eval_size=500, recalibration_batches=4, finetune_steps=20)
    tuned = Evaluator(trained_resnet20.model, fashion_small, Budget(flops=0.25), config)
    plain = Evaluator(trained_resnet20.model, fashion_small, Budget(flops=0.25), CONFIG)
    plan = plain.graph.uniform_plan(0.25)
    first = tuned.evaluate(plan)
    assert first.accuracy > plain.evaluate(plan).accuracy
    tuned.clear_cache()
    assert tuned.evaluate(plan).accuracy == first.accuracy


def test_the_space_steps_in_the_runtimes_channel_multiple(trained_resnet20, fashion_small) -> None:
    """Every keep ratio the space produces is the exact width of the model that will be built."""
    evaluator = Evaluator(trained_resnet20.model, fashion_small, Budget(flops=0.5), EvaluatorConfig(round_to=16))
    space = SearchSpace(evaluator, min_keep=0.2)
    graph = evaluator.graph
    rng = np.random.default_rng(0)
    plans = [space.sample(rng) for _ in range(10)]
    assert all(space.is_feasible(p) for p in plans)
    plans.append(space.decode(rng.uniform(-1, 1, space.dim)))  # an RL action vector, as the envs decode it
    for plan in plans:
        for group, keep in zip(graph.groups, space.keeps(plan)):
            width = keep * group.channels
            assert abs(width - round(width)) < 1e-9  # an exact channel count
            multiple = 8 if group.channels == 16 else 16  # a 16-channel group is rounded to 8 (half)
            assert round(width) % multiple == 0 or round(width) == group.channels
        assert graph.kept_channels(plan, 16) == graph.kept_channels(plan, 1)  # nothing is rounded later
    assert list(space.min_keep[:1]) == [0.5]  # 16 channels: the smallest width is one multiple of 8


def test_amc_observations_equal_hand_computed_values(cnn_evaluator) -> None:
    """fashion_cnn on 1x28x28: conv 1->32 (28x28), conv 32->64 (14x14), conv 64->128 (7x7), linear 128->10."""
    conv = [9 * 1 * 32 * 28 * 28, 9 * 32 * 64 * 14 * 14, 9 * 64 * 128 * 7 * 7]
    fc = 128 * 10
    dense = sum(conv) + fc
    touched = [conv[0] + conv[1], conv[1] + conv[2], conv[2] + fc]  # each group's FLOPs: its conv and its consumer
    env = gymnasium.make("LayerPrune-v0", space=SearchSpace(cnn_evaluator)).unwrapped
    obs, _ = env.reset(seed=0)
    # index, kind (conv 0), in/max 64, out/max 128, stride, kernel, feature map/max 28, FLOPs/max; reduced, rest, prev
    expected = [0, 0, 1 / 64, 32 / 128, 1, 1, 28 / 28, touched[0] / max(touched), 0, (dense - conv[0]) / dense, 1]
    np.testing.assert_allclose(obs, expected, rtol=1e-6, atol=1e-7)
    keep = env.space.snap(0.5, 0)  # an action that keeps 16 of 32 (inside AMC's feasible interval here)
    obs, reward, done, _, info = env.step(np.array([env.space.keep_to_action(keep, 0)], dtype=np.float32))
    assert info["keep"] == pytest.approx(0.5) and not done and reward == 0.0
    reduced = (conv[0] / 2 + conv[1] / 2) / dense  # half of conv 1's filters and half of conv 2's inputs
    expected = [
        1 / 2,
        0,
        32 / 64,
        64 / 128,
        1,
        1,
        14 / 28,
        touched[1] / max(touched),
        reduced,
        (conv[2] + fc) / dense,
        0.5,
    ]
    np.testing.assert_allclose(obs, expected, rtol=1e-6, atol=1e-7)

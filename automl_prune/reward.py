"""Reward functions, looked up by name.

Every reward maps a plan's measured accuracy and cost to a number the strategies
maximise. ``error = 1 - accuracy`` on the search-val subset.

- ``acc``: AMC's ``R_err = -error``. Use with a hard budget (the search space keeps every
  plan feasible), so only accuracy matters.
- ``acc_log_flops``: AMC's ``R_FLOPs = -error * log(FLOPs)``, which also rewards fewer FLOPs.
- ``acc_log_params``: AMC's ``R_Param = -error * log(#Param)``, its reward for parameter
  budgets (model-size compression), which also rewards fewer parameters.
- ``acc_latency``: ``accuracy * (latency / target) ** w`` with ``w = -0.07`` (the soft
  latency term of MnasNet), for latency budgets; equal to accuracy at the target.
- ``n2n``: N2N's ``R = R_c * R_a`` with ``R_c = C (2 - C)``, ``C = 1 - params / dense_params``
  (relative compression) and ``R_a = accuracy / dense_accuracy``.

Plans outside the budget are penalised by :func:`budget_penalty`, below any feasible plan
of the same accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from automl_prune.registry import Registry


@dataclass(frozen=True)
class RewardContext:
    """Facts a reward may use besides the plan's own figures.

    Attributes:
        dense_accuracy: Accuracy of the unpruned model on the same search-val subset.
        dense_flops: FLOPs of the unpruned model.
        dense_params: Parameters of the unpruned model.
        latency_target_ms: Latency limit of the budget, if any.
    """

    dense_accuracy: float
    dense_flops: int
    dense_params: int
    latency_target_ms: float | None = None


COMPRESSION_REWARDS = frozenset({"acc_log_flops", "acc_log_params", "n2n"})
"""Rewards that value compression for its own sake (AMC's FLOPs and parameter rewards, N2N's): a
search space under one of them lets a plan fall below the budget (see
:meth:`automl_prune.search_spaces.SearchSpace.feasible_interval`). ``acc`` and ``acc_latency``
(a soft term around a latency target) are used with a hard budget that a plan should fill."""

RewardFn = Callable[[float, int, int, "float | None", RewardContext], float]
"""(accuracy, flops, params, latency_ms, context) -> reward."""

REWARDS: Registry[RewardFn] = Registry("reward")


@REWARDS.register("acc", description="AMC R_err = -error (use with a hard budget)")
def reward_acc(accuracy: float, flops: int, params: int, latency_ms: float | None, ctx: RewardContext) -> float:
    """AMC's error reward: ``-(1 - accuracy)``."""
    return -(1.0 - accuracy)


@REWARDS.register("acc_log_flops", description="AMC R_FLOPs = -error * log(FLOPs)")
def reward_acc_log_flops(
    accuracy: float, flops: int, params: int, latency_ms: float | None, ctx: RewardContext
) -> float:
    """AMC's FLOPs-aware reward: ``-(1 - accuracy) * log(FLOPs)``."""
    return -(1.0 - accuracy) * math.log(max(flops, 2))


@REWARDS.register("acc_log_params", description="AMC R_Param = -error * log(#Param) (parameter budgets)")
def reward_acc_log_params(
    accuracy: float, flops: int, params: int, latency_ms: float | None, ctx: RewardContext
) -> float:
    """AMC's parameter-aware reward: ``-(1 - accuracy) * log(#Param)``."""
    return -(1.0 - accuracy) * math.log(max(params, 2))


@REWARDS.register("acc_latency", description="accuracy * (latency/target)^-0.07 (MnasNet soft latency term)")
def reward_acc_latency(accuracy: float, flops: int, params: int, latency_ms: float | None, ctx: RewardContext) -> float:
    """Accuracy weighted by ``(latency / target) ** -0.07``; plain accuracy without a latency target."""
    if latency_ms is None or ctx.latency_target_ms is None:
        return accuracy
    return accuracy * (latency_ms / ctx.latency_target_ms) ** -0.07


@REWARDS.register("n2n", description="N2N: C(2-C) * accuracy/dense_accuracy, C = 1 - params/dense_params")
def reward_n2n(accuracy: float, flops: int, params: int, latency_ms: float | None, ctx: RewardContext) -> float:
    """N2N's compression-accuracy product ``C (2 - C) * accuracy / dense_accuracy``."""
    compression = 1.0 - params / ctx.dense_params
    return compression * (2.0 - compression) * accuracy / max(ctx.dense_accuracy, 1e-12)


def budget_penalty(excess: float, scale: float = 10.0) -> float:
    """Penalty subtracted from the reward of a plan exceeding its budget by ``excess`` (relative).

    ``1 + scale * excess`` puts every infeasible plan below a feasible one of equal accuracy.
    """
    return 1.0 + scale * excess if excess > 0 else 0.0
